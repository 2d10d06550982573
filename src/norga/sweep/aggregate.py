"""From finished trials to tables: one row per trial, mean ± sd per (method, setting, benchmark) over seeds, and
paired differences between arms (method and setting) on the seeds they share, with a 95 % t confidence interval."""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from norga.config import ConfigError
from norga.storage import atomic_write, load_json, write_json

#: results.json key -> short label. Keys are read from `metrics`, else from the top level (task identity and
#: task-incremental accuracy); a key a run does not record (e.g. task identity in a joint run) stays None, "—".
METRICS = {"final_average_accuracy": "FA", "cumulative_average_accuracy": "CA", "forgetting": "FFM",
           "task_identity_accuracy": "task-id", "task_incremental_accuracy": "task-IL"}
GROUP_KEYS = ("method", "setting", "benchmark")
CONFIDENCE = 0.95
SWEEP_CSV, SWEEP_JSON = "sweep.csv", "sweep.json"
SUMMARY_CSV, SUMMARY_JSON = "summary.csv", "summary.json"
PAIRED_CSV, PAIRED_JSON = "paired.csv", "paired.json"


def read_metrics(results: dict[str, Any]) -> dict[str, float | None]:
    """The aggregated metrics of one results.json."""
    inner = results.get("metrics", {})
    return {key: inner[key] if key in inner else results.get(key) for key in METRICS}


def trial_rows(directory) -> list[dict[str, Any]]:
    """One row per trial of a `SweepDirectory`; metrics only where the run's results.json says complete."""
    rows = []
    for entry in directory.trials:
        path = directory.run_dir(entry) / "results.json"
        results = load_json(path) if path.is_file() else {}
        complete = bool(results.get("complete"))
        metrics = read_metrics(results) if complete else dict.fromkeys(METRICS)
        status = "complete" if complete else entry["status"]
        rows.append({"trial": entry["id"], "method": entry["method"], "setting": entry["setting"],
                     "benchmark": entry["benchmark"], "seed": entry["seed"], "status": status,
                     "attempts": entry["attempts"], **metrics, "wall_seconds": entry.get("wall_seconds"),
                     "run_dir": entry["run_dir"], "error": None if complete else entry.get("error")})
    return rows


def combined_rows(directories: Sequence) -> list[dict[str, Any]]:
    """The trial rows of several `SweepDirectory`s as one table (run_dir made absolute). They must share their
    shared overrides (`set` entries outside any method's section); an entry of one method's section
    (`vptnsp.train.epochs=4`) joins that method's rows' setting, so it is an arm of its own. No two sweeps may
    hold the same (method, setting, benchmark, seed)."""
    first_shared = _shared_overrides(directories[0])
    rows, seen = [], {}
    for directory in directories:
        shared = _shared_overrides(directory)
        if shared != first_shared:
            raise ConfigError(
                f"{directory.path} ran with set {shared or []} and {directories[0].path} with {first_shared or []}: "
                "pairs across them would compare different experiments; combine sweeps with the same shared `set` "
                "(make a differing setting an axis)")
        for row in trial_rows(directory):
            own = [_readable(o) for o in directory.spec.overrides if _section(o) == row["method"]]
            row = {**row, "setting": ",".join(filter(None, [row["setting"], *own])),
                   "run_dir": str(directory.run_dir({"run_dir": row["run_dir"]}))}
            key = tuple(row[k] for k in (*GROUP_KEYS, "seed"))
            if key in seen:
                raise ConfigError(f"{directory.path} and {seen[key]} both hold {row['method']} "
                                  f"({setting_label(row['setting'])}, {row['benchmark']}, seed {row['seed']}): "
                                  "combine sweeps that do not overlap")
            seen[key] = directory.path
            rows.append(row)
    return rows


def _section(override: str) -> str | None:
    """The method whose section a ``key=value`` override sets (``norga.tii.head=...``: norga), else None."""
    from norga.methods import METHODS

    head = override.partition("=")[0].strip().split(".")[0]
    return head if head in METHODS else None


def _shared_overrides(directory) -> list[str]:
    return [o for o in directory.spec.overrides if _section(o) is None]


def _readable(override: str) -> str:
    key, _, value = override.partition("=")
    return f"{key.strip()}={value.strip().strip(chr(34))}"


