"""CIFAR's python batch files (cifar-10-batches-py, cifar-100-python) read without running code.

Those files are pickles of dicts of lists, strings, bytes, ints and one uint8 numpy array. A plain
`pickle.load` would call whatever a crafted file names; this reader admits only the globals numpy needs to
rebuild an array (and the one Python 2 pickles use for bytes), and refuses a file that names any other.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from norga.data.errors import DataLayoutError

#: Every global a real CIFAR batch file (or one re-pickled by current Python and numpy) refers to.
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),  # pickle protocols <= 4
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
})
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise _Refused(module, name)
        return super().find_class(module, name)


def load_cifar_batch(path: Path) -> Any:
    """The object pickled in CIFAR batch file `path` (strings decoded as latin-1, as torchvision reads them)."""
    try:
        with open(path, "rb") as handle:
            return _DataOnlyUnpickler(handle, encoding="latin1").load()
    except _Refused as refused:
        raise DataLayoutError(f"refusing to read {path}: it refers to {refused.global_name}, which no CIFAR batch "
                              f"file holds (a pickle that would run code); replace it with the original from "
                              f"{CIFAR_URL}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DataLayoutError(f"cannot read {path}: not a CIFAR batch file or truncated ({error}); download it "
                              f"again from {CIFAR_URL}") from error
