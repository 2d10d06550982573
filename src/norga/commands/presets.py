"""`norga presets [NAME]`: list the shipped presets, or print one resolved."""

from __future__ import annotations

import argparse

from norga.config_io import config_yaml, load_config, preset_names


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("presets", help="list the paper presets, or show one resolved")
    parser.add_argument("name", nargs="?", help="a preset to print in full (all keys resolved)")
    parser.set_defaults(handler=handle)


def summary(name: str) -> str:
    """One line: the preset's benchmark, backbone, method and the settings that matter to that method."""
    from norga.methods import method_class

    c = load_config(name)
    return f"{name:28s} {c.data.benchmark:11s} {c.backbone.name:18s} {c.method:12s} {method_class(c.method).summary(c.settings)}"


def handle(args: argparse.Namespace) -> int:
    if args.name:
        print(config_yaml(load_config(args.name)), end="")
    else:
        for name in preset_names():
            print(summary(name))
    return 0
