"""The pictures and tables of a run as a reader sees them: rendered pixels, tick labels, CSV cells."""

import csv
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from norga.comparison import MethodResult
from norga.metrics import AccuracyMatrix
from norga.report import (
    CMAP,
    UNEVALUATED,
    curve_figure,
    format_prompt_effect,
    matrix_figure,
    plot_run,
    text_colour,
)


def partial_matrix(num_tasks: int = 5, upto: int = 2) -> AccuracyMatrix:
    """Tasks 1..upto+1 evaluated after each step so far; task 2 after step 3 measured at exactly 0 %."""
    matrix = AccuracyMatrix(num_tasks)
    rng = np.random.default_rng()
    for t in range(upto + 1):
        for i in range(t + 1):
            matrix.update(i, t, 0 if (i, t) == (1, 2) else int(rng.integers(1, 101)), 100)
    return matrix


def rendered(figure) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(float) / 255


def cell_colour(figure, pixels: np.ndarray, row: int, column: int) -> np.ndarray:
    """Mean colour of a cell's left third (away from its centred number), in display pixels."""
    axis = figure.axes[0]
    (x0, y0), (x1, y1) = axis.transData.transform([(column - 0.45, row + 0.45), (column - 0.15, row - 0.45)])
    height = pixels.shape[0]
    return pixels[int(height - y1):int(height - y0), int(x0):int(x1)].reshape(-1, 3).mean(axis=0)


def test_unevaluated_cells_are_not_coloured_as_a_measured_zero():
    matrix = partial_matrix()
    figure = matrix_figure(matrix, "norga · fashion-mnist · tiny")
    pixels = rendered(figure)
    zero = cell_colour(figure, pixels, 1, 2)
    assert np.abs(zero - np.array(colormaps[CMAP](0.0)[:3])).max() < 0.05  # a measured 0 % is the map's 0
    first = matrix.accuracies()[0, 0] / 100
    assert np.abs(cell_colour(figure, pixels, 0, 0) - np.array(colormaps[CMAP](first)[:3])).max() < 0.05
    for row, column in [(1, 0), (4, 4), (2, 1), (0, 3)]:  # below the diagonal, and steps not run yet
        blank = cell_colour(figure, pixels, row, column)
        assert np.abs(blank - zero).max() > 0.5, (row, column)
        grey = np.array([int(UNEVALUATED["facecolor"][k:k + 2], 16) / 255 for k in (1, 3, 5)])
        assert np.abs(blank - grey).max() < 0.15  # light grey (with its hatching)
    texts = {text.get_text() for text in figure.axes[0].texts}
    assert "0" in texts and len(figure.axes[0].texts) == int((matrix.total > 0).sum())  # numbers only where measured
    assert "not evaluated" in [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert figure.axes[0].get_title().startswith("norga · fashion-mnist · tiny")


def test_cell_numbers_read_on_every_colour():
    def luminance(rgb):
        channels = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]

    for value in np.linspace(0, 1, 101):
        cell = colormaps[CMAP](value)
        text = (0.0, 0.0, 0.0) if text_colour(cell) == "black" else (1.0, 1.0, 1.0)
        light, dark = sorted([luminance(cell), luminance(text)], reverse=True)
        assert (light + 0.05) / (dark + 0.05) >= 4.5, value  # WCAG AA contrast for small text


def test_curve_has_integer_task_ticks_and_the_whole_task_range():
    figure = curve_figure(partial_matrix(), upto=2, title="t")
    axis = figure.axes[0]
    assert list(axis.get_xticks()) == [1, 2, 3, 4, 5] and axis.get_xlim() == (0.5, 5.5)
    assert axis.get_ylim() == (0, 100)


def test_plot_run_writes_titled_pngs(tmp_path):
    plot_run(partial_matrix(), tmp_path, 2, title="hide · cifar100 · sup21k")
    for name in ("accuracy_matrix.png", "accuracy_curve.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300 and image.size[1] > 250


def test_csv_leaves_cells_never_measured_empty(tmp_path):
    matrix = partial_matrix()
    matrix.to_csv(tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["test_task", *(f"after_task_{t}" for t in range(1, 6))]
    assert rows[2][1:] == ["", f"{matrix.accuracies()[1, 1]:.4f}", "0.0000", "", ""]  # measured 0 stays 0
    assert rows[5][1:] == [""] * 5
    assert matrix.to_dict()["accuracy"][1] == [None, pytest.approx(matrix.accuracies()[1, 1]), 0.0, None, None]


def result_row(label, fa, task_il, gates=()):
    return MethodResult(label, "hide", False, {"final_average_accuracy": fa}, None, task_il, AccuracyMatrix(2),
                        Path(label), "ran", 1.0, list(gates))


def test_the_prompt_effect_is_each_rows_gain_over_the_pipeline_without_prompts_and_the_gates_range():
    gates = [{"block": 0, "alpha": 1.25, "tau": 0.5}, {"block": 3, "alpha": 0.75, "tau": 1.5}]
    text = format_prompt_effect([result_row("NoRGa", 66.5, 97.25, gates), result_row("HiDe", 61.0, None)],
                                result_row("No prompts", 63.0, 96.0))
    lines = text.splitlines()
    assert "No prompts" in lines[0]
    assert lines[1].split() == ["NoRGa", "FA", "+3.50", "task-IL", "+1.25"]
    assert lines[2].split() == ["HiDe", "FA", "-2.00", "task-IL", "—"]
    assert lines[3] == "NoRGa's gates (blocks 0, 3) moved from alpha = tau = 1 to alpha 0.75..1.25, tau 0.50..1.50"
    assert len(lines) == 4  # no gate line for a row without gates
