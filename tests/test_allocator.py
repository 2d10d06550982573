"""The C allocator keeps freed memory for reuse (`norga.runtime.allocator`): a step's activations come from the heap
and stay there when freed, instead of fresh pages from the kernel at every step."""

import subprocess
import sys

import pytest

#: a 20 MB tensor (the size of a ViT-B activation at batch 8) allocated, touched and freed; glibc's own statistics
#: (mallinfo2) before, while it lives and after: bytes in mmapped blocks, heap size, free bytes kept in the heap
ONE_ACTIVATION = """
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from norga.runtime.allocator import keep_freed_memory
    print(keep_freed_memory())
else:
    print("default")
before = libc.mallinfo2()
tensor = torch.empty(5 << 20)
tensor.fill_(1.0)
during = libc.mallinfo2()
del tensor
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, during.arena, after.arena, after.fordblks)
"""
MB = 1 << 20


def one_activation(mode: str) -> tuple[str, dict[str, int]]:
    out = subprocess.run([sys.executable, "-c", ONE_ACTIVATION, mode], capture_output=True, text=True, check=True)
    answer, numbers = out.stdout.split("\n", 1)
    names = ("mmapped", "heap_during", "heap_after", "free_in_heap_after")
    return answer, dict(zip(names, map(int, numbers.split())))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and mallinfo2 are glibc's (Linux)")
def test_a_freed_activation_comes_from_the_heap_and_stays_there_for_the_next_step():
    answer, kept = one_activation("keep")
    assert answer == "True"
    assert kept["mmapped"] == 0  # served from the heap, not as fresh pages of its own
    assert kept["heap_after"] == kept["heap_during"] and kept["free_in_heap_after"] >= 20 * MB  # kept for reuse
    _, default = one_activation("default")  # what it changes: glibc's defaults map such a block afresh each time
    assert default["mmapped"] >= 20 * MB and default["free_in_heap_after"] < 20 * MB
