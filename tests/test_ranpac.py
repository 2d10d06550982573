"""SimpleCIL and RanPAC against hand-computed cases and slow, obvious references (the spec's test oracles)."""

from __future__ import annotations

import json
import logging
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_fixtures import make_engine, run_fixture, tiny_config

from norga.config import ConfigError
from norga.config_io import load_config
from norga.engine.loop import Position
from norga.engine.run_dir import RunDirectory
from norga.methods.base import PredictRequest
from norga.methods.ncm import NCMSettings, NearestClassMean
from norga.methods.ranpac.analytic import (
    RandomFeatureMap,
    RidgeStatistics,
    mirror_upper,
    pack_upper,
    ridge_readout,
    unpack_upper,
)
from norga.methods.ranpac.methods import RanPAC, RanPACSettings, SimpleCIL, SimpleCILSettings
from norga.methods.ranpac.ridge_selection import (
    LAMBDA_GRID,
    RESOLUTION,
    Split,
    best_lambda,
    official_errors,
    resolvable_lambdas,
    split_rows,
    validation_errors,
)
from norga.runtime.features import FeatureSet
from norga.runtime.seeding import derive_seed

EPS = torch.finfo(torch.float64).eps


class HandContext:
    """What the analytic heads read of a run, over hand-made features: `tasks` is a list of (features, labels)."""

    def __init__(self, tasks: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int, seed: int = 0) -> None:
        self.data = [FeatureSet(x.float(), y.long()) for x, y in tasks]
        self.num_classes = num_classes
        self.config = SimpleNamespace(seed=seed, eval=SimpleNamespace(mask_final_logits=True))
        self.model = SimpleNamespace(backbone=SimpleNamespace(num_features=tasks[0][0].shape[1]))
        self.class_to_task = torch.full((num_classes,), -1, dtype=torch.long)
        for index, (_, labels) in enumerate(tasks):
            self.class_to_task[labels.unique()] = index

    def frozen_train_features(self, task: int) -> FeatureSet:
        return self.data[task]

    def classes(self, task: int) -> list[int]:
        return self.data[task].labels.unique().tolist()

    def class_mask_until(self, task: int) -> torch.Tensor:
        return (self.class_to_task >= 0) & (self.class_to_task <= task)

    def frozen_encode(self, images: torch.Tensor) -> torch.Tensor:
        return images


def learn(method, context: HandContext) -> None:
    for task in range(len(context.data)):
        for phase in method.phases(task):
            method.run_phase(task, phase, 0, lambda epoch, logs: None)


def tasks_of(features: torch.Tensor, labels: torch.Tensor, classes_per_task: int) -> list:
    """Split samples into tasks of consecutive class ids."""
    task = labels // classes_per_task
    return [(features[task == t], labels[task == t]) for t in range(int(task.max()) + 1)]


def clustered(n: int, dim: int, classes: int, generator: torch.Generator, spread: float = 1.0):
    """`n` samples of `classes` Gaussian clusters (labels 0..classes-1 round robin)."""
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=generator, dtype=torch.float64) * 2
    return centres[labels] + spread * torch.randn(n, dim, generator=generator, dtype=torch.float64), labels


# ------------------------------------------------------------------------------------------------ SimpleCIL
def test_simplecil_hand_case_prototypes_are_raw_means_scored_by_cosine():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    method = SimpleCIL(HandContext([(x, torch.tensor([0, 0, 1]))], 2), SimpleCILSettings())
    learn(method, method.ctx)
    assert torch.equal(method.prototypes(), torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    query = torch.tensor([[2.0, 1.0]])
    assert method.predict(PredictRequest(query, 1, query)).classes.tolist() == [0]  # cosines 0.8944 and 0.4472


def test_simplecil_averages_raw_features_where_ncm_cosine_averages_normalised_ones():
    """Class 0 = (10, 0) and (0, 1): raw mean (5, 0.5), normalised mean (0.5, 0.5); class 1 = (0, 1). The query
    (1, 2) has cosines 0.534 / 0.894 to SimpleCIL's prototypes and 0.949 / 0.894 to NCM's."""
    x, y = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0, 1])
    query = torch.tensor([[1.0, 2.0]])
    simple = SimpleCIL(HandContext([(x, y)], 2), SimpleCILSettings())
    ncm = NearestClassMean(HandContext([(x, y)], 2), NCMSettings("cosine"))
    learn(simple, simple.ctx)
    learn(ncm, ncm.ctx)
    assert simple.predict(PredictRequest(query, 1, query)).classes.tolist() == [1]
    assert ncm.predict(PredictRequest(query, 1, query)).classes.tolist() == [0]


