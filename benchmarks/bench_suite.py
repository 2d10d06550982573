"""Scale and speed: the fast path as a fraction of this machine's matmul peak, beside the reference path.

Reference path = how the official code computes: explicit attention (``attention_impl="reference"``),
fp32, no caching. Fast path = the project's best settings on this device: fused attention, bf16 autocast
only where the CPU has native bf16, frozen-feature caching (and memoised prompted test features when the
config has ``cache_prompted_features``), ``torch.compile`` only with ``--compile``.

Targets are fractions of the matmul peak measured at the start of the same run, for the dtype each path computes
in (the fast path: bf16 where the CPU has native bf16, else fp32; the reference: fp32), so they are checkable on
any machine. Work is counted with `torch.utils.flop_counter.FlopCounterMode` on the reference step (the same
products as the fast one) and, for the pipeline, on the fast run itself. The ratio to the reference path (the
stand-in for the official code) is a column, not a target.

Every measurement runs in its own subprocess; speed rows time reference and fast interleaved in one
process and take medians; peak memory (peak RSS above the RSS after set-up) comes from separate
processes, one per path; pipeline runs alternate reference / fast processes. Usage:

    python benchmarks/bench_suite.py [--quick] [--threads 2] [--only ROW] [--out results.json]
                                     [--compile] [--amp auto|bf16|none] [--profile ROW]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import in_subprocess, machine, machine_line, matmul_gflops, median_ms, peak_mb, peak_rss_mb, rss_mb
from bench_core import MODEL_KINDS, autocast, compile_model, prompted_model, train_step

ROWS = {  # name: (label, kind, model kind, batch, quick batch, target: fraction of the peak of the fast path's dtype)
    "train_vitb": ("training step ViT-B/16@224 (Lp 20, tanh)", "train", "vit_base_224", 8, 1, 0.8),
    "train_tiny": ("training step ViT-Ti@32 (Lp 5, tanh)", "train", "vit_tiny_32", 64, 16, 0.8),
    "infer_vitb": ("inference ViT-B/16@224 (task id + prompted)", "infer", "vit_base_224", 16, 1, 0.8),
    "infer_tiny": ("inference ViT-Ti@32 (task id + prompted)", "infer", "vit_tiny_32", 256, 64, 0.8),
    # the driver's own work (batches, evaluation bookkeeping, small TII and head steps) is not matrix products
    "pipeline": ("NoRGa pipeline, 5 tasks x 2 classes, ViT-Ti@32", "pipeline", "vit_tiny_32", 0, 0, 0.5),
    # LoRA rows: the method's training step (fast) against the plain frozen-backbone forward + backward of the same
    # ViT (reference), same precision and batch; the target is a ratio of their times, not a fraction of the peak
    "inflora_vitb": ("InfLoRA step ViT-B/16@224 (task 5, r 10) vs frozen fwd+bwd", "lora", "vit_base_224", 8, 1, 1.25),
    "sdlora_vitb": ("SD-LoRA step ViT-B/16@224 (task 5, r 10) vs frozen fwd+bwd", "lora", "vit_base_224", 8, 1, 1.25),
    # SMoPE's evaluation: one routed prompted pass (no task-identity pass), scored as the other inference rows
    "smope_vitb": ("SMoPE inference ViT-B/16@224 (one routed pass)", "infer", "vit_base_224", 16, 1, 0.8),
    # RanPAC's head on one task of ViT-B features (batch: samples); reported, no target: its λ search and solve are
    # LAPACK factorisations the FLOP counter does not see. Reference: the official float32 numerics (one LU solve
    # per λ); fast: norga's float64 statistics, one eigendecomposition for every λ, a Cholesky solve
    "ranpac": ("RanPAC head, one task of 5000 ViT-B features (M 10000): statistics, λ search, solve", "ranpac", None,
               5000, 500, None),
}
RANPAC_WIDTH, RANPAC_DIM, RANPAC_QUICK_DIM, RANPAC_CLASSES = 768, 10000, 1000, 10
LORA_TASK, LORA_RANK = 4, 10  # the step trains task 5's delta with tasks 1-4's attached (10 tasks preallocated)
VIT_B_FORWARD_GFLOP = 2 * 17.6  # per 224 px image (17.6 GMAC); frozen-weight backward ~ the same again


# ----------------------------------------------------------------------------------- device
# --------------------------------------------------------------- measurements (subprocess)
def inference_step(impl: str, model_kind: str, batch: int, amp: bool = False, compile: bool = False,
                   device: str = "cpu"):
    """Task-identity pass (frozen forward -> TII MLP) then the prompted pass with each sample's predicted slot."""
    from norga.methods.hide.task_identity import TaskIdentityModel

    model, size = prompted_model(impl, model_kind, amp=amp, device=device)
    model.eval()
    tii = TaskIdentityModel(model.host.embed_dim, 100).to(device).eval()
    class_to_task = torch.arange(100, device=device) // 10
    forward = compile_model(model) if compile else model
    images = torch.randn(batch, 3, size, size, device=device)

    def step():
        with torch.inference_mode(), autocast(amp, device):
            tasks = class_to_task[tii(forward.host.forward_features(images).float()).argmax(dim=1)]
            return forward(images, tasks).logits.float().argmax(dim=1)

    return step, batch


