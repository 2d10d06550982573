"""5-Datasets: SVHN, MNIST, CIFAR-10, notMNIST and Fashion-MNIST as five tasks of ten classes.

As the official code: the dataset order is ``random.seed(seed); random.shuffle(list)`` of the list below
(seed 42 -> NotMNIST, MNIST, CIFAR10, FashionMNIST, SVHN) and the labels of the dataset at position i are
offset by 10·i. Each dataset gets its own transform (CIFAR-style for CIFAR-10 only); the official bug that
carries the CIFAR transform over to every later dataset (NORGA_SPEC P6) is reproduced only with
``transform_carryover=True``.
"""

from __future__ import annotations

import random

OFFICIAL_ORDER = ["SVHN", "MNIST", "CIFAR10", "NotMNIST", "FashionMNIST"]  # before the seeded shuffle
SOURCE_OF = {"SVHN": "svhn", "MNIST": "mnist", "CIFAR10": "cifar10", "NotMNIST": "notmnist", "FashionMNIST": "fashion-mnist"}
CIFAR_STYLE = {"CIFAR10"}


def dataset_order(seed: int, shuffle: bool = True) -> list[str]:
    """The official code's dataset order for `seed`."""
    order = list(OFFICIAL_ORDER)
    if shuffle:
        random.seed(seed)
        random.shuffle(order)
    return order


def cifar_style_flags(order: list[str], transform_carryover: bool) -> list[bool]:
    """Whether each dataset in `order` gets the CIFAR transforms; with the carry-over bug, every dataset from
    CIFAR-10 on does (the official loop reassigns the transform at CIFAR-10 and never resets it)."""
    flags, carried = [], False
    for name in order:
        carried = carried or (transform_carryover and name in CIFAR_STYLE)
        flags.append(name in CIFAR_STYLE or carried)
    return flags
