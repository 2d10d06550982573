"""Time RanPAC's head at ViT-B width: per task, the float64 statistics, the λ search and the Cholesky solve, and the
process's peak memory. Features are synthetic (clustered Gaussians of width 768), so no backbone or data is needed.

    python benchmarks/bench_ranpac.py --tasks 2 --per-task 5000 --classes-per-task 10 --dim 10000
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from _timing import machine

from norga.methods.ranpac.ridge_head import RidgeHead, RidgeSettings
from norga.runtime.features import FeatureSet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--per-task", type=int, default=5000, help="training images per task (CIFAR-100, 10 tasks)")
    parser.add_argument("--classes-per-task", type=int, default=10)
    parser.add_argument("--width", type=int, default=768, help="feature width (ViT-B: 768)")
    parser.add_argument("--dim", type=int, default=10000, help="M, the random projection's width")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    classes = args.tasks * args.classes_per_task
    centres = torch.randn(classes, args.width, generator=generator)
    head = RidgeHead(args.width, classes, RidgeSettings(projection_dim=args.dim), seed=0, stream="timing")
    started = time.perf_counter()
    for task in range(args.tasks):
        own = list(range(task * args.classes_per_task, (task + 1) * args.classes_per_task))
        labels = torch.tensor(own).repeat_interleave(args.per_task // args.classes_per_task)
        features = centres[labels] + torch.randn(len(labels), args.width, generator=generator)
        head.add_task(task, FeatureSet(features, labels), own)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tasks = [{"task": t["task"], "lambda": t["lambda"], **t["seconds"]} for t in head.record()["tasks"]]
    print(json.dumps({"machine": machine(), "threads": torch.get_num_threads(), "tasks": tasks,
                      "total_seconds": round(time.perf_counter() - started, 1), "peak_rss_gib": round(peak_gib, 2)}))


if __name__ == "__main__":
    main()