def test_simplecil_prototypes_do_not_depend_on_sample_or_task_order():
    generator = torch.Generator().manual_seed(0)
    x, y = clustered(60, 5, 6, generator)
    x = x.float().double()  # what the cache holds: float32 features
    forward = SimpleCIL(HandContext(tasks_of(x, y, 2), 6), SimpleCILSettings())
    order = torch.randperm(60, generator=generator)
    backward = SimpleCIL(HandContext(tasks_of(x[order], y[order], 2)[::-1], 6), SimpleCILSettings())
    learn(forward, forward.ctx)
    learn(backward, backward.ctx)
    reference = torch.stack([x[y == c].double().mean(0) for c in range(6)])
    # float32 features summed in float64: any order agrees to a few float64 ulps of the sums
    torch.testing.assert_close(forward.prototypes(), reference, rtol=0, atol=60 * EPS * float(x.abs().max()))
    torch.testing.assert_close(backward.prototypes(), forward.prototypes(), rtol=0, atol=60 * EPS * float(x.abs().max()))


# ------------------------------------------------------------------------------------------ analytic core
def test_ranpac_hand_case_without_projection():
    """rp_dim 0, λ 1: G = diag(10, 1), Q = [[4, 0], [0, 1]], W_o = [[4/11, 0], [0, 1/2]]; (2, 1) scores (8/11, 1/2)."""
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    settings = RanPACSettings(projection_dim=0, ridge_lambda=1.0)
    method = RanPAC(HandContext([(x, torch.tensor([0, 0, 1]))], 2), settings)
    learn(method, method.ctx)
    assert torch.equal(method.head.statistics.gram, torch.tensor([[10.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(method.head.statistics.targets, torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    expected = torch.tensor([[4 / 11, 0.0], [0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(method.head.readout, expected, rtol=4 * EPS, atol=0)
    query = torch.tensor([[2.0, 1.0]])
    torch.testing.assert_close(method.scores(query), torch.tensor([[8 / 11, 0.5]], dtype=torch.float64),
                               rtol=8 * EPS, atol=0)
    assert method.predict(PredictRequest(query, 1, query)).classes.tolist() == [0]


def test_no_projection_is_closed_form_ridge_on_the_raw_features():
    generator = torch.Generator().manual_seed(1)
    x, y = clustered(50, 6, 4, generator)
    stats = RidgeStatistics(6, 4)
    stats.add(RandomFeatureMap(6, 0, seed=0), x, y)
    readout = ridge_readout(stats.gram, stats.targets, 0.5)
    targets = torch.nn.functional.one_hot(y, 4).double()
    reference = torch.linalg.solve(x.T @ x + 0.5 * torch.eye(6, dtype=torch.float64), x.T @ targets).T
    torch.testing.assert_close(readout, reference, rtol=1e-12, atol=1e-14)


def test_projection_is_seeded_unscaled_gaussian_and_relu():
    feature_map = RandomFeatureMap(5, 7, seed=123)
    assert torch.equal(feature_map.weight, torch.randn(5, 7, generator=torch.Generator().manual_seed(123)))
    x = torch.randn(4, 5)
    h = feature_map(x)
    assert h.dtype == torch.float64 and (h >= 0).all()
    torch.testing.assert_close(h, (x.double() @ feature_map.weight.double()).clamp_min(0), rtol=0, atol=0)
    assert torch.equal(feature_map(x, slice(2, 5)), h[:, 2:5])
    assert RandomFeatureMap(5, 0, seed=123).dim == 5 and RandomFeatureMap(5, 7, seed=123).dim == 7


def test_statistics_structure_and_order_invariance():
    """G symmetric with a non-negative diagonal, Q's column c = Σ h of class c; shuffled samples, reversed tasks and
    other chunk sizes give the same G and Q to float64 rounding."""
    generator = torch.Generator().manual_seed(2)
    x, y = clustered(90, 8, 6, generator)
    feature_map = RandomFeatureMap(8, 40, seed=5)
    h = feature_map(x)

    def accumulate(order, chunk, tasks):
        stats = RidgeStatistics(40, 6)
        for features, labels in tasks_of(x[order], y[order], 2)[::-1 if tasks == "reversed" else 1]:
            stats.add(feature_map, features, labels, chunk_rows=chunk)
        return stats

    first = accumulate(torch.arange(90), 7, "forward")
    assert torch.equal(first.gram, first.gram.T) and (first.gram.diagonal() >= 0).all() and first.count == 90
    torch.testing.assert_close(first.targets, torch.stack([h[y == c].sum(0) for c in range(6)], dim=1),
                               rtol=1e-13, atol=0)
    for other in (accumulate(torch.randperm(90, generator=generator), 11, "forward"),
                  accumulate(torch.arange(90), 2048, "reversed")):
        # sums of 90 products: a relative difference of order 90 ulps at most
        assert float((other.gram - first.gram).abs().max() / first.gram.abs().max()) <= 90 * EPS
        assert float((other.targets - first.targets).abs().max() / first.targets.abs().max()) <= 90 * EPS


def test_packed_gram_round_trips_exactly():
    gram = torch.randn(1500, 1500, dtype=torch.float64)
    mirror_upper(gram)
    assert torch.equal(gram, gram.T)
    packed = pack_upper(gram)
    assert packed.numel() == 1500 * 1501 // 2
    assert torch.equal(unpack_upper(packed, 1500), gram)


def test_ridge_limits_least_squares_and_scaled_class_means():
    generator = torch.Generator().manual_seed(3)
    x, y = clustered(200, 6, 3, generator)
    feature_map = RandomFeatureMap(6, 20, seed=9)
    stats = RidgeStatistics(20, 3)
    stats.add(feature_map, x, y)
    h, targets = feature_map(x), torch.nn.functional.one_hot(y, 3).double()
    eigenvalues = torch.linalg.eigvalsh(stats.gram)
    assert eigenvalues[0] > 0  # N > M: H has full column rank
    # λ -> 0: least squares; the ridge bias is λ/σ_min relative, rounding cond·eps
    small = 1e-10 * float(stats.gram.trace()) / 20
    least_squares = torch.linalg.lstsq(h, targets).solution.T
    bound = small / float(eigenvalues[0]) + 1e3 * EPS * float(eigenvalues[-1] / eigenvalues[0])
    assert float((ridge_readout(stats.gram, stats.targets, small) - least_squares).norm() / least_squares.norm()) <= bound
    # λ -> ∞: λ·W_oᵀ -> Q, relative error ‖G‖/λ to first order
    large = 1e12
    scaled = large * ridge_readout(stats.gram, stats.targets, large).T
    assert float((scaled - stats.targets).norm() / stats.targets.norm()) <= 2 * float(eigenvalues[-1]) / large


def test_rows_of_unseen_classes_are_exactly_zero():
    generator = torch.Generator().manual_seed(4)
    x, y = clustered(40, 5, 3, generator)
    stats = RidgeStatistics(16, 6)
    stats.add(RandomFeatureMap(5, 16, seed=1), x, y)
    readout = ridge_readout(stats.gram, stats.targets, 1.0)
    assert (readout[3:] == 0).all() and (readout[:3] != 0).any()


def test_a_failed_cholesky_falls_back_to_the_lu_solve_with_a_warning(caplog):
    gram = -torch.eye(3, dtype=torch.float64)  # not positive definite, not singular at λ 0.5
    targets = torch.randn(3, 2, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="norga"):
        readout = ridge_readout(gram, targets, 0.5)
    assert "not positive definite" in caplog.text
    torch.testing.assert_close(readout, (targets / -0.5).T, rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------- λ selection
def official_lambda_search(h: np.ndarray, targets: np.ndarray, split: Split, lambdas, num_classes: int):
    """The official rule written out: per λ, solve (G_fit + λI) B = Q_fit, MSE of H_val B over all classes."""
    fit, val = split.fit.numpy(), split.validate.numpy()
    gram, right = h[fit].T @ h[fit], h[fit].T @ targets[fit]
    spectrum = np.clip(np.linalg.eigvalsh(gram), 0, None)
    errors, conditions = [], []
    for ridge in lambdas:
        system = gram + ridge * np.eye(len(gram))
        errors.append(((h[val] @ np.linalg.solve(system, right) - targets[val]) ** 2).sum() / (len(val) * num_classes))
        conditions.append((spectrum[-1] + ridge) / (spectrum[0] + ridge))
    return np.array(errors), np.array(conditions), lambdas[int(np.argmin(errors))]


@pytest.mark.parametrize("dim, samples", [(256, 120), (24, 150)], ids=["dual n_fit<M", "primal n_fit>=M"])
def test_one_eigendecomposition_chooses_the_lambda_of_the_per_candidate_solves(dim, samples):
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))  # fresh data each run
    x, y = clustered(samples, 12, 4, generator, spread=2.5)
    feature_map = RandomFeatureMap(12, dim, seed=int(torch.randint(0, 2**31, (1,), generator=generator)))
    targets = torch.nn.functional.one_hot(y, 4).double()
    split = split_rows(samples, 0.8, generator)
    assert (len(split.fit) < dim) == (dim == 256)
    fast = validation_errors(feature_map, x, targets, split, LAMBDA_GRID, num_classes=10).numpy()
    slow, conditions, chosen = official_lambda_search(feature_map(x).numpy(), targets.numpy(), split, LAMBDA_GRID, 10)
    # both routes are exact in exact arithmetic; in float64 each is off by ~cond·eps relative
    conditioned = conditions < 1e8
    assert conditioned[LAMBDA_GRID.index(chosen)]  # the choice is not a rounding artefact
    np.testing.assert_allclose(fast[conditioned], slow[conditioned], rtol=float(1e3 * EPS * conditions.max(
        where=conditioned, initial=1)), atol=0)
    assert best_lambda(torch.from_numpy(fast), LAMBDA_GRID) == chosen
    # the official route in the library (the float32 compat's) agrees too
    np.testing.assert_allclose(official_errors(feature_map, x, targets, split, LAMBDA_GRID, 10).numpy()[conditioned],
                               slow[conditioned], rtol=float(1e3 * EPS * conditions.max(where=conditioned, initial=1)))


def test_lambdas_below_the_float64_resolution_of_g_are_not_candidates():
    gram = torch.diag(torch.tensor([3e9, 1e9, 0.0], dtype=torch.float64))  # tr 4e9: floor 4e13·eps ≈ 8.9e-3
    assert resolvable_lambdas(LAMBDA_GRID, gram) == LAMBDA_GRID[6:]
    # the run: features of norm ~1e6 put every λ up to 10^2 below the floor; λ is chosen among the rest
    generator = torch.Generator().manual_seed(5)
    x, y = clustered(40, 4, 2, generator)
    method = RanPAC(HandContext([(1e6 * x, y)], 2), RanPACSettings(projection_dim=16))
    learn(method, method.ctx)
    skipped = [ridge for ridge, mse in zip(LAMBDA_GRID, method.head.tasks[0]["validation_mse"]) if mse is None]
    floor = RESOLUTION * float(method.head.statistics.gram.trace())
    assert skipped == [ridge for ridge in LAMBDA_GRID if ridge < floor] and len(skipped) >= 11
    assert method.head.tasks[0]["lambda"] >= floor


def test_ties_go_to_the_first_lambda_and_non_finite_errors_are_never_chosen():
    assert best_lambda(torch.tensor([3.0, 1.0, 1.0, 2.0]), [1.0, 2.0, 3.0, 4.0]) == 2.0
    assert best_lambda(torch.tensor([math.nan, 5.0, math.inf]), [1.0, 2.0, 3.0]) == 2.0
    assert best_lambda(torch.tensor([math.nan, math.nan]), [1.0, 2.0]) == 2.0


def test_the_split_is_seeded_and_fits_the_floor_of_the_fraction():
    first = split_rows(101, 0.8, torch.Generator().manual_seed(7))
    again = split_rows(101, 0.8, torch.Generator().manual_seed(7))
    assert len(first.fit) == 80 and len(first.validate) == 21
    assert torch.equal(first.fit, again.fit) and sorted(torch.cat(first).tolist()) == list(range(101))
    with pytest.raises(ValueError, match="at least 2 training samples"):
        split_rows(1, 0.8, torch.Generator())


# ------------------------------------------------------------------------------------------------- readout
def test_inner_product_scores_by_default_and_cosine_as_pilot():
    """Readout rows (2, 0) and (0.5, 0.5), query (1, 0.8): inner products 2 and 0.9 pick class 0, cosines 0.781 and
    0.994 pick class 1."""
    assert RanPACSettings().scores == "inner"
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    context = HandContext([(x, torch.tensor([0, 1]))], 2)
    query = torch.tensor([[1.0, 0.8]])
    picks = {}
    for scores in ("inner", "cosine"):
        method = RanPAC(context, RanPACSettings(projection_dim=0, ridge_lambda=1.0, scores=scores))
        method.head.readout = torch.tensor([[2.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
        picks[scores] = method.predict(PredictRequest(query, 1, query)).classes.tolist()
        if scores == "cosine":
            expected = torch.tensor([[1 / math.sqrt(1.64), 1.8 / math.sqrt(1.64) / math.sqrt(2)]], dtype=torch.float64)
            torch.testing.assert_close(method.scores(query), expected, rtol=1e-7, atol=0)  # query is float32
    assert picks == {"inner": [0], "cosine": [1]}


# ------------------------------------------------------------------------------------- runs and checkpoints
class Crash(RuntimeError):
    pass


def final_checkpoint(directory):
    return torch.load(directory / "checkpoints" / "task3.pt", weights_only=True)


def assert_same_run(straight, resumed, directories):
    for name in straight:
        assert torch.equal(torch.as_tensor(straight[name].correct), torch.as_tensor(resumed[name].correct)), name
    first, second = (final_checkpoint(d) for d in directories)
    assert torch.equal(first["method"]["readout"], second["method"]["readout"])
    assert [t["lambda"] for t in first["method"]["tasks"]] == [t["lambda"] for t in second["method"]["tasks"]]
    for key in ("gram_upper", "targets"):
        assert torch.equal(first["ranpac_statistics"][key], second["ranpac_statistics"][key]), key
    assert torch.equal(first["ranpac_projection"], second["ranpac_projection"])


def test_a_kill_between_tasks_resumes_bit_identically(tmp_path):
    config = tiny_config("ranpac")
    straight = run_fixture(config, tmp_path / "straight")

    def crash(position):
        if position == Position(1, 0, 0):  # task 1 committed, task 2 not begun
            raise Crash("between tasks")

    with pytest.raises(Crash):
        run_fixture(config, tmp_path / "crashed", after_epoch=crash)
    resumed = run_fixture(config, tmp_path / "crashed", resume=True)
    assert_same_run(straight, resumed, [tmp_path / "straight", tmp_path / "crashed"])


def test_older_task_checkpoints_are_not_needed_to_resume(tmp_path, caplog):
    """Each checkpoints/taskK.pt holds G (400 MB packed at M = 10000); a resume reads only state.pt and
    state_heavy.pt, so earlier task checkpoints can be deleted (losing only `norga evaluate` of those tasks)."""
    config = tiny_config("ranpac")
    straight = run_fixture(config, tmp_path / "straight")

    def crash(position):
        if position == Position(2, 0, 0):
            raise Crash("between tasks")

    with pytest.raises(Crash):
        run_fixture(config, tmp_path / "crashed", after_epoch=crash)
    (tmp_path / "crashed" / "checkpoints" / "task1.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="norga"):
        resumed = run_fixture(config, tmp_path / "crashed", resume=True)
    assert "task1.pt is missing or incomplete and cannot be rebuilt" in caplog.text
    assert_same_run(straight, resumed, [tmp_path / "straight", tmp_path / "crashed"])


def test_a_kill_in_the_middle_of_the_statistics_resumes_bit_identically(tmp_path, monkeypatch):
    """Task 2's G and Q are half updated in memory when the process dies; the resume starts the task again from the
    statistics checkpointed after task 1, not from the half-updated ones."""
    config = tiny_config("ranpac")
    straight = run_fixture(config, tmp_path / "straight")
    add, calls = RidgeStatistics.add, []

    def dies_half_way(self, feature_map, features, labels, chunk_rows=None):
        calls.append(len(labels))
        if len(calls) == 2:
            add(self, feature_map, features[: len(labels) // 2], labels[: len(labels) // 2], chunk_rows=3)
            raise Crash("mid statistics")
        add(self, feature_map, features, labels, chunk_rows)

    monkeypatch.setattr(RidgeStatistics, "add", dies_half_way)
    with pytest.raises(Crash):
        run_fixture(config, tmp_path / "crashed")
    monkeypatch.setattr(RidgeStatistics, "add", add)
    state, _ = RunDirectory(tmp_path / "crashed", create=False).load_state()
    assert Position(**state["position"]) == Position(1, 0, 0)
    resumed = run_fixture(config, tmp_path / "crashed", resume=True)
    assert_same_run(straight, resumed, [tmp_path / "straight", tmp_path / "crashed"])


def test_the_checkpoint_holds_the_projection_and_the_exact_statistics(tmp_path):
    config = tiny_config("ranpac")
    directory = RunDirectory(tmp_path / "run")
    directory.write_config(config)
    engine = make_engine(config, directory)
    engine.run()
    saved = final_checkpoint(tmp_path / "run")
    seed = derive_seed(config.seed, "ranpac-projection")
    assert saved["method"]["projection_seed"] == seed
    assert torch.equal(saved["ranpac_projection"], RandomFeatureMap(32, 64, seed).weight)
    gram = unpack_upper(saved["ranpac_statistics"]["gram_upper"], 64)
    assert gram.dtype == torch.float64 and torch.equal(gram, engine.method.head.statistics.gram)
    # G and Q are the sums over every task's training features (test transform), recomputed here in one piece
    frozen = [engine.context.frozen_train_features(task) for task in range(3)]
    h = RandomFeatureMap(32, 64, seed)(torch.cat([f.features for f in frozen]))
    labels = torch.cat([f.labels for f in frozen])
    scale = float((h.T @ h).abs().max())
    assert float((gram - h.T @ h).abs().max()) <= 100 * EPS * scale
    q = h.T @ torch.nn.functional.one_hot(labels, 6).double()
    assert float((saved["ranpac_statistics"]["targets"] - q).abs().max()) <= 100 * EPS * scale
    assert saved["ranpac_statistics"]["count"] == len(labels)
    # W_o is the ridge solution for the last task's λ
    last = saved["method"]["tasks"][-1]
    torch.testing.assert_close(saved["method"]["readout"], ridge_readout(gram, q, last["lambda"]), rtol=1e-9, atol=1e-12)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    record = results["ranpac"]
    assert record["projection_seed"] == seed and record["statistics_dtype"] == "float64"
    assert [t["task"] for t in record["tasks"]] == [1, 2, 3]
    for task in record["tasks"]:
        assert task["lambda"] in LAMBDA_GRID and len(task["validation_mse"]) == len(LAMBDA_GRID)
        tried = {ridge: mse for ridge, mse in zip(LAMBDA_GRID, task["validation_mse"]) if mse is not None}
        assert task["lambda"] == min(tried, key=tried.get)
        assert set(task["seconds"]) == {"statistics", "lambda_search", "solve"}
    assert results["compat"]["scores"] == "inner" and results["compat"]["official_float32"] is False


def test_official_float32_runs_the_official_numerics(tmp_path, monkeypatch):
    from norga.methods.ranpac import ridge_head

    used = []
    monkeypatch.setattr(ridge_head, "official_errors", lambda *a: used.append("per candidate") or official_errors(*a))
    config = tiny_config("ranpac", official_float32=True)
    directory = RunDirectory(tmp_path / "run")
    directory.write_config(config)
    engine = make_engine(config, directory)
    engine.run()
    assert used == ["per candidate"] * 3
    assert engine.method.head.statistics.gram.dtype == engine.method.head.readout.dtype == torch.float32


def test_a_fixed_lambda_skips_the_search():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    method = RanPAC(HandContext([(x, torch.tensor([0, 0, 1]))], 2), RanPACSettings(projection_dim=8, ridge_lambda=3.0))
    learn(method, method.ctx)
    assert method.head.tasks[0]["lambda"] == 3.0 and "validation_mse" not in method.head.tasks[0]
    torch.testing.assert_close(method.head.readout, ridge_readout(method.head.statistics.gram, method.head.statistics.targets, 3.0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("override, message", [
    ("ranpac.lambdas=[]", "ranpac.lambdas is empty"),
    ("ranpac.lambda_fit_fraction=1", "ranpac.lambda_fit_fraction must be < 1"),
    ("ranpac.lambda_fit_fraction=0", "ranpac.lambda_fit_fraction must be"),
    ("ranpac.scores=cos", "did you mean 'cosine'"),
    ("ranpac.projection_dim=-1", "ranpac.projection_dim must be an integer >= 0"),
])
def test_bad_settings_are_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["method=ranpac", override])


def test_a_task_with_a_class_without_samples_is_refused():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    context = HandContext([(x, torch.tensor([0, 0]))], 2)
    context.classes = lambda task: [0, 1]
    with pytest.raises(ValueError, match=r"classes \[1\] of task 1 have no training images"):
        learn(RanPAC(context, RanPACSettings(projection_dim=4)), context)


# ----------------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset, method, benchmark, tasks, backbone", [
    ("cifar100_in21k_ranpac", "ranpac", "cifar100", 10, "vit_base_patch16_224.augreg_in21k"),
    ("imr_in1k_ranpac", "ranpac", "imagenet-r", 10, "vit_base_patch16_224.augreg_in21k_ft_in1k"),
    ("cub_in1k_ranpac", "ranpac", "cub200", 10, "vit_base_patch16_224.augreg_in21k_ft_in1k"),
    ("cifar100_in21k_ranpac_adapter", "ranpac", "cifar100", 10, "vit_base_patch16_224.augreg_in21k"),
    ("imr_in1k_ranpac_ssf", "ranpac", "imagenet-r", 10, "vit_base_patch16_224.augreg_in21k_ft_in1k"),
    ("cub_in1k_ranpac_adapter", "ranpac", "cub200", 10, "vit_base_patch16_224.augreg_in21k_ft_in1k"),
    ("cifar100_in21k_simplecil", "simplecil", "cifar100", 20, "vit_base_patch16_224.augreg_in21k"),
    ("cub_in21k_simplecil", "simplecil", "cub200", 20, "vit_base_patch16_224.augreg_in21k"),
    ("imr_in21k_simplecil", "simplecil", "imagenet-r", 40, "vit_base_patch16_224.augreg_in21k"),
])
def test_presets_of_the_official_configurations(preset, method, benchmark, tasks, backbone):
    """RanPAC's args/*_publish.csv ("No Phase 1" rows, and the full method's with the PETL each dataset's row
    names) and RevisitingCIL's exps/simplecil/*.json (spec §4)."""
    config = load_config(preset)
    assert (config.method, config.data.benchmark, config.data.num_tasks, config.backbone.name, config.seed) == (
        method, benchmark, tasks, backbone, 1993)
    s = config.settings
    kind = {"adapter": "adapter", "ssf": "ssf"}.get(preset.rsplit("_", 1)[-1], "none")
    assert s.first_session == kind
    if kind != "none":
        t, a = s.adaptation.train, s.adaptation
        assert (t.epochs, t.lr, t.batch_size, t.weight_decay, t.momentum, t.optimizer, t.schedule) == (
            20, 0.01, 48, 0.0005, 0.9, "sgd", "cosine_annealing")
        assert (a.adapter_width, a.adapter_scale, a.adapter_dropout) == (64, 0.1, 0.1)
    if method == "ranpac":
        assert (s.projection_dim, s.lambdas, s.lambda_fit_fraction, s.scores, s.official_float32) == (
            10000, LAMBDA_GRID, 0.8, "inner", False)


def test_the_quickstart_preset_runs_both_heads_at_their_official_defaults():
    for method in ("simplecil", "ranpac"):
        config = load_config("quickstart", [f"method={method}"])
        assert config.settings == type(config.settings)()
