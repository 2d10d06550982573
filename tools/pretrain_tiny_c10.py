"""Reproduce the shipped `norga-vit-tiny-c10` backbone: supervised ViT pretraining on CIFAR-10 (JPEG folders).

    python tools/pretrain_tiny_c10.py CIFAR10_JPG_DIR OUT_PREFIX [--epochs N]

CIFAR10_JPG_DIR holds train/<class>/*.jpg and test/<class>/*.jpg (../shared/data/cifar10/cifar10-jpg.tar.gz
extracted). Writes OUT_PREFIX.safetensors and OUT_PREFIX.json.
"""

import argparse
from pathlib import Path

import torch

from norga.data.folders import read_image_folder
from norga.pretrain import PretrainConfig, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    args = parser.parse_args()
    train_set, test_set, _ = read_image_folder(args.data)  # decoded once into memory (fits the default budget)
    train = (train_set.images, torch.tensor(train_set.targets))
    test = (test_set.images, torch.tensor(test_set.targets))
    print(f"loaded {len(train[1])} training and {len(test[1])} test images", flush=True)
    card = pretrain(PretrainConfig(epochs=args.epochs), train, test, args.out, "CIFAR-10 (JPEG, ../shared/data)",
                    log=lambda line: print(line, flush=True))
    print(card, flush=True)


if __name__ == "__main__":
    main()
