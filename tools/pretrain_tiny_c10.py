"""Reproduce the shipped `norga-vit-tiny-c10` backbone: supervised ViT pretraining on CIFAR-10 (JPEG folders).

    python tools/pretrain_tiny_c10.py CIFAR10_JPG_DIR OUT_PREFIX [--epochs N]

CIFAR10_JPG_DIR holds train/<class>/*.jpg and test/<class>/*.jpg (../shared/data/cifar10/cifar10-jpg.tar.gz
extracted). Writes OUT_PREFIX.safetensors and OUT_PREFIX.json.
"""

import argparse
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from norga.pretrain import PretrainConfig, pretrain


def load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            images.append(decode_image(str(file), mode=ImageReadMode.RGB))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    train, test = load_split(args.data / "train"), load_split(args.data / "test")
    print(f"loaded {len(train[1])} training and {len(test[1])} test images", flush=True)
    card = pretrain(PretrainConfig(epochs=args.epochs), train, test, args.out, "CIFAR-10 (JPEG, ../shared/data)",
                    log=lambda line: print(line, flush=True))
    print(card, flush=True)


if __name__ == "__main__":
    main()
