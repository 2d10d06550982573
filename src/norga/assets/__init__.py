"""Files shipped with the package: the small pretrained backbone of the offline quickstart and its card."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: SHA-256 of every shipped weight file; loading checks it.
SHIPPED_SHA256 = {"norga-vit-tiny-c10": "28466d2d8109e351ef8076cf345712fa0be86a306e875add29144158bdd90c1a"}


def shipped_weights(name: str) -> Path | None:
    """The shipped ``<name>.safetensors``, or None when the package has no weights of that name."""
    path = Path(str(resources.files(__name__).joinpath(f"{name}.safetensors")))
    return path if path.is_file() else None
