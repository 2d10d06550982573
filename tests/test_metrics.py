"""Accuracy-matrix metrics against literal transcriptions of the official formulas (NORGA_SPEC §4)."""

import numpy as np
import pytest

from norga.metrics import AccuracyMatrix


def random_matrix(num_tasks, rng):
    """A filled upper triangle with random sample counts per task; returns the matrix and the official acc array."""
    matrix = AccuracyMatrix(num_tasks)
    acc = np.zeros((num_tasks, num_tasks))
    sizes = rng.integers(20, 200, size=num_tasks)
    for t in range(num_tasks):
        for i in range(t + 1):
            correct = int(rng.integers(0, sizes[i] + 1))
            matrix.update(i, t, correct, int(sizes[i]))
            acc[i, t] = 100.0 * correct / sizes[i]
    return matrix, acc, sizes


def official_till_now(acc, task_id):
    """The official evaluate_till_now, written out with loops (acc zero-initialised, T×T)."""
    diagonal = [acc[i, i] for i in range(task_id + 1)]
    fa = sum(acc[i, task_id] for i in range(task_id + 1)) / (task_id + 1)
    ca_terms = []
    for t in range(task_id + 1):
        ca_terms.append(sum(acc[i, t] for i in range(t + 1)) / (t + 1))
    ca = sum(ca_terms) / len(ca_terms)
    forgetting = backward = 0.0
    if task_id > 0:
        seen = acc[:, : task_id + 1]  # the official matrix has zeros after task_id at that point
        forgetting = sum(max(seen[i, :]) - acc[i, task_id] for i in range(task_id)) / task_id
        backward = sum(acc[i, task_id] - diagonal[i] for i in range(task_id)) / task_id
    return fa, ca, forgetting, backward


@pytest.mark.parametrize("num_tasks", [1, 2, 5, 10])
def test_metrics_match_the_official_formulas_on_random_matrices(num_tasks):
    rng = np.random.default_rng()
    matrix, acc, sizes = random_matrix(num_tasks, rng)
    np.testing.assert_allclose(matrix.accuracies(), acc)
    for task_id in range(num_tasks):
        fa, ca, forgetting, backward = official_till_now(acc, task_id)
        assert matrix.final_average_accuracy(task_id) == pytest.approx(fa)
        assert matrix.cumulative_average_accuracy(task_id) == pytest.approx(ca)
        assert matrix.forgetting(task_id) == pytest.approx(forgetting)
        assert matrix.backward_transfer(task_id) == pytest.approx(backward)
        weighted = 100.0 * matrix.correct[: task_id + 1, task_id].sum() / sizes[: task_id + 1].sum()
        assert matrix.sample_weighted_final_accuracy(task_id) == pytest.approx(weighted)


def test_hand_computed_three_by_three():
    matrix = AccuracyMatrix(3)
    cells = {(0, 0): (90, 100), (0, 1): (80, 100), (1, 1): (70, 100),
             (0, 2): (60, 100), (1, 2): (65, 100), (2, 2): (40, 50)}
    for (i, t), (correct, total) in cells.items():
        matrix.update(i, t, correct, total)
    assert matrix.final_average_accuracy() == pytest.approx((60 + 65 + 80) / 3)
    assert matrix.sample_weighted_final_accuracy() == pytest.approx(100 * 165 / 250)
    assert matrix.cumulative_average_accuracy() == pytest.approx((90 + 75 + (60 + 65 + 80) / 3) / 3)
    assert matrix.forgetting() == pytest.approx(((90 - 60) + (70 - 65)) / 2)
    assert matrix.backward_transfer() == pytest.approx(((60 - 90) + (65 - 70)) / 2)
    assert matrix.forgetting(0) == 0.0 and matrix.final_average_accuracy(0) == 90


def test_round_trips(tmp_path):
    matrix, acc, _ = random_matrix(4, np.random.default_rng())
    again = AccuracyMatrix.from_dict(matrix.to_dict())
    assert np.array_equal(again.correct, matrix.correct) and np.array_equal(again.total, matrix.total)
    matrix.to_csv(tmp_path / "m.csv")
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == "test_task,after_task_1,after_task_2,after_task_3,after_task_4"
    assert [float(x) for x in rows[1].split(",")[1:]] == pytest.approx(acc[0], abs=1e-4)


def test_bad_updates():
    matrix = AccuracyMatrix(2)
    with pytest.raises(IndexError, match="outside the seen part"):
        matrix.update(1, 0, 1, 2)
    with pytest.raises(ValueError, match="correct <= total"):
        matrix.update(0, 0, 3, 2)
    with pytest.raises(IndexError, match="upto must be"):
        matrix.final_average_accuracy(2)
