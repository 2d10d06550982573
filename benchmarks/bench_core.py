"""Benchmark the core: gated prefix attention alone, and a whole prompted-ViT training step.

Reference (explicit attention, as the official code computes it) vs fused, on CPU threads.
Times are medians over iterations that alternate reference and fused in one process (this machine's
timings drift by tens of percent over seconds; alternating cancels that). Peak memory (peak RSS above
the RSS after set-up) is measured in a separate subprocess per implementation. Usage:

    python benchmarks/bench_core.py [--threads 2] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from _timing import in_subprocess as _in_subprocess
from _timing import machine, machine_line, median_ms, peak_mb

MODEL_KINDS = {  # timm name, timm kwargs, default training batch, image size, prompt length
    "vit_base_224": ("vit_base_patch16_224", {}, 8, 224, 20),
    # ViT-Ti width/depth/heads at 32 px with 4 px patches (65 tokens)
    "vit_tiny_32": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4), 64, 32, 5),
}


def attention_step(impl: str, prompt_length: int, first_layer: bool, gate: str | None):
    """One forward + backward of the attention core at ViT-B/16 shapes (B 8, 12 heads, 197 tokens)."""
    from norga.nn import fused_prefix_attention, make_gate, reference_prefix_attention

    batch, heads, tokens, dim = 8, 12, 197, 64
    score_gate = make_gate(gate)
    q, k, v = (torch.randn(batch, heads, tokens, dim, requires_grad=not first_layer) for _ in range(3))
    pk, pv = (torch.randn(batch, heads, prompt_length, dim, requires_grad=True) for _ in range(2))
    attend = fused_prefix_attention if impl == "fused" else reference_prefix_attention
    grad_out = torch.randn(batch, heads, tokens, dim)
    return (lambda: attend(q, k, v, pk, pv, score_gate, dim**-0.5).backward(grad_out)), batch


def prompted_model(impl: str, model_kind: str, num_slots: int = 10, num_classes: int = 100, amp: bool = False,
                   device: str = "cpu"):
    """A randomly initialised prompt host of `model_kind` with NoRGa task prompts (tanh gate, blocks 0-4) and its
    input image size; with `amp` it is readied for bf16 as `norga.engine.RunContext` does (`prepare_for_bf16`)."""
    from norga.runtime.precision import prepare_for_bf16
    from norga.nn import PromptedViT, TaskPromptedViT, TaskPrompts

    name, kwargs, _, size, length = MODEL_KINDS[model_kind]
    host = PromptedViT.from_timm(name, timm_kwargs=kwargs, num_classes=num_classes, attention_impl=impl)
    if amp:
        prepare_for_bf16(host)
    model = TaskPromptedViT(host, TaskPrompts(host, num_slots, length, range(min(5, host.depth)), gate="tanh"))
    return model.to(device), size


def autocast(amp: bool, device: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `amp`, else nothing."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def train_step(impl: str, model_kind: str, batch: int | None = None, amp: bool = False, compile: bool = False,
               device: str = "cpu"):
    """One optimizer step on prompts, gate and head of a prompted ViT with a frozen backbone.

    `amp`: forward under bf16 autocast, the frozen weights held in bf16 as a run does; `compile`: `compile_model`
    (torch.compile) the model first.
    """
    model, size = prompted_model(impl, model_kind, amp=amp, device=device)
    model.train()
    batch = batch or MODEL_KINDS[model_kind][2]
    prompts = model.prompts.train_slot(1, "all")
    optimizer = torch.optim.Adam([{"params": prompts}, {"params": model.host.head_parameters(), "lr": 1e-4}], lr=1e-3)
    forward = compile_model(model) if compile else model
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(amp, device):
            logits = forward(images, 1, momentum=0.01).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()

    return step, batch


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The project's regional compile (``PromptedViT.compile_blocks``: prefix attention stays eager)."""
    model.host.compile_blocks()
    return model


def measure(case: str, repeats: int, **kwargs) -> dict:
    """Interleaved median times of both implementations (memory is measured by `measure_memory`)."""
    maker = CASES[case]
    built = {impl: maker(impl, **kwargs) for impl in ("reference", "fused")}
    ms = median_ms({impl: step for impl, (step, _) in built.items()}, warmup=2, repeats=repeats)
    return {impl: {"ms": ms[impl], "images_per_s": built[impl][1] / ms[impl] * 1e3} for impl in built}


def measure_memory(case: str, impl: str, **kwargs) -> dict:
    step, _ = CASES[case](impl, **kwargs)
    return {"peak_mb": peak_mb(step, warmup=1)}


CASES = {"attention": attention_step, "train_step": train_step}


def in_subprocess(threads: int, function: str, **kwargs) -> dict:
    return _in_subprocess(__file__, threads, function, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, tiny training step only")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--call", help=argparse.SUPPRESS)  # internal: one measurement, JSON in/out
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.call:
        spec = json.loads(args.call)
        function = {"measure": measure, "measure_memory": measure_memory}[spec.pop("function")]
        print(json.dumps(function(**spec)))
        return

    repeats = 7 if args.quick else 31
    cases = []
    for gate in ("tanh", None):
        for length in (5, 20):
            for first_layer in (False, True):
                where = "first prompted layer (q, k, v need no grad)" if first_layer else "inner layer"
                cases.append((f"attention fwd+bwd, Lp {length}, gate {gate or 'none (HiDe)'}, {where}",
                              "attention", repeats, dict(prompt_length=length, first_layer=first_layer, gate=gate)))
    for model_kind in ["vit_tiny_32"] + ([] if args.quick else ["vit_base_224"]):
        step_repeats = 5 if model_kind == "vit_base_224" else max(repeats // 3, 3)
        cases.append((f"training step {model_kind} (prompts+gate+head, frozen backbone)", "train_step",
                      step_repeats, dict(model_kind=model_kind)))

    print(machine_line(machine(), args.threads))
    print("| what | reference ms | fused ms | speed-up | reference img/s | fused img/s | ref peak MB | fused peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for label, case, case_repeats, kwargs in cases:
        result = in_subprocess(args.threads, "measure", case=case, repeats=case_repeats, **kwargs)
        for impl in ("reference", "fused"):
            result[impl].update(in_subprocess(args.threads, "measure_memory", case=case, impl=impl, **kwargs))
        ref, fused = result["reference"], result["fused"]
        print(
            f"| {label} | {ref['ms']:.1f} | {fused['ms']:.1f} | {ref['ms'] / fused['ms']:.2f}x | "
            f"{ref['images_per_s']:.1f} | {fused['images_per_s']:.1f} | {ref['peak_mb']:.0f} | {fused['peak_mb']:.0f} |",
            flush=True,
        )
        rows.append({"what": label, **result})
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
