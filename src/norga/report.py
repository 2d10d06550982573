"""Pictures and tables of a run: accuracy-matrix heatmap, per-task accuracy curve, terminal table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from norga.engine.checkpoint import atomic_write  # noqa: E402
from norga.metrics import AccuracyMatrix  # noqa: E402

if TYPE_CHECKING:
    from norga.comparison import MethodResult


def plot_run(matrix: AccuracyMatrix, directory: Path, upto: int) -> None:
    """Write accuracy_matrix.png (heatmap) and accuracy_curve.png (average accuracy after each task)."""
    rows, columns = matrix.tested(upto), upto + 1
    values = matrix.accuracies()[:rows, :columns]
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * columns, 1.0 + 0.5 * rows))
    image = axis.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for i in range(rows):
        for t in range(columns):
            if matrix.total[i, t]:
                axis.text(t, i, f"{values[i, t]:.0f}", ha="center", va="center", color="white", fontsize=8)
    axis.set_xlabel("after joint training" if matrix.joint else "after training task")
    axis.set_ylabel("test set of task")
    axis.set_xticks(range(columns), [str(t + 1) for t in range(columns)])
    axis.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    figure.colorbar(image, ax=axis, label="accuracy (%)")
    _save(figure, directory / "accuracy_matrix.png")

    figure, axis = plt.subplots(figsize=(5, 3.2))
    _plot_curve(axis, matrix, upto, label=None)
    _label_curve_axes(axis)
    _save(figure, directory / "accuracy_curve.png")


def _label_curve_axes(axis) -> None:
    axis.set_xlabel("tasks learned")
    axis.set_ylabel("average accuracy on seen tasks (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def _plot_curve(axis, matrix: AccuracyMatrix, upto: int, label: str | None, color: str | None = None) -> None:
    """Average accuracy on the tested tasks after each step; a joint run is one point at "all tasks learned"."""
    averages = [matrix.final_average_accuracy(t) for t in range(upto + 1)]
    if matrix.joint:
        axis.plot([matrix.num_tasks], averages, marker="*", markersize=12, linestyle="none", label=label, color=color)
    else:
        axis.plot(range(1, upto + 2), averages, marker="o", label=label, color=color)


def format_matrix(matrix: AccuracyMatrix, upto: int) -> str:
    """The accuracy matrix as a text table (rows: test task, columns: after task; one column if joint)."""
    values = matrix.accuracies()
    header = "task " + ("  joint" if matrix.joint else " ".join(f"{t + 1:>6}" for t in range(upto + 1)))
    rows = [header]
    for i in range(matrix.tested(upto)):
        cells = [f"{values[i, t]:6.2f}" if matrix.total[i, t] else "     ." for t in range(upto + 1)]
        rows.append(f"{i + 1:>4} " + " ".join(cells))
    return "\n".join(rows)


def format_metric(value: float | None) -> str:
    """A metric with two decimals, or an em dash where it is undefined (None)."""
    return "—" if value is None else f"{value:.2f}"


def format_comparison_table(results: Sequence[MethodResult]) -> str:
    """One line per method: FA, CA, FFM, task-identity accuracy (— where undefined), wall time, run directory."""
    width = max([len("method"), *(len(r.label) for r in results)])
    lines = [f"{'method':{width}s} {'FA':>7s} {'CA':>7s} {'FFM':>7s} {'task-id':>8s} {'time s':>7s}  run directory"]
    for r in results:
        m = r.metrics
        seconds = "—" if r.wall_seconds is None else f"{r.wall_seconds:.1f}"
        lines.append(f"{r.label:{width}s} {format_metric(m['final_average_accuracy']):>7s} "
                     f"{format_metric(m['cumulative_average_accuracy']):>7s} {format_metric(m['forgetting']):>7s} "
                     f"{format_metric(r.task_identity_accuracy):>8s} {seconds:>7s}  {r.run_dir}")
    return "\n".join(lines)


def plot_comparison(results: Sequence[MethodResult], path: Path) -> None:
    """Average accuracy on the seen tasks after each task, one line per method (joint runs: one star each)."""
    figure, axis = plt.subplots(figsize=(6.4, 4))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors: dict[str, str] = {}  # a method's joint bound takes its continual line's colour
    for r in results:
        color = colors.setdefault(r.method, palette[len(colors) % len(palette)])
        _plot_curve(axis, r.matrix, r.matrix.num_steps - 1, label=r.label, color=color)
    num_tasks = max((r.matrix.num_tasks for r in results), default=1)
    axis.set_xticks(range(1, num_tasks + 1))
    _label_curve_axes(axis)
    if results:
        axis.legend(fontsize=8)
    _save(figure, path)