def describe(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """n, mean and sample sd (n − 1) of the defined values; sd None below two values, mean None with none."""
    defined = [v for v in values if v is not None]
    return {"n": len(defined), "mean": statistics.fmean(defined) if defined else None,
            "sd": statistics.stdev(defined) if len(defined) > 1 else None}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds of every metric, per (method, setting, benchmark), in the trials' order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "complete":
            groups.setdefault(tuple(row[key] for key in GROUP_KEYS), []).append(row)
    return [{**dict(zip(GROUP_KEYS, key, strict=True)), "n": len(members), "seeds": [r["seed"] for r in members],
             **{metric: describe([r[metric] for r in members]) for metric in METRICS}}
            for key, members in groups.items()]


def paired_differences(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each two arms (method and setting) of a benchmark, per metric: arm_a − arm_b on the seeds both
    finished, its mean, sd, n and 95 % t interval (None below two seeds)."""
    from scipy.stats import t as student_t

    complete = [r for r in rows if r["status"] == "complete"]
    pairs = []
    for benchmark in dict.fromkeys(r["benchmark"] for r in complete):
        by_arm: dict[tuple[str, str], dict] = {}
        for r in complete:
            if r["benchmark"] == benchmark:
                by_arm.setdefault((r["method"], r["setting"]), {})[r["seed"]] = r
        for a, b in itertools.combinations(by_arm, 2):
            for metric in METRICS:
                seeds = [s for s in by_arm[a] if s in by_arm[b]
                         and by_arm[a][s][metric] is not None and by_arm[b][s][metric] is not None]
                if not seeds:
                    continue
                differences = [by_arm[a][s][metric] - by_arm[b][s][metric] for s in seeds]
                stats = describe(differences)
                half = (student_t.ppf((1 + CONFIDENCE) / 2, stats["n"] - 1) * stats["sd"] / math.sqrt(stats["n"])
                        if stats["sd"] is not None else None)
                pairs.append({"benchmark": benchmark, "method_a": a[0], "setting_a": a[1], "method_b": b[0],
                              "setting_b": b[1], "metric": metric, "n": stats["n"], "seeds": seeds,
                              "mean_difference": stats["mean"], "sd": stats["sd"],
                              "ci_low": None if half is None else stats["mean"] - half,
                              "ci_high": None if half is None else stats["mean"] + half})
    return pairs


def write_tables(path: Path, rows, summary, pairs) -> None:
    """sweep, summary and paired tables as JSON and CSV in the sweep directory (atomic writes)."""
    path = Path(path)
    write_json({"trials": list(rows)}, path / SWEEP_JSON)
    write_json({"groups": list(summary), "confidence": CONFIDENCE}, path / SUMMARY_JSON)
    write_json({"pairs": list(pairs), "confidence": CONFIDENCE}, path / PAIRED_JSON)
    _write_csv(path / SWEEP_CSV, rows)
    _write_csv(path / SUMMARY_CSV, [_flat_group(g) for g in summary])
    _write_csv(path / PAIRED_CSV, [{**p, "seeds": " ".join(map(str, p["seeds"]))} for p in pairs])


def _flat_group(group: dict[str, Any]) -> dict[str, Any]:
    flat = {key: group[key] for key in (*GROUP_KEYS, "n")}
    flat["seeds"] = " ".join(map(str, group["seeds"]))
    for metric in METRICS:
        flat[f"{metric}_mean"], flat[f"{metric}_sd"] = group[metric]["mean"], group[metric]["sd"]
    return flat


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            if rows:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    atomic_write(path, write)


# --------------------------------------------------------------------------- text
def _cell(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "—"
    return f"{stats['mean']:.2f}" + ("" if stats["sd"] is None else f" ± {stats['sd']:.2f}")


def setting_label(setting: str) -> str:
    return setting or "base"


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """The summary as a text table: mean ± sd over seeds (— where no trial recorded the metric)."""
    header = ["method", "setting", "benchmark", "n", *METRICS.values()]
    body = [[g["method"], setting_label(g["setting"]), g["benchmark"], str(g["n"]),
             *(_cell(g[metric]) for metric in METRICS)] for g in summary]
    return _table(header, body)


def format_paired(pairs: Sequence[dict[str, Any]]) -> str:
    """Paired differences as a text table: mean, sd and 95 % interval of arm_a − arm_b (an arm's setting is shown
    in the setting column when both share it, else beside its method)."""
    header = ["benchmark", "setting", "difference", "metric", "n", "mean", "sd", f"{CONFIDENCE:.0%} CI"]

    def number(value):
        return "—" if value is None else f"{value:+.2f}"

    def arms(p) -> tuple[str, str]:
        if p["setting_a"] == p["setting_b"]:
            return setting_label(p["setting_a"]), f"{p['method_a']} − {p['method_b']}"
        return "—", (f"{p['method_a']} ({setting_label(p['setting_a'])}) − "
                     f"{p['method_b']} ({setting_label(p['setting_b'])})")

    body = [[p["benchmark"], *arms(p), METRICS[p["metric"]],
             str(p["n"]), number(p["mean_difference"]), "—" if p["sd"] is None else f"{p['sd']:.2f}",
             "—" if p["ci_low"] is None else f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]"] for p in pairs]
    return _table(header, body)


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *body])
