"""Timing and memory helpers shared by the benchmark scripts (bench_core, bench_pipeline, bench_suite).

Timings drift by tens of percent over seconds on a shared CPU, so steps are timed *interleaved*
(A, B, A, B, ...) and summarised by medians. Peak memory is the peak RSS above the RSS after set-up,
which only means something in a fresh process: `in_subprocess` runs one measurement per process.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

#: ISA extensions that decide this project's speed, in the order a reader compares machines by.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The machine a benchmark ran on: CPU model, the ISA extensions of `ISA_FLAGS` it has, whether norga sees
    native bf16, torch's kernel capability, logical CPUs and the load average when asked (other work sharing it)."""
    from norga.runtime.precision import cpu_flags, native_bf16

    try:
        with open(cpuinfo) as handle:
            models = [line.partition(":")[2].strip() for line in handle if line.startswith("model name")]
    except OSError:
        models = []
    flags = cpu_flags(cpuinfo)
    return {"cpu": models[0] if models else "unknown", "isa": [flag for flag in ISA_FLAGS if flag in flags],
            "native_bf16": native_bf16("cpu"), "capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cpus": os.cpu_count(), "load_average": [round(value, 2) for value in os.getloadavg()],
            "torch": torch.__version__}


def machine_line(facts: dict, threads: int) -> str:
    """One header line naming the machine of `machine()` and the threads used."""
    return (f"machine: {facts['cpu']}, ISA {' '.join(facts['isa']) or 'none of ' + ' '.join(ISA_FLAGS)}, "
            f"native bf16 {'yes' if facts['native_bf16'] else 'no'}, torch {facts['torch']} ({facts['capability']}), "
            f"{threads} of {facts['logical_cpus']} CPUs, load average {facts['load_average'][0]:.2f}")


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB since it started or since `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) again from the current RSS, so set-up transients do not count (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def median_ms(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each step, calls alternating between the steps."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_mb(step: Callable[[], object], warmup: int) -> float:
    """Peak RSS above the current RSS while running `step` ``warmup + 1`` times (call in a fresh process)."""
    reset_peak_rss()  # a set-up transient (e.g. fp32 weights before their bf16 copy) is not the step's
    base = rss_mb()
    for _ in range(warmup + 1):
        step()
    return peak_rss_mb() - base


def matmul_gflops(dtype: torch.dtype, size: int, min_seconds: float = 0.5, min_repeats: int = 2) -> float:
    """Achieved GFLOP/s of a square ``size``² matmul in `dtype` (best of the timed calls): the machine's peak."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool, packing buffers
    times: list[float] = []
    while len(times) < min_repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def in_subprocess(script: str, threads: int, function: str, timeout: float | None = None, **kwargs) -> dict:
    """Run ``script --threads N --call {"function": ..., **kwargs}`` and return the JSON it prints last."""
    command = [sys.executable, script, "--threads", str(threads), "--call", json.dumps({"function": function, **kwargs})]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{function}({kwargs}) failed in a subprocess:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
