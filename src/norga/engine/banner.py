"""The start banner of a run, from a plain dict of facts the engine already holds (the run record).

`facts` keys, all optional: ``run_dir``, ``method``, ``joint``, ``benchmark`` / ``backbone`` / ``precision`` (the
records of environment.json), ``device``, ``threads``, ``processes``, ``steps`` (training steps), ``resumed_at``
(a position dict).
"""

from __future__ import annotations

from pathlib import Path


def run_title(facts: dict, label: str | None = None) -> str:
    """``METHOD · BENCHMARK``: what every bar and line of the run is prefixed with."""
    benchmark = (facts.get("benchmark") or {}).get("name")
    return " · ".join(str(part) for part in (label or facts.get("method"), benchmark) if part)


def format_benchmark(record: dict, joint: bool = False) -> str:
    """``name: T tasks × C classes, N training / M test images, from PATH``."""
    sizes = sorted({len(classes) for classes in record.get("task_classes", [])})
    tasks = record.get("num_tasks", len(record.get("task_classes", [])))
    if len(sizes) == 1:
        shape = f"{tasks} tasks × {sizes[0]} classes"
    elif sizes:
        shape = f"{tasks} tasks of {sizes[0]}–{sizes[-1]} classes"
    else:
        shape = f"{tasks} tasks"
    text = f"{record.get('name', '?')}: {shape}"
    if "train_images" in record:
        text += f", {record['train_images']:,} training / {record.get('test_images', 0):,} test images"
    if joint:
        text += " (trained jointly on all tasks)"
    return text + (f", from {record['source']}" if record.get("source") else "")


def format_backbone(record: dict) -> str:
    """``name (timm ARCH, HxW input)``."""
    size = record.get("input_size")
    shape = f", {size[-2]}×{size[-1]} input" if size else ""
    return f"{record.get('name', '?')} (timm {record.get('arch', '?')}{shape})"


def format_weights(record: dict) -> str:
    """Where the backbone's weights came from, with the file's checksum when there is one."""
    weights = str(record.get("weights", "?"))
    if weights == "none":
        return "random (backbone.weights=none)"
    if weights.startswith("hub:"):
        return f"from the hub ({weights[4:]})"
    digest = record.get("sha256")
    return weights + (f" (sha256 {digest[:12]}…)" if digest else "")


def format_precision(record: dict) -> str:
    amp = record.get("amp", "none")
    text = "bf16 autocast" if amp == "bf16" else "fp32"
    if record.get("amp_requested") == "auto":
        text += " (amp auto: " + ("native bf16 here)" if record.get("native_bf16") else "no native bf16 here)")
    return text + f", compile {'on' if record.get('compile') else 'off'}"


def format_banner(facts: dict, label: str | None = None) -> list[str]:
    """The banner's lines: a title, then one aligned ``name  value`` line per fact that is known."""
    rows = []
    if facts.get("run_dir"):
        rows.append(("run directory", str(Path(facts["run_dir"]))))
    if facts.get("method"):
        shown = f" (shown as {label})" if label and label != facts["method"] else ""
        rows.append(("method", facts["method"] + shown))
    if facts.get("benchmark"):
        rows.append(("benchmark", format_benchmark(facts["benchmark"], bool(facts.get("joint")))))
    if facts.get("backbone"):
        rows.append(("backbone", format_backbone(facts["backbone"])))
        rows.append(("weights", format_weights(facts["backbone"])))
    if facts.get("precision"):
        rows.append(("precision", format_precision(facts["precision"])))
    if facts.get("device"):
        device = str(facts["device"])
        if facts.get("threads"):
            device += f", {facts['threads']} thread{'s' * (facts['threads'] != 1)}"
        if facts.get("processes", 1) > 1:
            device += f", {facts['processes']} processes"
        rows.append(("device", device))
    if facts.get("resumed_at"):
        at = facts["resumed_at"]
        if at["task"] >= facts.get("steps", at["task"] + 1):
            rows.append(("resuming", "every task is done; nothing is left to run"))
        else:
            rows.append(("resuming at", f"task {at['task'] + 1}, phase {at['phase'] + 1}, epoch {at['epoch'] + 1}"))
    width = max((len(name) for name, _ in rows), default=0)
    title = run_title(facts, label) or "norga"
    header = f"{title}: {'resuming the run' if facts.get('resumed_at') else 'starting a run'}"
    return [header, *(f"  {name:<{width}}  {value}" for name, value in rows)]