def smope_step(impl: str, model_kind: str, batch: int, amp: bool = False, device: str = "cpu"):
    """One SMoPE evaluation forward at its official structure, randomly initialised: 25 experts per head in blocks
    0-5, top-5 by the mean query, never-used experts excluded (half the pool marked unused), head; returns logits."""
    from norga.methods.smope.experts import ExpertPool
    from norga.nn import PromptedViT
    from norga.runtime.precision import prepare_for_bf16

    name, kwargs, _, size, _ = MODEL_KINDS[model_kind]
    host = PromptedViT.from_timm(name, timm_kwargs=kwargs, num_classes=100, attention_impl=impl).to(device).eval()
    if amp:
        prepare_for_bf16(host)
    blocks = list(range(min(6, host.depth)))
    host.install_prefix_layers(blocks)
    pool = ExpertPool(blocks, host.num_heads, 25, host.head_dim, 5, torch.Generator().manual_seed(0)).to(device)
    pool.usage[..., ::2] = 1  # half the experts used: the exclusion penalty is live
    penalties = pool.evaluation_penalties(2.0)
    images = torch.randn(batch, 3, size, size, device=device)

    def step():
        with torch.inference_mode(), autocast(amp, device):
            return host(images, attachments=pool.attachments(penalties)).logits.float()

    return step, batch


