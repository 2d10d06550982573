"""`norga presets [NAME]`: list the shipped presets, or print one resolved."""

from __future__ import annotations

import argparse
import dataclasses

import yaml

from norga.config_io import load_config, preset_names


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("presets", help="list the paper presets, or show one resolved")
    parser.add_argument("name", nargs="?", help="a preset to print in full (all keys resolved)")
    parser.set_defaults(handler=handle)


def summary(name: str) -> str:
    c = load_config(name)
    gate = c.prompt.gate or "none (HiDe-Prompt)"
    return (f"{name:28s} {c.data.benchmark:11s} {c.backbone.name:8s} gate {gate:19s} "
            f"Lp {c.prompt.length:<3d} prompt epochs {c.wtp.train.epochs}")


def handle(args: argparse.Namespace) -> int:
    if args.name:
        print(yaml.safe_dump(dataclasses.asdict(load_config(args.name)), sort_keys=False), end="")
    else:
        for name in preset_names():
            print(summary(name))
    return 0
