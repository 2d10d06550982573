"""A short check for a machine with one CUDA GPU (under 5 minutes): prefix attention correct there, and the
suite's steps as fractions of that GPU's measured matmul peak.

1. Correctness: every fused prefix-attention kernel ("auto", "explicit", "bias", "flex", "sdpa" for the identity gate)
   against the fp64 reference on the same inputs, outputs and all gradients, in fp32 (TF32 off) and bf16; in
   bf16 each kernel's error is compared with the reference path's own under autocast (the bound the CPU tests use).
2. Attention alone, forward + backward at ViT-B/16 shapes: reference vs each kernel, ms (CUDA-synchronised medians).
3. The suite's step rows on the GPU: reference (fp32) and fast (bf16 autocast where the GPU has bf16) ms and
   images/s, and both as fractions of the matmul peak of their dtype measured in this run (8192² products).

Uses the machine's own PyTorch with this checkout's ``src`` on ``PYTHONPATH``; writes ``gpu_check.json`` and
``gpu_check.txt`` into ``--out``. ``--device cpu`` runs the same on the CPU (smaller sizes with ``--quick``) to
show the script works where no GPU is lent. Usage:

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _timing import machine, machine_line

from norga.nn import (
    IdentityGate,
    NoRGaGate,
    fused_prefix_attention,
    reference_prefix_attention,
)

BF16_ROUNDING = 2.0**-8
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(steps: dict, device: str, warmup: int, repeats: int) -> dict:
    """Interleaved medians, synchronising the device around every call."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


# ------------------------------------------------------------------------------------- 1. correctness
def _case(device: str, dtype: torch.dtype, gate_kind: str, seed: int, shape=(4, 6, 50, 12, 32)):
    batch, heads, tokens, length, dim = shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gate = IdentityGate() if gate_kind == "identity" else NoRGaGate(gate_kind)
    if not gate.is_identity:
        with torch.no_grad():
            for param in gate.parameters():
                param.uniform_(0.3, 1.5, generator=generator)
    gate = gate.to(device)
    tokens_qkv = [torch.randn(batch, heads, tokens, dim, generator=generator).to(device, dtype) for _ in range(3)]
    prefixes = [torch.randn(batch, heads, length, dim, generator=generator).to(device) for _ in range(2)]
    grad_out = torch.randn(batch, heads, tokens, dim, generator=generator).to(device, dtype)
    return gate, tokens_qkv, prefixes, grad_out


