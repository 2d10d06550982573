"""Test harness only: make norga's native-bf16 probe answer True, to see what `amp: auto` does on an AVX-512 BF16 CPU."""
import torch

torch._C._cpu._is_avx512_bf16_supported = lambda: True
