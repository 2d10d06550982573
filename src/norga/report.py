"""Pictures and tables of a run: accuracy-matrix heatmap, per-task accuracy curve, terminal table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from norga.engine.checkpoint import atomic_write  # noqa: E402
from norga.metrics import AccuracyMatrix  # noqa: E402


def plot_run(matrix: AccuracyMatrix, directory: Path, upto: int) -> None:
    """Write accuracy_matrix.png (heatmap) and accuracy_curve.png (average accuracy after each task)."""
    values = matrix.accuracies()[: upto + 1, : upto + 1]
    figure, axis = plt.subplots(figsize=(1.2 + 0.6 * (upto + 1), 1.0 + 0.5 * (upto + 1)))
    image = axis.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for i in range(upto + 1):
        for t in range(i, upto + 1):
            axis.text(t, i, f"{values[i, t]:.0f}", ha="center", va="center", color="white", fontsize=8)
    axis.set_xlabel("after training task")
    axis.set_ylabel("test set of task")
    axis.set_xticks(range(upto + 1), [str(t + 1) for t in range(upto + 1)])
    axis.set_yticks(range(upto + 1), [str(t + 1) for t in range(upto + 1)])
    figure.colorbar(image, ax=axis, label="accuracy (%)")
    _save(figure, directory / "accuracy_matrix.png")

    figure, axis = plt.subplots(figsize=(5, 3.2))
    averages = [values[: t + 1, t].mean() for t in range(upto + 1)]
    axis.plot(range(1, upto + 2), averages, marker="o")
    axis.set_xlabel("tasks learned")
    axis.set_ylabel("average accuracy on seen tasks (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    _save(figure, directory / "accuracy_curve.png")


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


def format_matrix(matrix: AccuracyMatrix, upto: int) -> str:
    """The accuracy matrix as a text table (rows: test task, columns: after task)."""
    values = matrix.accuracies()
    header = "task " + " ".join(f"{t + 1:>6}" for t in range(upto + 1))
    rows = [header]
    for i in range(upto + 1):
        cells = [f"{values[i, t]:6.2f}" if t >= i else "     ." for t in range(upto + 1)]
        rows.append(f"{i + 1:>4} " + " ".join(cells))
    return "\n".join(rows)