def _run(attend, gate, qkv, prefixes, grad_out, autocast: bool, to=None):
    inputs = [t.detach().clone() if to is None else t.detach().to(to) for t in (*qkv, *prefixes)]
    for t in inputs:
        t.requires_grad_()
    params = list(gate.gate_parameters())
    with torch.autocast(qkv[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        out = attend(*inputs, gate, inputs[0].shape[-1] ** -0.5)
    grads = torch.autograd.grad(out, inputs + params, grad_out.to(out.dtype))
    return [out, *grads]


def _relative(value, exact) -> float:
    exact = exact.detach()
    return float((value.detach().double() - exact).norm() / exact.norm().clamp_min(1e-300))


def correctness(device: str) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for gate_kind in ("tanh", "sigmoid", "identity"):
            kernels = (["auto", "explicit", "bias"] + (["sdpa"] if gate_kind == "identity" else [])
                       + (["flex"] if device != "cpu" else []))  # flex has no backward on CPU
            for seed in range(2):
                gate, qkv, prefixes, grad_out = _case(device, dtype, gate_kind, seed)
                gate64 = _to_double(gate)
                rounded = [p.to(dtype).double() for p in prefixes]  # what both paths multiply
                exact = _run(reference_prefix_attention, gate64, [t.double() for t in qkv], rounded, grad_out.double(),
                             autocast=False)
                reference = _run(reference_prefix_attention, gate, qkv, prefixes, grad_out, autocast=dtype != torch.float32)
                ref_errors = [_relative(r, e) for r, e in zip(reference, exact)]
                for kernel in kernels:
                    got = _run(lambda *a, kernel=kernel: fused_prefix_attention(*a, kernel=kernel), gate, qkv, prefixes,
                               grad_out, autocast=False)
                    errors = [_relative(g, e) for g, e in zip(got, exact)]
                    if dtype == torch.float32:
                        bounds = [1e-4] * len(errors)  # fp32 products against fp64: ~1e-6 measured on CPU
                    else:  # tensors: as accurate as the reference under autocast; gate scalars: 2x it or 10 %
                        bounds = [1.5 * r + BF16_ROUNDING / 4 for r in ref_errors[:5]] + [
                            max(2 * r, 0.1) for r in ref_errors[5:]]
                    passed = all(e <= b for e, b in zip(errors, bounds))
                    results.append({"dtype": str(dtype), "gate": gate_kind, "kernel": kernel, "seed": seed,
                                    "max_error": max(errors), "reference_max_error": max(ref_errors), "pass": passed})
    failed = [r for r in results if not r["pass"]]
    say(f"1. correctness on {device}: {len(results) - len(failed)} of {len(results)} kernel/dtype/gate/seed cases "
        f"within bounds" + ("" if not failed else f"; FAILED: {failed}"))
    return results


def _to_double(gate):
    import copy

    return copy.deepcopy(gate).double()


# --------------------------------------------------------------------------------- 2. attention timing
def _attention_steps(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict:
    """Forward + backward of the reference (under autocast in bf16) and of each fused kernel, on one input."""
    batch, heads, tokens, length, dim = shape
    gate = NoRGaGate("tanh").to(device)
    qkv = [torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    prefixes = [torch.randn(batch, heads, length, dim, device=device, requires_grad=True) for _ in range(2)]
    grad_out = torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype)

    def step(attend, autocast=False, **kwargs):
        def run():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                out = attend(*qkv, *prefixes, gate, dim**-0.5, **kwargs)
            out.backward(grad_out.to(out.dtype))
        return run

    steps = {"reference": step(reference_prefix_attention, autocast=dtype == torch.bfloat16)}
    for kernel in ("auto", "explicit", "bias"):
        steps[kernel] = step(fused_prefix_attention, kernel=kernel)
    if torch.device(device).type == "cuda":  # flex attention is fused only when compiled (eager is its reference)
        steps["flex (compiled)"] = step(torch.compile(functools.partial(fused_prefix_attention, kernel="flex")))
    return steps


def attention_timing(device: str, quick: bool) -> dict:
    shape = ((2 if quick else 64), 12, 197, 20, 64)
    rows = {str(dtype): median_ms(_attention_steps(device, dtype, shape), device, warmup=2, repeats=3 if quick else 20)
            for dtype in (torch.float32, torch.bfloat16)}
    say(f"2. attention fwd+bwd, B {shape[0]}, 12 heads, 197 tokens, Lp {shape[3]}, tanh gate (ms, medians):")
    for dtype, ms in rows.items():
        say(f"   {dtype}: " + ", ".join(f"{name} {value:.2f}" for name, value in ms.items()))
    return rows


# ----------------------------------------------------------------------------------- 3. suite's steps
def matmul_peak(device: str, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * size**3 / best / 1e9


def suite_steps(device: str, quick: bool, amp: bool) -> dict:
    from bench_core import train_step
    from bench_suite import ROWS, count_flops, inference_step, smope_step

    size = 1024 if quick else 8192
    peak = {"fp32": matmul_peak(device, torch.float32, size), "bf16": matmul_peak(device, torch.bfloat16, size)}
    dtype = "bf16" if amp else "fp32"
    say(f"3. matmul peak on {device} ({size}²): fp32 {peak['fp32']:.0f} GFLOP/s (TF32 off), bf16 {peak['bf16']:.0f}; "
        f"fast path amp {'bf16' if amp else 'none'}")
    say("| row | batch | reference ms | fast ms | fast/ref | reference % of fp32 peak | fast % of its peak |")
    say("|---|---|---|---|---|---|---|")
    rows = {}
    for row in ("train_vitb", "train_tiny", "infer_vitb", "infer_tiny", "smope_vitb"):
        label, kind, model_kind, batch, quick_batch, _ = ROWS[row]
        batch = quick_batch if quick else batch * (4 if device.startswith("cuda") else 1)
        maker = smope_step if row == "smope_vitb" else inference_step if kind == "infer" else train_step
        steps = {"reference": maker("reference", model_kind, batch=batch, device=device)[0],
                 "fast": maker("fused", model_kind, batch=batch, amp=amp, device=device)[0]}
        flops = count_flops(steps["reference"]) or float("nan")
        ms = median_ms(steps, device, warmup=2, repeats=3 if quick else 10)
        ref_fraction = flops / (ms["reference"] / 1e3) / (peak["fp32"] * 1e9)
        fast_fraction = flops / (ms["fast"] / 1e3) / (peak[dtype] * 1e9)
        rows[row] = {"batch": batch, "ms": ms, "flops": flops, "reference_fraction": ref_fraction,
                     "fast_fraction": fast_fraction}
        say(f"| {label} | {batch} | {ms['reference']:.1f} | {ms['fast']:.1f} | {ms['reference'] / ms['fast']:.2f}x | "
            f"{ref_fraction:.0%} | {fast_fraction:.0%} ({dtype}) |")
    return {"peak_gflops": peak, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.txt")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to show the script works")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (with --device cpu)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to this PyTorch; run with --device cpu to check the script", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from norga.runtime.precision import native_bf16

    start = time.perf_counter()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none (CPU run)"
    say(f"{machine_line(machine(), args.threads)}; device {args.device}: {gpu}; torch {torch.__version__}")
    amp = native_bf16(args.device)
    record = {"device": args.device, "gpu": gpu, "correctness": correctness(args.device),
              "attention_ms": attention_timing(args.device, args.quick), "steps": suite_steps(args.device, args.quick, amp),
              "load_average_after": os.getloadavg()}
    say(f"done in {time.perf_counter() - start:.0f} s")
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2))
    (out / "gpu_check.txt").write_text("\n".join(LINES) + "\n")
    if not all(case["pass"] for case in record["correctness"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
