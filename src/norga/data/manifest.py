"""`python -m norga.data.manifest make|verify`: write and check ImageNet-R split manifests (norga.data.split_manifest).

    python -m norga.data.manifest make /data/imagenet-r --out imagenet-r-split-v1.json --hash-contents
    python -m norga.data.manifest verify imagenet-r-split-v1.json /data/imagenet-r [--contents]

Nothing imports this module when norga.data is imported, so running it with -m loads it once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from norga.data.errors import DataLayoutError
from norga.data.split_manifest import make_split_manifest, read_manifest, verify_manifest, write_manifest

DESCRIPTION = "Versioned train/test split manifests for datasets without an official split (ImageNet-R)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m norga.data.manifest", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="draw the split of a folder of class folders and write it")
    make.add_argument("folder", type=Path, help="the dataset folder of class folders (e.g. imagenet-r/)")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--dataset", default="imagenet-r")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--train-fraction", type=float, default=0.8)
    make.add_argument("--hash-contents", action="store_true", help="also hash every file's bytes")
    verify = commands.add_parser("verify", help="check a manifest against a folder (and that it is this folder's split)")
    verify.add_argument("manifest", type=Path)
    verify.add_argument("folder", type=Path)
    verify.add_argument("--contents", action="store_true", help="also check every file's bytes (needs contents_sha256)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make":
        manifest = make_split_manifest(args.folder, args.dataset, args.seed, args.train_fraction, args.hash_contents)
        write_manifest(manifest, args.out)
        print(f"{args.out}: {len(manifest['classes'])} classes, {len(manifest['train'])} train / "
              f"{len(manifest['test'])} test, sha256 {manifest['sha256']}")
        return 0
    try:
        manifest = read_manifest(args.manifest)
        verify_manifest(manifest, args.folder, contents=args.contents)
        redrawn = make_split_manifest(args.folder, manifest["dataset"], manifest["seed"], manifest["train_fraction"])
    except DataLayoutError as error:
        print(f"{args.manifest}: FAILED: {error}")
        return 1
    same = redrawn["sha256"] == manifest["sha256"]
    print(f"{args.manifest}: all {len(manifest['train']) + len(manifest['test'])} files present under {args.folder}"
          + (", contents match" if args.contents else "")
          + ("; the folder redraws this exact split" if same else
             "; the folder redraws a different split (it holds other files than the manifest was made from)"))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
