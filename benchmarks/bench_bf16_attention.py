"""Before/after of the bf16 attention on CPU, paired in one process: whole steps with the attention of 2026-12-06
("before": the fp32-accumulating prefix kernel, timm's SDPA flash kernel in unprompted blocks) against today's
(`norga.runtime.precision.prepare_for_bf16`: every block through the bf16 explicit kernel); with
``--compare compile``, today's eager bf16 step against the same step with regional compile (`compile_blocks`:
norms and MLPs compiled, attention eager). Steps alternate before/after (A, B, A, B, ...) and medians are
reported, with the load average before and after. Usage:

    python benchmarks/bench_bf16_attention.py [--threads 2] [--repeats 9] [--only train_vitb ...] [--profile ROW]
                                              [--compare attention|compile]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
from _timing import machine, machine_line, median_ms
from bench_core import MODEL_KINDS, train_step
from bench_suite import ROWS, inference_step

from norga.nn import prefix_kernels


@contextlib.contextmanager
def attention_before():
    """The prefix kernel as it was: bf16 inputs took the fp32-accumulating `_GatedPrefixAttention`."""
    saved, prefix_kernels.LOW_PRECISION = prefix_kernels.LOW_PRECISION, ()
    try:
        yield
    finally:
        prefix_kernels.LOW_PRECISION = saved


def steps(row: str, compare: str = "attention") -> dict:
    """The row's bf16 fast-path step, built the old way (weights held only) and the new way; with `compare`
    "compile", today's eager step and the regionally compiled one."""
    kind, model_kind, batch = ROWS[row][1], ROWS[row][2], ROWS[row][3]
    maker = inference_step if kind == "infer" else train_step
    after = maker("fused", model_kind, batch=batch, amp=True, compile=compare == "compile")[0]
    torch.manual_seed(0)
    if compare == "compile":
        return {"eager": maker("fused", model_kind, batch=batch, amp=True)[0], "compiled": after}
    with _hold_only():
        before_step = maker("fused", model_kind, batch=batch, amp=True)[0]

    def before():
        with attention_before():
            before_step()

    return {"before": before, "after": after}


@contextlib.contextmanager
def _hold_only():
    """Build a model as `prepare_for_bf16` did before it routed plain blocks: hold the weights, nothing else."""
    from norga.runtime import precision

    saved = precision.prepare_for_bf16
    precision.prepare_for_bf16 = lambda model: model.hold_frozen_weights_in(torch.bfloat16)
    try:
        yield
    finally:
        precision.prepare_for_bf16 = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", choices=[r for r in ROWS if r != "pipeline"], action="append")
    parser.add_argument("--profile", choices=[r for r in ROWS if r != "pipeline"],
                        help="print the top-12 ops by self CPU time of two steps of this row, before and after")
    parser.add_argument("--compare", choices=("attention", "compile"), default="attention")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(machine(), args.threads))
    if args.profile:
        from torch.profiler import profile

        for name, step in steps(args.profile, args.compare).items():
            step()
            with profile() as prof:
                for _ in range(2):
                    step()
            print(f"\n{name}: two steps of {ROWS[args.profile][0]}, load {os.getloadavg()[0]:.2f}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    first, second = ("before", "after") if args.compare == "attention" else ("eager", "compiled")
    print(f"| step (bf16 autocast, weights held in bf16) | batch | {first} ms | {second} ms | {first}/{second} | "
          "load before, after |")
    print("|---|---|---|---|---|---|")
    for row in args.only or [r for r in ROWS if r != "pipeline"]:
        load = os.getloadavg()[0]
        repeats = args.repeats if MODEL_KINDS[ROWS[row][2]][3] == 224 else 2 * args.repeats
        ms = median_ms(steps(row, args.compare), warmup=3 if args.compare == "compile" else 2, repeats=repeats)
        print(f"| {ROWS[row][0]} | {ROWS[row][3]} | {ms[first]:.1f} | {ms[second]:.1f} | "
              f"{ms[first] / ms[second]:.2f}x | {load:.2f}, {os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
