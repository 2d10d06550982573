"""The C allocator keeps freed memory for reuse (`norga.runtime.allocator`), so steps stop faulting pages in."""

import subprocess
import sys

import pytest

#: allocates, touches and frees blocks of 10-20 MB as a training step's activations, three rounds; prints the
#: minor page faults of each round
ROUNDS = """
import resource, sys, torch
from norga.runtime.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "default")
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for round in range(3):
    before = faults()
    for n in (3_000_000, 5_000_000, 2_500_000, 4_000_000):
        a = torch.empty(n); a.fill_(1.0); b = torch.empty(n // 2); b.fill_(2.0); del a, b
    print(faults() - before)
"""
PAGES_PER_ROUND = sum(n + n // 2 for n in (3_000_000, 5_000_000, 2_500_000, 4_000_000)) * 4 // 4096


def rounds(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True).stdout
    first, *faults = out.split()
    return first, [int(count) for count in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    answer, kept = rounds("keep")
    assert answer == "True"
    assert kept[2] < PAGES_PER_ROUND // 100, kept  # warm: the blocks come back from the heap, no new pages
    _, default = rounds("default")  # what it removes: glibc's defaults fault a good part in again every round
    assert default[2] > 10 * max(kept[2], 1), (default, kept)