def ranpac_head(official: bool, samples: int, dim: int) -> dict:
    """Seconds (statistics, λ search, solve, total) and peak memory of RanPAC's head on one task of synthetic ViT-B
    features (clustered Gaussians; no backbone needed), with the official float32 numerics or norga's."""
    from norga.methods.ranpac.ridge_head import RidgeHead, RidgeSettings
    from norga.runtime.features import FeatureSet

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(RANPAC_CLASSES, RANPAC_WIDTH, generator=generator)
    labels = torch.arange(RANPAC_CLASSES).repeat_interleave(samples // RANPAC_CLASSES)
    features = centres[labels] + torch.randn(len(labels), RANPAC_WIDTH, generator=generator)
    head = RidgeHead(RANPAC_WIDTH, RANPAC_CLASSES, RidgeSettings(projection_dim=dim, official_float32=official), seed=0,
                     stream="timing")
    base = rss_mb()
    head.add_task(0, FeatureSet(features, labels), list(range(RANPAC_CLASSES)))
    record = head.record()
    seconds = record["tasks"][0]["seconds"]
    return {**seconds, "seconds": sum(seconds.values()), "peak_mb": peak_rss_mb() - base,
            "statistics_dtype": record["statistics_dtype"]}


def lora_step(method: str | None, model_kind: str, batch: int, amp: bool = False, device: str = "cpu"):
    """One Adam step of `method`'s training ("inflora" / "sdlora": task `LORA_TASK`'s delta with the earlier ones
    attached, and a head) on a frozen ViT held as a run holds it (`prepare_for_bf16` under `amp`); `method` None: the
    plain frozen-backbone forward + backward of the same ViT, the head trained and the gradient taken down to the
    images, so the backward runs through every block as it must for a delta in block 0."""
    from norga.methods.lora.banks import InfLoRABank, SDLoRABank
    from norga.nn import PromptedViT
    from norga.runtime.precision import prepare_for_bf16

    name, kwargs, _, size, _ = MODEL_KINDS[model_kind]
    host = PromptedViT.from_timm(name, timm_kwargs=kwargs, num_classes=100).to(device)
    if amp:
        prepare_for_bf16(host)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    banks = {"inflora": lambda: InfLoRABank(10, host.depth, host.embed_dim, LORA_RANK),
             "sdlora": lambda: SDLoRABank(10, host.depth, host.embed_dim, LORA_RANK, 0.8)}
    params, attachments = list(host.head_parameters()), (lambda: None)
    if method is None:
        images.requires_grad_(True)
    else:
        bank = banks[method]().to(device)
        with torch.no_grad():
            for tensor in bank.buffers():
                tensor.normal_()
            for up in bank.up[:LORA_TASK]:
                up.normal_()
        params += bank.train_only(LORA_TASK)
        attachments = lambda: bank.attachments(LORA_TASK)  # noqa: E731 - rebuilt per step, as the method does
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(amp, device):
            logits = host(images, attachments()).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    return step, batch


def _step(row: str, impl: str, batch: int, amp: bool, compile: bool):
    """The step of `row` on path `impl`, in a process whose allocator keeps freed memory as every norga run's does
    (`norga.runtime.allocator`; both paths, since a speed row times them in one process)."""
    from norga.runtime.allocator import keep_freed_memory

    keep_freed_memory()
    kind, model_kind = ROWS[row][1], ROWS[row][2]
    if kind == "lora":  # reference: the frozen forward + backward; fast: the method's step, both in the run's precision
        return lora_step(None if impl == "reference" else row.split("_")[0], model_kind, batch, amp)[0]
    if row == "smope_vitb":
        return smope_step(impl, model_kind, batch, amp)[0]
    maker = inference_step if kind == "infer" else train_step
    return maker(impl, model_kind, batch=batch, amp=amp, compile=compile)[0]


def count_flops(step) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            step()
    except Exception:  # compiled graphs or kernels the counter cannot see
        return None
    return float(counter.get_total_flops())


def speed(row: str, batch: int, repeats: int, amp: bool, compile: bool, peak_sizes: dict | None = None) -> dict:
    """Interleaved median ms of reference and fast steps, the FLOPs of one reference step (the same work) and, with
    `peak_sizes` ({dtype name: size}), the matmul peak of each path's dtype measured beside the steps (`peak_probes`)."""
    dtypes = path_dtypes(row, amp)
    steps = {"reference": _step(row, "reference", batch, dtypes["reference"] == "bf16", False),
             "fast": _step(row, "fused", batch, amp, compile)}
    probes, rates = peak_probes({dtypes[which]: peak_sizes[dtypes[which]] for which in steps} if peak_sizes else {})
    ms = median_ms({**steps, **probes}, warmup=1 if repeats <= 3 else 2, repeats=repeats)
    result = {which: {"ms": ms[which], "images_per_s": batch / ms[which] * 1e3} for which in steps}
    result["reference"]["flops"] = count_flops(steps["reference"])  # explicit matmuls: the counter sees them all
    if rates:
        result["peaks_beside"] = {name: max(values) for name, values in rates.items()}
    return result


def path_dtypes(row: str, amp: bool) -> dict[str, str]:
    """The dtype each path of `row` computes in: the fast path bf16 under `amp`, the reference fp32 (the official
    code's), except in a LoRA row, which compares two steps in the run's own precision."""
    fast = "bf16" if amp else "fp32"
    return {"reference": fast if ROWS[row][1] == "lora" else "fp32", "fast": fast}


def peak_probes(sizes: dict[str, int]) -> tuple[dict, dict[str, list[float]]]:
    """Steps that each measure the matmul peak of a dtype ({name: square size}) when called, and the rates (GFLOP/s)
    they measure, to time between a row's steps: the peak then sees the machine as the steps see it (a machine that
    slows during a long suite slows both), where the peak of the suite's start may be minutes old."""
    rates: dict[str, list[float]] = {name: [] for name in sizes}

    def probe(name: str, size: int):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        return lambda: rates[name].append(matmul_gflops(dtype, size, min_seconds=0.1))

    return {f"peak {name}": probe(name, size) for name, size in sizes.items()}, rates


def memory(row: str, batch: int, which: str, warmup: int, amp: bool, compile: bool) -> dict:
    if which == "reference":
        step = _step(row, "reference", batch, path_dtypes(row, amp)["reference"] == "bf16", False)
    else:
        step = _step(row, "fused", batch, amp, compile)
    return {"peak_mb": peak_mb(step, warmup=warmup)}


PEAK_SIZES = {"fp32": (512, 1024, 2048), "bf16": (512, 1024, 2048)}
EMULATED_BF16_PEAK_SIZES = (256, 512)  # a 1024² bf16 product takes seconds where bf16 is emulated


def peaks(native_bf16: bool) -> dict:
    """This machine's matmul peak GFLOP/s per dtype: the best square product over `PEAK_SIZES` (the best size
    differs by dtype and CPU: fp32 at 2048² runs ~15 % below 1024² on an AVX-512 EPYC), and the sizes used."""
    sizes = {**PEAK_SIZES, **({} if native_bf16 else {"bf16": EMULATED_BF16_PEAK_SIZES})}
    result: dict = {"sizes": sizes, "best_size": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {size: matmul_gflops(dtype, size) for size in sizes[name]}
        result["best_size"][name] = max(rates, key=rates.get)
        result[name] = rates[result["best_size"][name]]
    return result


def pipeline_config(fast: bool, amp: bool, compile: bool, quick: bool):
    """The quickstart preset's shape (NoRGa, sigmoid gate, cached-feature TII) on the fast or reference settings."""
    from norga.config_io import load_config

    config = load_config("quickstart")
    config.seed = 1
    s = config.settings
    if quick:
        s.tii.train.epochs, s.tii.tap.epochs, s.wtp.train.epochs, s.wtp.tap.epochs = 1, 1, 1, 1
    config.attention_impl = "fused" if fast else "reference"
    config.cache_frozen_features = fast
    config.amp = "bf16" if fast and amp else "none"
    s.cache_prompted_features = fast
    config.compile = fast and compile
    return config


def _pipeline_tasks(quick: bool):
    from norga.synthetic import synthetic_tasks

    per_class = (8, 4) if quick else (64, 32)
    return synthetic_tasks(num_tasks=5, classes_per_task=2, train_per_class=per_class[0], test_per_class=per_class[1],
                           size=32)


def pipeline(which: str, amp: bool, compile: bool, quick: bool, count: bool = False, peak_size: int | None = None) -> dict:
    """One pipeline run: wall seconds, peak memory, frozen images encoded, FA and, with `peak_size`, the matmul peak of
    its dtype measured right after it; with `count`, instead the FLOPs of its matrix products (a separate, untimed run:
    the counter slows every op)."""
    from bench_pipeline import timed_run
    from torch.utils.flop_counter import FlopCounterMode

    config = pipeline_config(which == "fast", amp, compile, quick)
    tasks = _pipeline_tasks(quick)
    base = rss_mb()  # before the model and data exist: the pipeline's peak includes them
    with tempfile.TemporaryDirectory() as tmp:
        if count:
            with FlopCounterMode(display=False) as counter:
                timed_run(config, tasks, Path(tmp))
            return {"flops": float(counter.get_total_flops())}
        seconds, encoded, accuracy = timed_run(config, tasks, Path(tmp))
    result = {"seconds": seconds, "peak_mb": peak_rss_mb() - base, "encoded": encoded, "fa": accuracy}
    if peak_size:
        result["peak_gflops"] = matmul_gflops(torch.bfloat16 if config.amp == "bf16" else torch.float32, peak_size)
    return result


def profile(row: str, batch: int, amp: bool, compile: bool, quick: bool) -> dict:
    """torch.profiler top-15 ops by self CPU time of the fast path of `row`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if ROWS[row][1] == "pipeline":
        config, tasks = pipeline_config(True, amp, compile, quick), _pipeline_tasks(quick)
        from bench_pipeline import timed_run

        with tempfile.TemporaryDirectory() as tmp, torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            timed_run(config, tasks, Path(tmp))
    else:
        step = _step(row, "fused", batch, amp, compile)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
    return {"table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)}


FUNCTIONS = {"speed": speed, "memory": memory, "peaks": peaks, "pipeline": pipeline, "profile": profile,
             "ranpac_head": ranpac_head}


# -------------------------------------------------------------------------- orchestration
def measure_row(row: str, args, fast: dict, peaks: dict) -> dict:
    """All subprocess measurements of one row: speed (or pipeline wall time), peak memory per path, and the matmul
    peak of each path's dtype measured beside its steps or runs (at the best sizes of the start's `peaks`)."""
    kind, batch = ROWS[row][1], ROWS[row][4 if args.quick else 3]
    dtypes = path_dtypes(row, fast["amp"])
    if kind == "ranpac":  # one run per path, each in its own process (minutes each at M 10000)
        dim = RANPAC_QUICK_DIM if args.quick else RANPAC_DIM
        return {which: in_subprocess(__file__, args.threads, "ranpac_head", official=which == "reference", samples=batch,
                                     dim=dim) for which in ("reference", "fast")}
    if kind == "pipeline":
        runs: dict[str, list[dict]] = {"reference": [], "fast": []}
        for _ in range(1 if args.quick else args.pipeline_repeats):
            for which in runs:  # alternate processes: drift hits both paths alike
                runs[which].append(in_subprocess(__file__, args.threads, "pipeline", which=which, quick=args.quick,
                                                 peak_size=peaks["best_size"][dtypes[which]], **fast))
        result = {which: {key: statistics.median(run[key] for run in results) for key in results[0]}
                  for which, results in runs.items()}
        result["peaks_beside"] = {}
        for which, results in runs.items():  # the best each dtype showed right after its runs
            best = max(run["peak_gflops"] for run in results)
            result["peaks_beside"][dtypes[which]] = max(best, result["peaks_beside"].get(dtypes[which], 0.0))
        for which in runs:  # both counted: the fast path's is its work, the reference's shows what caching removed
            result[which].update(in_subprocess(__file__, args.threads, "pipeline", which=which, quick=args.quick,
                                               count=True, **fast))
        return result
    repeats = (2 if args.quick else 7) if MODEL_KINDS[ROWS[row][2]][3] == 224 else (3 if args.quick else 15)
    result = in_subprocess(__file__, args.threads, "speed", row=row, batch=batch, repeats=repeats,
                           peak_sizes=peaks["best_size"], **fast)
    for which in ("reference", "fast"):
        result[which].update(in_subprocess(__file__, args.threads, "memory", row=row, batch=batch, which=which,
                                           warmup=0 if args.quick else 1, **fast))
    result["batch"] = batch
    return result


def fractions(row: str, result: dict, peak: dict, dtype: str) -> tuple[float, float]:
    """The reference's and the fast path's achieved FLOP/s as fractions of `peak` (the row's, `row_peaks`) of the dtype
    each computes in (`path_dtypes`; fast `dtype`). Step rows count the reference step's work for both (the same
    products); the pipeline counts each run's own."""
    ref, fast = result["reference"], result["fast"]
    reference_dtype = path_dtypes(row, dtype == "bf16")["reference"]
    if ROWS[row][1] == "pipeline":
        return (ref["flops"] / ref["seconds"] / (peak[reference_dtype] * 1e9),
                fast["flops"] / fast["seconds"] / (peak[dtype] * 1e9))
    work = ref["flops"] or float("nan")
    return work / (ref["ms"] / 1e3) / (peak[reference_dtype] * 1e9), work / (fast["ms"] / 1e3) / (peak[dtype] * 1e9)


def row_peaks(result: dict, peak: dict) -> dict:
    """The peaks a row is scored against: those measured beside its steps where it has them, else the start's."""
    return {**peak, **result.get("peaks_beside", {})}


def verdict(row: str, result: dict, peak: dict, dtype: str) -> dict:
    """Reference / fast values, their ratio, both fractions of the peak, PASS/MISS against the target fraction
    and, for a MISS, what bounds it."""
    label, kind, _, _, _, target = ROWS[row]
    ref, fast = result["reference"], result["fast"]
    if kind == "ranpac":  # reported: times per part, no fraction (LAPACK work is not counted) and no target
        parts = ("statistics", "lambda_search", "solve")
        return {"row": row, "label": label, "reference": f"{ref['seconds']:.1f} s", "fast": f"{fast['seconds']:.1f} s",
                "ratio": ref["seconds"] / fast["seconds"], "reference_fraction": None, "fast_fraction": None,
                "dtype": "fp64", "peak_gflops": None, "target": "reported", "result": "-",
                "bound": "statistics / λ search / solve: reference " + " / ".join(f"{ref[p]:.1f}" for p in parts)
                         + " s, fast " + " / ".join(f"{fast[p]:.1f}" for p in parts) + " s",
                "ref_peak_mb": ref.get("peak_mb"), "fast_peak_mb": fast.get("peak_mb")}
    peak = row_peaks(result, peak)
    reference_fraction, fast_fraction = fractions(row, result, peak, dtype)
    if kind == "pipeline":
        values = (f"{ref['seconds']:.1f} s", f"{fast['seconds']:.1f} s")
        ratio = ref["seconds"] / fast["seconds"]
        bound = (f"{fast['flops'] / 1e9:.0f} GFLOP in {fast['seconds']:.1f} s (reference {ref['flops'] / 1e9:.0f}); "
                 f"frozen images encoded {ref['encoded']:.0f} -> {fast['encoded']:.0f}; small prompt-stage batches "
                 f"and the driver's own work: --profile pipeline")
    else:
        values = (f"{ref['images_per_s']:.1f} img/s", f"{fast['images_per_s']:.1f} img/s")
        ratio = fast["images_per_s"] / ref["images_per_s"]
        at_peak_ms = (ref["flops"] or float("nan")) / (peak[dtype] * 1e9) * 1e3
        bound = (f"{(ref['flops'] or float('nan')) / 1e9 / result['batch']:.1f} GFLOP/image: {fast['ms']:.0f} ms a step "
                 f"against {at_peak_ms:.0f} ms at the {dtype} peak; non-matmul ops and small products: --profile {row}")
    if kind == "lora":  # time of the method's step over the frozen forward + backward's, at most the target
        ratio = fast["ms"] / ref["ms"]
        passed = ratio <= target
        return {"row": row, "label": label, "reference": values[0], "fast": values[1], "ratio": ratio,
                "reference_fraction": reference_fraction, "fast_fraction": fast_fraction, "dtype": dtype,
                "peak_gflops": peak[dtype],
                "target": f"<= {target:.2f}x the frozen step's time", "result": "PASS" if passed else "MISS",
                "bound": "" if passed else f"{fast['ms']:.0f} ms against {ref['ms']:.0f} ms: --profile {row}",
                "ref_peak_mb": ref.get("peak_mb"), "fast_peak_mb": fast.get("peak_mb")}
    passed = fast_fraction >= target
    return {"row": row, "label": label, "reference": values[0], "fast": values[1], "ratio": ratio,
            "reference_fraction": reference_fraction, "fast_fraction": fast_fraction, "dtype": dtype,
            "peak_gflops": peak[dtype],
            "target": f">= {target:.0%} of {dtype} peak", "result": "PASS" if passed else "MISS",
            "bound": "" if passed else bound, "ref_peak_mb": ref.get("peak_mb"), "fast_peak_mb": fast.get("peak_mb")}


def print_table(verdicts: list[dict]) -> None:
    print("| row | reference | fast path | fast/ref | reference % of fp32 peak | fast % of its peak (GFLOP/s) | target | result "
          "| ref peak MB | fast peak MB | what bounds a MISS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v in verdicts:
        ratio = f"{v['ratio']:.2f}x"
        memory_mb = [f"{mb:.0f}" if mb is not None else "" for mb in (v["ref_peak_mb"], v["fast_peak_mb"])]
        fractions_text = (("-", "-") if v["fast_fraction"] is None else
                          (f"{v['reference_fraction']:.0%}", f"{v['fast_fraction']:.0%} ({v['dtype']} {v['peak_gflops']:.0f})"))
        print(f"| {v['label']} | {v['reference']} | {v['fast']} | {ratio} | {fractions_text[0]} | "
              f"{fractions_text[1]} | {v['target']} | {v['result']} | "
              f"{memory_mb[0]} | {memory_mb[1]} | {v['bound']} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run, ~2-3 minutes)")
    parser.add_argument("--only", choices=list(ROWS), action="append", help="run only this row (repeatable)")
    parser.add_argument("--out", help="also write settings, raw measurements and the table as JSON here")
    parser.add_argument("--compile", action="store_true", help="fast path: torch.compile (project hook if present)")
    parser.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto",
                        help="fast path autocast: auto = bf16 only where the CPU has native bf16")
    parser.add_argument("--pipeline-repeats", type=int, default=3, help="alternating run pairs of the pipeline row")
    parser.add_argument("--profile", choices=[row for row in ROWS if ROWS[row][1] != "ranpac"],
                        help="print the fast path's top-15 ops of this row and exit (the timed rows; not ranpac)")
    parser.add_argument("--call", help=argparse.SUPPRESS)  # internal: one measurement, JSON in/out
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.call:
        spec = json.loads(args.call)
        print(json.dumps(FUNCTIONS[spec.pop("function")](**spec)))
        return

    facts = machine()  # its native_bf16 is norga's own check (AVX512-BF16 / AMX), what `amp: auto` follows
    amp = facts["native_bf16"] if args.amp == "auto" else args.amp == "bf16"
    fast = {"amp": amp, "compile": args.compile}
    if args.profile:
        batch = ROWS[args.profile][4 if args.quick else 3]
        print(in_subprocess(__file__, args.threads, "profile", row=args.profile, batch=batch, quick=args.quick,
                            **fast)["table"])
        return
    measured_peaks = in_subprocess(__file__, args.threads, "peaks", native_bf16=facts["native_bf16"])
    dtype = "bf16" if amp else "fp32"
    print(machine_line(facts, args.threads) + (", QUICK (smoke sizes, not the figures to quote)" if args.quick else ""))
    best = measured_peaks["best_size"]
    print(f"matmul peak at the start (best square product of {'/'.join(map(str, measured_peaks['sizes']['fp32']))}): "
          f"fp32 {measured_peaks['fp32']:.1f} GFLOP/s at {best['fp32']}², bf16 {measured_peaks['bf16']:.1f} GFLOP/s at "
          f"{best['bf16']}² (of {'/'.join(map(str, measured_peaks['sizes']['bf16']))}); targets are fractions of the "
          f"{dtype} peak, measured again beside each row's steps at that size (the table's GFLOP/s)")
    print(f"fast path: attention fused, amp {'bf16 (prepare_for_bf16)' if amp else 'none'} (--amp {args.amp}), "
          f"compile {'on (PromptedViT.compile_blocks)' if args.compile else 'off'}; pipeline: frozen-feature caching "
          f"and memoised prompted test features (cache_prompted_features) on")
    print("reference path: attention reference, fp32, no caching; LoRA rows: the plain frozen forward + backward in "
          "the fast path's precision")
    print("both paths: the allocator keeps freed memory for reuse, as in every norga run (norga.runtime.allocator)\n")

    rows = args.only or list(ROWS)
    measured: dict[str, dict] = {}
    for row in [r for r in ROWS if r in rows]:
        start = time.perf_counter()
        measured[row] = measure_row(row, args, fast, measured_peaks)
        print(f"[measured {row} in {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    if "train_vitb" in measured and measured["train_vitb"]["reference"]["flops"]:
        train = measured["train_vitb"]
        per_image = train["reference"]["flops"] / 1e9 / train["batch"]
        print(f"FLOPs of one ViT-B training step: {per_image:.1f} GFLOP/image counted (FlopCounterMode, reference path); "
              f"analytic {2 * VIT_B_FORWARD_GFLOP:.1f} (forward {VIT_B_FORWARD_GFLOP:.1f} + frozen-weight backward ~1x)\n")
    verdicts = [verdict(row, measured[row], measured_peaks, dtype) for row in ROWS if row in measured]
    print_table(verdicts)
    load_after = [round(value, 2) for value in os.getloadavg()]
    print(f"\nload average (1, 5, 15 min) at the start {facts['load_average']}, at the end {load_after}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"machine": facts, "load_average_after": load_after, "threads": args.threads, "quick": args.quick,
                       "fast_path": fast, "peaks_gflops": measured_peaks,
                       "measurements": measured, "table": verdicts}, handle, indent=2)


if __name__ == "__main__":
    main()
