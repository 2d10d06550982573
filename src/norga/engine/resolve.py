"""A requested `RunConfig` resolved once into the one that runs: its device, its precision, its data root.

`resolve_config` decides what ``auto`` and a missing or relative data root mean here, and returns a new config
(the caller's is left as it was): that config is what the engine runs and what the run directory's config.yaml
records; `ResolvedConfig.precision` keeps what was asked for beside what it became, for environment.json.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from norga.config import RunConfig
from norga.data import check_benchmark_data
from norga.runtime.precision import native_bf16, resolve_amp


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available: use --set device=cpu")
    return torch.device(name)


@dataclass(frozen=True)
class ResolvedConfig:
    """A run's config as it runs, and what resolving it decided."""

    config: RunConfig  # amp is bf16 or none (the engine knows only those), data.root absolute where data was found
    device: torch.device
    precision: dict[str, Any]  # amp_requested, native_bf16, compile, amp: environment.json's precision record
    data_located: bool  # False: resolved for task data the caller supplies (`build_run(..., tasks=...)`)


def resolve_config(config: RunConfig, *, locate_data: bool = True) -> ResolvedConfig:
    """`config` resolved for this machine, in a new config: the device, ``amp`` (``auto`` -> ``bf16`` where the
    device computes bf16 natively, else ``none``) and, when `locate_data`, the benchmark's data looked for (before
    anything slow, such as a backbone download, is started) and ``data.root`` set to the absolute root it was found
    under, so a run resumes without the environment. Call it once per run; `build_run` builds from its result."""
    device = resolve_device(config.device)
    resolved = copy.deepcopy(config)  # shares nothing with the caller's config
    resolved.amp = resolve_amp(config.amp, device)
    if locate_data:
        resolved.data.root = check_benchmark_data(config.data)
    precision = {"amp_requested": config.amp, "native_bf16": native_bf16(device), "compile": config.compile,
                 "amp": resolved.amp}
    return ResolvedConfig(resolved, device, precision, locate_data)
