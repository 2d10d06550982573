"""SMoPE's inference (one routed prompted pass) against NoRGa's (a frozen pass for task identity, then the prompted
pass with each image's predicted slot) on the same backbone, batch and machine.

Both are randomly initialised at their official structure: SMoPE 25 experts per head in blocks 0-5, top-5 by the mean
query, never-used experts excluded (half the pool marked unused); NoRGa `bench_suite.inference_step` (tanh gate,
blocks 0-4, 10 slots). Steps alternate NoRGa / SMoPE in one process and the medians are compared. Usage:

    python benchmarks/bench_smope_inference.py [--threads 2] [--amp] [--model vit_tiny_32|vit_base_224]
                                               [--batch N] [--repeats N]
"""

from __future__ import annotations

import argparse

import torch
from _timing import machine, machine_line, median_ms
from bench_core import MODEL_KINDS
from bench_suite import inference_step, smope_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast, frozen weights held in bf16")
    parser.add_argument("--model", default="vit_tiny_32", choices=sorted(MODEL_KINDS))
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (ViT-Ti@32) or 16 (ViT-B@224)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = args.batch or (16 if args.model == "vit_base_224" else 256)
    norga, _ = inference_step("fused", args.model, batch, amp=args.amp)
    steps = {"norga": norga, "smope": smope_step("fused", args.model, batch, args.amp)[0]}
    ms = median_ms(steps, warmup=2, repeats=args.repeats)
    print(machine_line(machine(), args.threads))
    print(f"{args.model}, batch {batch}, {'bf16' if args.amp else 'fp32'}, {args.repeats} interleaved repeats")
    print("| method | ms per batch | images/s |")
    print("|---|---|---|")
    for name in steps:
        print(f"| {name} | {ms[name]:.1f} | {batch / ms[name] * 1e3:.1f} |")
    print(f"SMoPE / NoRGa images/s: {ms['norga'] / ms['smope']:.2f}x")


if __name__ == "__main__":
    main()
