"""Benchmark the core: gated prefix attention alone, and a whole prompted-ViT training step.

Reference (explicit attention, as the official code computes it) vs fused, on CPU threads.
Each measurement runs in its own subprocess so its peak memory (peak RSS above the RSS after
set-up) is its own. Usage:

    python benchmarks/bench_core.py [--threads 2] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(step, warmup: int, repeats: int) -> tuple[float, float]:
    """Seconds per call of `step` and peak memory (MB) above the RSS before the first call."""
    base = _rss_mb()
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats, _peak_rss_mb() - base


def measure_attention(impl: str, prompt_length: int, first_layer: bool, gate: str | None, repeats: int) -> dict:
    from norga.nn import fused_prefix_attention, make_gate, reference_prefix_attention

    batch, heads, tokens, dim = 8, 12, 197, 64
    score_gate = make_gate(gate)
    q, k, v = (torch.randn(batch, heads, tokens, dim, requires_grad=not first_layer) for _ in range(3))
    pk, pv = (torch.randn(batch, heads, prompt_length, dim, requires_grad=True) for _ in range(2))
    attend = fused_prefix_attention if impl == "fused" else reference_prefix_attention
    grad_out = torch.randn(batch, heads, tokens, dim)

    def step():
        attend(q, k, v, pk, pv, score_gate, dim**-0.5).backward(grad_out)

    seconds, peak = _time(step, warmup=3, repeats=repeats)
    return {"ms": seconds * 1e3, "images_per_s": batch / seconds, "peak_mb": peak}


def measure_train_step(impl: str, model_kind: str, repeats: int) -> dict:
    from norga.nn import PromptedViT

    if model_kind == "vit_base_224":
        name, kwargs, batch, size, length = "vit_base_patch16_224", {}, 8, 224, 20
    else:  # ViT-Ti width/depth/heads at 32 px with 4 px patches (65 tokens)
        name, kwargs, batch, size, length = "vit_tiny_patch16_224", dict(img_size=32, patch_size=4), 64, 32, 5
    model = PromptedViT.from_timm(
        name, timm_kwargs=kwargs, num_slots=10, prompt_length=length, num_classes=100,
        gate="tanh", attention_impl=impl,
    ).train()
    model.pool.set_trainable_slot(1)
    groups = model.parameter_groups()
    optimizer = torch.optim.Adam(
        [{"params": groups["prompts"] + groups["gates"]}, {"params": groups["head"], "lr": 1e-4}], lr=1e-3
    )
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 100, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images, 1, momentum=0.01).logits, labels)
        loss.backward()
        optimizer.step()

    seconds, peak = _time(step, warmup=1, repeats=repeats)
    return {"ms": seconds * 1e3, "images_per_s": batch / seconds, "peak_mb": peak}


CASES = {
    "attention": measure_attention,
    "train_step": measure_train_step,
}


def run_case_in_subprocess(threads: int, case: str, **kwargs) -> dict:
    command = [sys.executable, __file__, "--threads", str(threads), "--case", json.dumps({"case": case, **kwargs})]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, tiny training step only")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement, JSON in/out
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        spec = json.loads(args.case)
        print(json.dumps(CASES[spec.pop("case")](**spec)))
        return

    repeats = 5 if args.quick else 20
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    for gate in ("tanh", None):
        for length in (5, 20):
            for first_layer in (False, True):
                label = f"attention B8 H12 N197 Lp{length} gate={gate or 'none'} {'first layer' if first_layer else 'inner layer'}"
                results = {
                    impl: run_case_in_subprocess(
                        args.threads, "attention", impl=impl, prompt_length=length,
                        first_layer=first_layer, gate=gate, repeats=repeats,
                    )
                    for impl in ("reference", "fused")
                }
                rows.append((label, results))
    models = ["vit_tiny_32"] if args.quick else ["vit_tiny_32", "vit_base_224"]
    for model_kind in models:
        step_repeats = 3 if model_kind == "vit_base_224" else repeats // 2
        results = {
            impl: run_case_in_subprocess(args.threads, "train_step", impl=impl, model_kind=model_kind, repeats=step_repeats)
            for impl in ("reference", "fused")
        }
        rows.append((f"train step {model_kind} (prompts+gate+head, frozen backbone)", results))

    print("| what | reference ms | fused ms | speed-up | reference img/s | fused img/s | ref peak MB | fused peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for label, res in rows:
        ref, fused = res["reference"], res["fused"]
        print(
            f"| {label} | {ref['ms']:.1f} | {fused['ms']:.1f} | {ref['ms'] / fused['ms']:.2f}x | "
            f"{ref['images_per_s']:.1f} | {fused['images_per_s']:.1f} | {ref['peak_mb']:.0f} | {fused['peak_mb']:.0f} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump([{"what": label, **res} for label, res in rows], handle, indent=2)


if __name__ == "__main__":
    main()
