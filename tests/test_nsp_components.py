"""VPT-NSP²'s numeric components against slow, obvious references (spec oracles O1-O3, O6, O7, O10):
the projected Adam, the per-layer feature statistics and the null-space projectors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from norga.methods.nsp.null_space import (
    NullSpaceSettings,
    adaptive_null_start,
    descending_eigh,
    layer_projectors,
    null_space_projector,
    paper_null_start,
    projector,
)
from norga.methods.nsp.statistics import (
    LayerStatistics,
    TaskStatistics,
    affinity_features,
    prompt_attention,
)
from norga.runtime.projected_adam import ProjectedAdam

LR, BETAS, EPS, WD = 0.01, (0.9, 0.999), 1e-8, 0.05


def fresh_seed() -> int:
    """A seed drawn from torch's generator, which the suite seeds afresh for every test (and replays on request)."""
    return int(torch.randint(2**62, ()))


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(fresh_seed())


def named_tensors(generator: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A prompt (1, M, D), a head weight and a bias: the shapes the optimizer meets."""
    shapes = {"prompts.0": (1, 4, 6), "head.weight": (3, 6), "head.bias": (3,)}
    return {name: torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for name, shape in shapes.items()}


def gradient_sequence(params: dict[str, torch.Tensor], steps: int, generator: torch.Generator) -> list[dict]:
    return [{name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in params.items()}
            for _ in range(steps)]


def run(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor], grads: list[dict]) -> None:
    for step_grads in grads:
        for name, p in params.items():
            p.grad = step_grads[name].clone()
        optimizer.step()


def clone(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().requires_grad_() for name, p in params.items()}


def random_orthonormal(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0]


# ---------------------------------------------------------------------------------------------- ProjectedAdam (O6)

def test_without_projections_it_is_torch_adam_bit_for_bit():
    g = fresh_generator()
    params = named_tensors(g)
    grads = gradient_sequence(params, 7, g)
    ours, single, multi = clone(params), clone(params), clone(params)
    run(ProjectedAdam(ours.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD), ours, grads)
    run(torch.optim.Adam(single.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False), single, grads)
    run(torch.optim.Adam(multi.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True), multi, grads)
    for name in params:
        assert torch.equal(ours[name], single[name]), name
        torch.testing.assert_close(ours[name], multi[name])  # the foreach path orders two roundings differently


def test_identity_projectors_and_eta_zero_leave_adam_unchanged():
    """O6(b): η1 = η2 = 0 makes both projectors the identity exactly, and an identity-projected step is Adam's."""
    g = fresh_generator()
    covariance = torch.randn(6, 6, generator=g, dtype=torch.float64)
    right = null_space_projector(covariance @ covariance.T, nullity="adaptive", normalize=True, eta=0.0)
    assert torch.equal(right, torch.eye(6, dtype=torch.float64))
    params = named_tensors(g)
    grads = gradient_sequence(params, 5, g)
    ours, reference = clone(params), clone(params)
    optimizer = ProjectedAdam(ours.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    optimizer.set_projection("prompts.0", left=torch.eye(4), right=right)
    run(optimizer, ours, grads)
    run(torch.optim.Adam(reference.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False),
        reference, grads)
    for name in params:
        assert torch.equal(ours[name], reference[name]), name


def reference_projected_adam(theta: torch.Tensor, grads: list[torch.Tensor], left: torch.Tensor,
                             right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The update written out in float64: moments of grad + wd·θ (raw, coupled L2), bias-corrected step u,
    θ ← θ + L·u·R. Returns θ and the two moments."""
    theta = theta.detach().clone().to(torch.float64).reshape(left.shape[0], right.shape[0])
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for t, grad in enumerate(grads, start=1):
        raw = grad.to(torch.float64).reshape(theta.shape) + WD * theta
        m = BETAS[0] * m + (1 - BETAS[0]) * raw
        v = BETAS[1] * v + (1 - BETAS[1]) * raw * raw
        u = -LR / (1 - BETAS[0] ** t) * m / (v.sqrt() / math.sqrt(1 - BETAS[1] ** t) + EPS)
        theta = theta + left @ u @ right
    return theta, m, v


def test_projection_acts_on_the_final_step_after_coupled_weight_decay():
    """O6(c, d): moments and bias correction see the raw gradient plus wd·θ; only the step is projected."""
    g = fresh_generator()
    params = named_tensors(g, torch.float64)
    grads = gradient_sequence(params, 6, g)
    left = random_orthonormal(4, g)[:, :2] @ random_orthonormal(4, g)[:2]  # rank-2, not symmetric: order matters
    right = torch.randn(6, 6, generator=g, dtype=torch.float64)
    ours = clone(params)
    optimizer = ProjectedAdam(ours.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    optimizer.set_projection("prompts.0", left=left, right=right)
    run(optimizer, ours, grads)
    theta, m, v = reference_projected_adam(params["prompts.0"], [s["prompts.0"] for s in grads], left, right)
    state = optimizer.state[ours["prompts.0"]]
    torch.testing.assert_close(ours["prompts.0"].detach().reshape(4, 6), theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["exp_avg"].reshape(4, 6), m, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["exp_avg_sq"].reshape(4, 6), v, rtol=1e-12, atol=1e-16)
    assert state["step"].item() == 6
    transposed, _, _ = reference_projected_adam(params["prompts.0"], [s["prompts.0"] for s in grads], right[:4, :4].T,
                                                right)
    assert not torch.allclose(theta, transposed)  # the reference is sensitive to the side the projectors act on


def test_unprojected_parameters_take_plain_adam_steps_beside_projected_ones():
    """O6(e): the head is not registered and moves exactly as under torch's Adam."""
    g = fresh_generator()
    params = named_tensors(g)
    grads = gradient_sequence(params, 5, g)
    ours, reference = clone(params), clone(params)
    optimizer = ProjectedAdam(ours.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    optimizer.set_projection("prompts.0", right=torch.zeros(6, 6))
    run(optimizer, ours, grads)
    run(torch.optim.Adam(reference.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False),
        reference, grads)
    assert torch.equal(ours["prompts.0"], params["prompts.0"])  # a zero projector stops the prompt
    assert torch.equal(ours["head.weight"], reference["head.weight"])
    assert torch.equal(ours["head.bias"], reference["head.bias"])
    prompt_state = optimizer.state[ours["prompts.0"]]
    assert prompt_state["exp_avg"].abs().min() > 0  # yet its moments follow the raw gradient


def saved(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_from_a_saved_state_is_bit_identical():
    """O10 for the optimizer: moments, step counts and lr survive save / load; projections must be set again."""
    g = fresh_generator()
    params = named_tensors(g)
    grads = gradient_sequence(params, 8, g)
    left, right = torch.randn(4, 4, generator=g), torch.randn(6, 6, generator=g)

    def build(tensors: dict[str, torch.Tensor]) -> ProjectedAdam:
        optimizer = ProjectedAdam(tensors.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        optimizer.set_projection("prompts.0", left=left, right=right)
        return optimizer

    straight = clone(params)
    uninterrupted = build(straight)
    run(uninterrupted, straight, grads[:3])
    uninterrupted.param_groups[0]["lr"] = 0.5 * LR  # a schedule's change, kept in the group state
    run(uninterrupted, straight, grads[3:])
    first = clone(params)
    optimizer = build(first)
    run(optimizer, first, grads[:3])
    optimizer.param_groups[0]["lr"] = 0.5 * LR
    state, snapshot = saved(optimizer.state_dict()), {name: p.detach().clone() for name, p in first.items()}
    resumed = {name: p.clone().requires_grad_() for name, p in snapshot.items()}
    again = build(resumed)
    again.load_state_dict(state)
    run(again, resumed, grads[3:])
    for name in params:
        assert torch.equal(resumed[name], straight[name]), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(again.state[resumed[name]][key], uninterrupted.state[straight[name]][key]), (name, key)

    unprojected = ProjectedAdam(clone(params).items(), lr=LR)
    with pytest.raises(ValueError, match="set_projection"):
        unprojected.load_state_dict(state)
    other = build(clone(params))
    other.set_projection("prompts.0", left=left, right=right + 1e-7)
    with pytest.raises(ValueError, match="set_projection"):
        other.load_state_dict(state)
    renamed = {f"x.{name}": p for name, p in clone(params).items()}
    with pytest.raises(ValueError, match="same named parameters"):
        ProjectedAdam(renamed.items(), lr=LR).load_state_dict(saved(ProjectedAdam(clone(params).items()).state_dict()))


def test_state_is_torch_compatible_both_ways():
    g = fresh_generator()
    params = named_tensors(g)
    grads = gradient_sequence(params, 6, g)
    ours, theirs = clone(params), clone(params)
    optimizer = ProjectedAdam(ours.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    run(optimizer, ours, grads[:3])
    torch_adam = torch.optim.Adam(theirs.items(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(ours[name])
    torch_adam.load_state_dict(saved(optimizer.state_dict()))
    run(torch_adam, theirs, grads[3:])
    run(optimizer, ours, grads[3:])
    for name in params:
        assert torch.equal(ours[name], theirs[name]), name
    fresh = ProjectedAdam(clone(theirs).items(), lr=LR)
    fresh.load_state_dict(saved(torch_adam.state_dict()))  # a plain Adam state: no projections
    assert fresh.param_groups[0]["weight_decay"] == WD


def test_projections_are_validated_replaced_and_removed():
    g = fresh_generator()
    params = named_tensors(g)
    optimizer = ProjectedAdam(params.items(), lr=LR)
    with pytest.raises(ValueError, match="must be 6x6"):
        optimizer.set_projection("prompts.0", right=torch.eye(4))
    with pytest.raises(KeyError, match="no parameter named 'prompt'"):
        optimizer.set_projection("prompt", right=torch.eye(6))
    with pytest.raises(TypeError, match="named parameters"):
        ProjectedAdam(params.values(), lr=LR)
    with pytest.raises(ValueError, match="unique, got \\['head.bias'\\]"):
        optimizer.add_param_group({"params": [("head.bias", torch.zeros(3, requires_grad=True))]})
    assert len(optimizer.param_groups) == 1
    first, second = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    optimizer.set_projection("prompts.0", right=first)
    first.zero_()  # the optimizer holds its own copy
    optimizer.set_projection("prompts.0", right=second)  # a new task's projector replaces the old one
    assert torch.equal(optimizer.projection("prompts.0")[1], second) and optimizer.projected_names == ["prompts.0"]
    optimizer.set_projection("prompts.0")
    assert optimizer.projection("prompts.0") == (None, None) and optimizer.projected_names == []


# ------------------------------------------------------------------------------------------------ statistics (O7)

def test_affinity_covariance_is_the_gram_of_the_stacked_affinity_rows():
    """C1 from per-head query Grams equals Ω1ᵀΩ1 of the rows q_h·W_k,h, built one by one; with the official
    per-batch mean each batch adds its Gram divided by its B·H·N rows (a short batch weighs as much as a full one)."""
    g = fresh_generator()
    heads, head_dim, dim, prompts, tokens = 3, 4, 10, 5, 6
    key_weight = torch.randn(heads * head_dim, dim, generator=g)
    batches = [(torch.randn(b, heads, tokens, head_dim, generator=g),
                torch.rand(b, heads, tokens, prompts, generator=g)) for b in (4, 2, 3)]
    plain, official = (LayerStatistics.empty(heads, head_dim, prompts, mean) for mean in (False, True))
    for queries, attention in batches:
        plain.add(queries, attention)
        official.add(queries, attention)
    expected_c1, expected_c2 = torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(prompts, prompts,
                                                                                       dtype=torch.float64)
    official_c1 = torch.zeros_like(expected_c1)
    for queries, attention in batches:
        rows = [queries[b, h, n].double() @ key_weight[h * head_dim:(h + 1) * head_dim].double()
                for b in range(queries.shape[0]) for h in range(heads) for n in range(tokens)]
        gram = sum(torch.outer(r, r) for r in rows)
        expected_c1 += gram
        official_c1 += gram / len(rows)
        expected_c2 += sum(torch.outer(s, s) for s in attention.double().reshape(-1, prompts))
        assert torch.allclose(affinity_features(queries.double(), key_weight.double()), torch.stack(rows))
    torch.testing.assert_close(plain.affinity_covariance(key_weight), expected_c1, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(plain.aggregation_covariance(), expected_c2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(official.affinity_covariance(key_weight), official_c1, rtol=1e-12, atol=1e-12)
    assert (plain.images, plain.batches) == (9, 3)


def test_statistics_do_not_depend_on_batch_order_or_partition():
    g = fresh_generator()
    queries, attention = torch.randn(12, 2, 5, 3, generator=g), torch.rand(12, 2, 5, 4, generator=g)
    ordered, shuffled = LayerStatistics.empty(2, 3, 4), LayerStatistics.empty(2, 3, 4)
    for chunk in range(0, 12, 4):
        ordered.add(queries[chunk:chunk + 4], attention[chunk:chunk + 4])
    permutation = torch.randperm(12, generator=g)
    for indices in (permutation[:5], permutation[5:6], permutation[6:]):
        shuffled.add(queries[indices], attention[indices])
    torch.testing.assert_close(ordered.query_gram, shuffled.query_gram, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ordered.attention_gram, shuffled.attention_gram, rtol=1e-13, atol=1e-13)


def test_prompt_attention_and_the_affinity_rows_are_what_the_conditions_need():
    """Ω2 rows are the softmax over image and prompt keys restricted to the prompts (non-negative, sum < 1); a change
    δ of the prompt's key input changes the image→prompt logits by exactly Ω1·δᵀ (the key bias drops out)."""
    g = fresh_generator()
    heads, head_dim, tokens, prompts = 2, 3, 4, 5
    dim = heads * head_dim
    queries = torch.randn(1, heads, tokens, head_dim, generator=g, dtype=torch.float64)
    image_keys = torch.randn(1, heads, tokens, head_dim, generator=g, dtype=torch.float64)
    w_k, b_k = torch.randn(dim, dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    p, delta = torch.randn(prompts, dim, generator=g, dtype=torch.float64), torch.randn(prompts, dim, generator=g,
                                                                                          dtype=torch.float64)

    def keys(prompt: torch.Tensor) -> torch.Tensor:
        return (prompt @ w_k.T + b_k).reshape(prompts, heads, head_dim).transpose(0, 1)[None]

    scale = head_dim ** -0.5
    attention = prompt_attention(queries, image_keys, keys(p), scale)
    for h in range(heads):
        for n in range(tokens):
            logits = torch.tensor([queries[0, h, n] @ k for k in [*image_keys[0, h], *keys(p)[0, h]]]) * scale
            torch.testing.assert_close(attention[0, h, n], torch.softmax(logits, 0)[tokens:], rtol=1e-12, atol=1e-15)
    assert (attention >= 0).all() and (attention.sum(-1) < 1).all()
    change = (queries @ keys(p + delta).transpose(-2, -1) - queries @ keys(p).transpose(-2, -1)).reshape(-1, prompts)
    torch.testing.assert_close(change, affinity_features(queries, w_k) @ delta.T, rtol=1e-10, atol=1e-12)


def test_task_statistics_merge_and_round_trip():
    g = fresh_generator()

    def task(images: int) -> TaskStatistics:
        layers = {}
        for name in ("prompts.0", "prompts.1"):
            stats = LayerStatistics.empty(2, 3, 4)
            stats.add(torch.randn(images, 2, 5, 3, generator=g), torch.rand(images, 2, 5, 4, generator=g))
            layers[name] = stats
        return TaskStatistics(layers)

    first, second = task(3), task(5)
    summed = TaskStatistics().merged(first).merged(second, "sum")
    averaged = TaskStatistics().merged(first, "mean").merged(second, "mean")
    for name in ("prompts.0", "prompts.1"):
        a, b = first.layers[name], second.layers[name]
        assert torch.equal(summed.layers[name].query_gram, a.query_gram + b.query_gram)
        torch.testing.assert_close(averaged.layers[name].attention_gram,
                                   3 / 8 * a.attention_gram + 5 / 8 * b.attention_gram, rtol=1e-14, atol=0)
        assert summed.layers[name].images == 8
    restored = TaskStatistics.from_state_dict(saved(summed.state_dict()))
    assert restored.layers.keys() == summed.layers.keys()
    for name, stats in summed.layers.items():
        assert torch.equal(restored.layers[name].query_gram, stats.query_gram)
        assert torch.equal(restored.layers[name].attention_gram, stats.attention_gram)
        assert (restored.layers[name].images, restored.layers[name].batches) == (stats.images, stats.batches)


# ------------------------------------------------------------------------------------------ null-space rules (O2)

def spectrum(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("values, official, paper", [
    ((10, 1, 0.5, 0.1), 3, 2), ((10, 9, 1, 0.5), 2, 1), ((4, 3, 2, 1), 3, 2), ((10, 1, 1, 1, 0.5), 2, 3)])
def test_nullity_on_fixed_spectra(values, official, paper):
    """The official cut puts the elbow itself into the null set (one more than Eq. 28 read literally) and, with ties,
    every eigenvalue equal to the elbow's."""
    assert len(values) - adaptive_null_start(spectrum(*values)) == official
    assert len(values) - paper_null_start(spectrum(*values)) == paper


def test_adaptive_nullity_on_long_spectra_and_offsets():
    step = np.concatenate([np.linspace(100, 50, 50), np.linspace(1e-3, 1e-5, 718)])
    assert 768 - adaptive_null_start(torch.from_numpy(step)) == 709  # smoothing keeps ~9 tiny directions out
    assert 768 - adaptive_null_start(torch.from_numpy(100 * np.exp(-np.arange(768) / 30))) == 741
    g = np.random.default_rng(fresh_seed())
    for _ in range(20):
        assert 4 - adaptive_null_start(torch.from_numpy(np.sort(g.random(4))[::-1].copy())) in (2, 3)
    values = spectrum(10, 1, 0.5, 0.1)  # start 1
    assert [adaptive_null_start(values, offset) for offset in (0.5, 2, 5, -3)] == [2, 3, 3, 0]


def reference_adaptive_start(points: np.ndarray) -> int:
    """The official rule written out: a Gaussian kernel (σ = 10, radius 40) over the half-sample-reflected spectrum,
    curvature by a loop, int(1.5 %·k) values dropped at each end, the elbow's value as threshold."""
    k = len(points)
    radius = 40
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / 10.0) ** 2)
    weights /= weights.sum()
    padded = np.concatenate([points[:radius][::-1], points, points[-radius:][::-1]])
    smooth = np.array([sum(weights[j] * padded[i + j] for j in range(2 * radius + 1)) for i in range(k)])
    curvature = [smooth[i] - 2 * smooth[i + 1] + smooth[i + 2] for i in range(k - 2)]
    trim = int(k * 0.015)
    best = max(range(trim, k - 2 - trim), key=lambda i: (curvature[i], -i))
    return max(i for i in range(k) if points[i] >= points[best + 1])


def test_adaptive_nullity_matches_the_written_out_rule_on_random_spectra():
    g = np.random.default_rng(fresh_seed())
    for size in (128, 300):
        for _ in range(3):
            points = np.sort(g.lognormal(0.0, 3.0, size))[::-1].copy()
            assert adaptive_null_start(torch.from_numpy(points)) == reference_adaptive_start(points)


# ------------------------------------------------------------------------------------- projector algebra (O1)

def psd_with_spectrum(values: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    basis = random_orthonormal(len(values), generator)
    return basis @ torch.diag(values) @ basis.T, basis


def test_the_papers_projector_is_the_orthogonal_projector_onto_the_cut_eigenvectors():
    g = fresh_generator()
    values = torch.arange(12, 0, -1, dtype=torch.float64) + 0.5 * torch.rand(12, generator=g, dtype=torch.float64)
    covariance, basis = psd_with_spectrum(values, g)
    start = paper_null_start(values)
    p = null_space_projector(covariance)
    torch.testing.assert_close(p, p.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-13)
    torch.testing.assert_close(p @ basis[:, :start], torch.zeros(12, start, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(p @ basis[:, start:], basis[:, start:], rtol=0, atol=1e-13)
    assert math.isclose(torch.trace(p).item(), 12 - start, abs_tol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.97, 0.5])
def test_the_official_projector_is_the_specs_formula(eta):
    """B = U0ᵀU0/‖U0ᵀU0‖_F from the null rows of an SVD, blended η·B + (1 − η)·I (numpy, as the official code):
    ‖B‖_F = 1, trace √R, √R·B idempotent, eigenvalues 1 − η (k − R times) and η/√R + 1 − η (R times)."""
    g = fresh_generator()
    values = torch.arange(10, 0, -1, dtype=torch.float64) ** 2 + torch.rand(10, generator=g, dtype=torch.float64)
    covariance, basis = psd_with_spectrum(values, g)
    b = null_space_projector(covariance, nullity="adaptive", normalize=True, eta=eta)
    _, singular, vh = np.linalg.svd(covariance.numpy())
    nullity = 10 - adaptive_null_start(torch.from_numpy(singular))
    u0 = vh[10 - nullity:]
    unblended = u0.T @ u0 / np.linalg.norm(u0.T @ u0)
    torch.testing.assert_close(b, torch.from_numpy(eta * unblended + (1 - eta) * np.eye(10)), rtol=0, atol=1e-13)
    assert math.isclose(np.linalg.norm(unblended), 1.0) and math.isclose(np.trace(unblended), math.sqrt(nullity))
    np.testing.assert_allclose(math.sqrt(nullity) * unblended @ unblended, unblended, atol=1e-13)
    expected = sorted([1 - eta] * (10 - nullity) + [eta / math.sqrt(nullity) + 1 - eta] * nullity)
    np.testing.assert_allclose(np.linalg.eigvalsh(b.numpy()), expected, atol=1e-13)
    torch.testing.assert_close(b @ basis[:, :10 - nullity], (1 - eta) * basis[:, :10 - nullity], rtol=0, atol=1e-13)


def test_projector_needs_a_null_direction_and_eta_in_range():
    with pytest.raises(ValueError, match="empty"):
        projector(torch.zeros(4, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match="eta"):
        projector(torch.eye(4, dtype=torch.float64)[:, :2], eta=1.5)


def test_settings_default_to_the_paper_and_switch_each_part():
    stats = LayerStatistics.empty(2, 3, 4)
    g = fresh_generator()
    stats.add(torch.randn(6, 2, 5, 3, generator=g), torch.rand(6, 2, 5, 4, generator=g))
    key_weight = torch.randn(6, 6, generator=g)
    c1, c2 = stats.affinity_covariance(key_weight), stats.aggregation_covariance()
    left, right = layer_projectors(stats, key_weight, NullSpaceSettings())
    assert torch.equal(left, null_space_projector(c2, "paper")) and torch.equal(right, null_space_projector(c1, "paper"))
    for p in (left, right):
        torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-12)
    official = NullSpaceSettings.official(0.9)
    assert (official.nullity, official.normalize_projection, official.per_batch_mean) == ("adaptive", True, True)
    official.eta_aggregation = 0.8
    left, right = layer_projectors(stats, key_weight, official)
    assert torch.equal(left, null_space_projector(c2, "adaptive", normalize=True, eta=0.8))
    assert torch.equal(right, null_space_projector(c1, "adaptive", normalize=True, eta=0.9))
    assert torch.linalg.eigvalsh(right).min().item() == pytest.approx(0.1)  # (1 − η) on the kept directions
    off = NullSpaceSettings(use_affinity_projection=False, use_aggregation_projection=False)
    assert layer_projectors(stats, key_weight, off) == (None, None)


# --------------------------------------------------------------------- exact invariance of old outputs (O3)

class ToyBlock:
    """A prompted attention block in float64: LayerNorm on the image tokens, prompts fed to keys and values
    directly (LN1 bypassed on the prompt path, so the paper's conditions are exact), residual output."""

    def __init__(self, dim: int, heads: int, g: torch.Generator) -> None:
        f64 = {"generator": g, "dtype": torch.float64}
        self.heads, self.head_dim = heads, dim // heads
        self.w_q, self.w_k, self.w_v, self.w_o = (torch.randn(dim, dim, **f64) / dim ** 0.5 for _ in range(4))
        self.b_q, self.b_k, self.b_v = (torch.randn(dim, **f64) for _ in range(3))
        self.gain, self.shift = torch.randn(dim, **f64), torch.randn(dim, **f64)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.heads, self.head_dim).transpose(0, 1)[None]

    def parts(self, x: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Image queries, image keys, image values and prompt keys, values (1, H, ·, d)."""
        z = torch.nn.functional.layer_norm(x, x.shape[-1:], self.gain, self.shift)
        return (self.split(z @ self.w_q.T + self.b_q), self.split(z @ self.w_k.T + self.b_k),
                self.split(z @ self.w_v.T + self.b_v), self.split(prompt @ self.w_k.T + self.b_k),
                self.split(prompt @ self.w_v.T + self.b_v))

    def attention(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        queries, image_keys, image_values, prompt_keys, prompt_values = self.parts(x, prompt)
        keys, values = torch.cat([image_keys, prompt_keys], 2), torch.cat([image_values, prompt_values], 2)
        return torch.softmax(queries @ keys.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1) @ values

    def __call__(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return x + self.attention(x, prompt)[0].transpose(0, 1).reshape(x.shape) @ self.w_o.T

    def statistics(self, x: torch.Tensor, prompt: torch.Tensor) -> LayerStatistics:
        queries, image_keys, _, prompt_keys, _ = self.parts(x, prompt)
        stats = LayerStatistics.empty(self.heads, self.head_dim, prompt.shape[0])
        stats.add(queries, prompt_attention(queries, image_keys, prompt_keys, self.head_dim ** -0.5))
        return stats

    def exact_projectors(self, stats: LayerStatistics, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Onto the eigenvectors beyond the features' rank (H·N generic rows; a relative threshold would misjudge
        the rare nearly dependent attention rows): (B2, B1), η = 1, not normalised."""
        return tuple(projector(descending_eigh(c)[1][:, rank:])
                     for c in (stats.aggregation_covariance(), stats.affinity_covariance(self.w_k)))


def adam_step(prompts: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float,
              projections: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The prompts after one ProjectedAdam step on `grads` with `projections` (left, right) per name."""
    params = {name: p.clone().requires_grad_() for name, p in prompts.items()}
    optimizer = ProjectedAdam(params.items(), lr=lr)
    for name, (left, right) in projections.items():
        optimizer.set_projection(name, left=left, right=right)
    for name, p in params.items():
        p.grad = grads[name].clone()
    optimizer.step()
    assert all(not torch.equal(params[name], prompts[name]) for name in prompts)
    return {name: p.detach() for name, p in params.items()}


def test_a_projected_step_leaves_old_outputs_unchanged():
    """O3: with exact null spaces and η = 1 a ProjectedAdam step on a block's prompts leaves the old image tokens'
    attention outputs unchanged to round-off, while the unprojected step moves them by about its size."""
    g = fresh_generator()
    dim, heads, tokens, prompts = 24, 2, 3, 8
    block, old_images = ToyBlock(dim, heads, g), torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    prompt = {"prompt": torch.randn(prompts, dim, generator=g, dtype=torch.float64)}
    projections = {"prompt": block.exact_projectors(block.statistics(old_images, prompt["prompt"]), heads * tokens)}
    grad = {"prompt": torch.randn(prompts, dim, generator=g, dtype=torch.float64)}
    before = block.attention(old_images, prompt["prompt"])
    for lr in (1e-2, 1e-3, 1e-4):
        moved = {projected: (block.attention(old_images, adam_step(prompt, grad, lr, projections if projected
                                                                   else {})["prompt"]) - before).abs().max().item()
                 for projected in (True, False)}
        assert moved[True] < 1e-13, moved
        assert moved[False] > 0.05 * lr, moved


def test_projected_steps_in_every_layer_leave_the_last_output_unchanged():
    """O5: two prompted blocks, statistics of each taken on its old input with the old prompts, both prompts
    updated at once: block 1's output is unchanged, so block 2's statistics still hold and its output is too."""
    g = fresh_generator()
    dim, heads, tokens, prompts = 24, 2, 3, 8
    blocks = [ToyBlock(dim, heads, g) for _ in range(2)]
    old_images = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    old = {f"prompts.{i}": torch.randn(prompts, dim, generator=g, dtype=torch.float64) for i in range(2)}

    def network(prompt: dict[str, torch.Tensor], statistics: TaskStatistics | None = None) -> torch.Tensor:
        x = old_images
        for i, block in enumerate(blocks):
            if statistics is not None:
                statistics.layers[f"prompts.{i}"] = block.statistics(x, prompt[f"prompts.{i}"])
            x = block(x, prompt[f"prompts.{i}"])
        return x

    statistics = TaskStatistics()
    before = network(old, statistics)
    projections = {name: blocks[int(name[-1])].exact_projectors(stats, heads * tokens)
                   for name, stats in statistics.layers.items()}
    grads = {name: torch.randn(prompts, dim, generator=g, dtype=torch.float64) for name in old}
    moved = {projected: (network(adam_step(old, grads, 1e-3, projections if projected else {})) - before).abs().max()
             for projected in (True, False)}
    assert moved[True] < 1e-12, moved
    assert moved[False] > 1e-5, moved
