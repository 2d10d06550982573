"""`norga pretrain`: supervised pretraining of a small timm ViT; writes safetensors + a JSON card."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain a small ViT on a labelled dataset (writes OUT.safetensors and OUT.json)",
        description="Supervised pretraining, e.g. the shipped norga-vit-tiny-c10: "
        "norga pretrain cifar10 --data-root ../shared/data --out norga-vit-tiny-c10 --epochs 5",
    )
    parser.add_argument("dataset", help="a benchmark source name: cifar10, cifar100, fashion-mnist, mnist, imagefolder")
    parser.add_argument("--data-root", help="data root (else $NORGA_DATA)")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.safetensors and OUT.json")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arch", default="vit_tiny_patch16_224")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import torch

    from norga.config import ConfigError
    from norga.data import locate
    from norga.data.benchmark import SOURCES
    from norga.pretrain import PretrainConfig, pretrain

    path = locate(args.dataset, args.data_root, download=False)
    train, test, _ = SOURCES[args.dataset].read(path)
    tensors = []
    for split in (train, test):
        images = split.images if isinstance(split.images, torch.Tensor) else torch.stack([split[i][0] for i in range(len(split))])
        if images.shape[-1] != args.img_size:
            raise ConfigError(f"images are {images.shape[-1]} px but --img-size is {args.img_size}: pass "
                              f"--img-size {images.shape[-1]}")
        tensors.append((images, torch.tensor(split.targets)))
    config = PretrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            timm_kwargs={"img_size": args.img_size, "patch_size": args.patch_size, "depth": args.depth})
    card = pretrain(config, tensors[0], tensors[1], args.out, f"{args.dataset} ({path})")
    print(f"test accuracy {card['test_accuracy']}% after {card['wall_seconds']} s -> {args.out}.safetensors")
    return 0
