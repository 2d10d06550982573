"""Mixed precision: whether a device computes bf16 natively, and what ``amp: auto`` resolves to.

On a CPU without AVX512-BF16 / AMX (AVX2 only) bf16 matmuls are emulated and much slower than fp32
(measured on an AVX2 EPYC: fp32 linear ~147 GFLOP/s, bf16 ~18), so ``auto`` picks bf16 only where
the hardware has it.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from norga.nn import PromptedViT

log = logging.getLogger(__name__)

AMP_MODES = ("none", "bf16", "auto")
#: /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX, ARM (aarch64 "Features") bf16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: measured slowdown of emulated bf16 vs fp32 linear layers on an AVX2 CPU (the warning quotes it).
EMULATED_BF16_SLOWDOWN = 8


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags listed in `cpuinfo` (x86 ``flags``, ARM ``Features``); empty when unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16(device: torch.device | str) -> bool:
    """True when `device` computes bf16 natively: CUDA when it says so, a CPU with AVX512-BF16 / AMX (or ARM bf16).

    Other devices (mps ...) count as not native, so ``auto`` keeps them in fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probe = getattr(torch._C._cpu, "_is_avx512_bf16_supported", None)  # absent in some torch builds
    if probe is not None and probe():
        return True
    amx = getattr(torch._C._cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    return bool(BF16_CPU_FLAGS & cpu_flags())


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """``none`` or ``bf16`` for `amp` on `device`: ``auto`` is bf16 only where native; a slow bf16 is warned about."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {list(AMP_MODES)}, got {amp!r}")
    if amp == "none":
        return amp
    native = native_bf16(device)
    if amp == "auto":
        return "bf16" if native else "none"
    if not native:
        _warn_emulated(str(torch.device(device)))
    return amp


def prepare_for_bf16(model: PromptedViT) -> None:
    """Ready `model` for bf16 autocast: its frozen matmul weights held in bf16 (else autocast re-casts them at every
    forward), and every block's attention computed by norga's prefix kernels (`install_prefix_layers`; a block given
    no prefix computes plain attention). In bf16 on CPU those run an explicit bf16 attention whose backward is ~2x
    faster than the flash kernel's there (`norga.nn.prefix_kernels`); elsewhere plain attention stays SDPA."""
    model.hold_frozen_weights_in(torch.bfloat16)
    model.install_prefix_layers(range(model.depth))


@cache  # once per process and device (`norga compare` builds many runs)
def _warn_emulated(device: str) -> None:
    log.warning("amp=bf16 on %s: bf16 on this device is emulated and ~%dx slower than fp32; use amp=none or amp=auto",
                device, EMULATED_BF16_SLOWDOWN)
