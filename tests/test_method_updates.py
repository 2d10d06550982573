"""Each baseline's training update pinned against an independent, slow recomputation (as HiDe/NoRGa's is).

For L2P, DualPrompt, S-Prompt++, CODA-Prompt and the linear probe, the method's own `run_phase` trains on one
batch of fresh random images per epoch; the test recomputes from scratch, in float64 with plain torch (the ViT
by hand, `slow_vit`), the loss with every term as NORGA_SPEC §1.8 and the official code define it (masked
cross-entropy over the task's classes, minus λ times the pull constraint ``mean_b Σ_k cos(query_b,
key_selected)``, plus μ times CODA's orthogonality penalty of K, A and P), and the optimizer's steps by hand
(`hand_optimizer`: Adam or SGD, clipping, weight decay, the lr schedule). Each epoch's loss and the change of
every trained tensor (prompts, keys, gates, head) must match; frozen tensors must not move.

Two settings per method: the method's own (the tiny fixture's section: Adam, its clipping and schedule, one
step) and one that reaches the rest of the update (SGD with weight decay, a gradient clip that binds, a
decaying schedule over three steps, score gates, L2P's batch-wise vote, the official prefix layout).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from engine_fixtures import make_engine, tiny_config
from hand_optimizer import ADAM_EPS, HandOptimizer, epoch_lr
from slow_vit import SlowPrefix, check_plain, cls_features, masked_cross_entropy
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from norga.runtime.context import TaskDatasets

BATCH = 4  # one batch per epoch (even: the official prefix layout splits it in halves)
SELECTION_MARGIN = 1e-4  # a top-k choice closer than this (float64 cosines) could go either way in fp32
ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": lambda s: 0.5 * s * (1 + torch.erf(s / math.sqrt(2)))}


class UnclearInputs(Exception):
    """The drawn inputs cannot tell the behaviours apart (a top-k choice too close to call, a batch-wise vote
    that every sample agrees with): draw others."""


@dataclass
class Expect:
    """What the method is expected to do, written down independently of its code (NORGA_SPEC §1.8)."""

    optimizer: str = "adam"
    lr: float = 0.01
    clip: float | None = 1.0  # "calibrate": half the first gradient's norm, so that clipping binds
    weight_decay: float = 0.0
    schedule: str = "constant"
    epochs: int = 1
    pull_weight: float = 0.0
    ortho_weight: float = 0.0
    selection: str = "task"  # task mask while training | similarity (L2P)
    batchwise: bool = False
    layout: str = "correct"
    sequential_init: bool = False
    gate: str | None = None
    gate_trained: bool = False


@dataclass
class Case:
    method: str
    task: int
    expect: Expect
    changes: dict[str, Any] = field(default_factory=dict)  # --set keys of the method's section


SGD = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.01, "schedule": "cosine", "epochs": 3}


def sgd_case(method: str, task: int, section: dict[str, Any], schedule: str = "cosine", **expect: Any) -> Case:
    """`method` trained with SGD: weight decay, a clip that binds, a decaying `schedule` over three steps (one
    batch each), plus the `section` settings; `expect` is what those settings mean to the recomputation."""
    optim = SGD | {"schedule": schedule}
    return Case(method, task, Expect(**optim, clip="calibrate", **expect),
                {f"train.{key}": value for key, value in optim.items()} | section)


CASES = {
    # the fixture's sections as they are: Adam, clip 1.0 (CODA: none, its own cosine), one step
    "l2p": Case("l2p", 1, Expect(pull_weight=0.1, selection="similarity")),
    "dualprompt": Case("dualprompt", 1, Expect(pull_weight=1.0, sequential_init=True)),
    "sprompt": Case("sprompt", 1, Expect(pull_weight=1.0, sequential_init=True)),
    "coda": Case("coda", 1, Expect(clip=None, schedule="coda_cosine", ortho_weight=0.1)),
    "linear_probe": Case("linear_probe", 1, Expect(), {"train.epochs": 1}),
    # the rest of the update: SGD, weight decay, a binding clip, a schedule, gates, the compat switches
    "l2p-sgd-vote": sgd_case("l2p", 1, {"pull_weight": 0.7, "batchwise_prompt": True},
                             pull_weight=0.7, selection="similarity", batchwise=True),
    "dualprompt-sgd-gate": sgd_case("dualprompt", 0, {"pull_weight": 0.4, "gate": "tanh"},
                                    pull_weight=0.4, gate="tanh", gate_trained=True),
    "sprompt-sgd-official-layout": sgd_case(  # gates trained on the first task only: used here, not trained
        "sprompt", 1, {"pull_weight": 0.6, "prefix_layout": "official", "gate": "sigmoid", "gate_train_tasks": "first"},
        pull_weight=0.6, sequential_init=True, layout="official", gate="sigmoid"),
    "coda-sgd-gate": sgd_case("coda", 1, {"ortho_weight": 0.5, "gate": "gelu", "gate_train_tasks": "all"},
                              schedule="coda_cosine", ortho_weight=0.5, gate="gelu", gate_trained=True),
    "linear_probe-sgd-augment": sgd_case("linear_probe", 1, {"augment": True}),
}


# ----------------------------------------------------------------- the independent recomputation
@dataclass
class Inputs:
    """What the recomputation sees: the frozen backbone, the batch, its frozen CLS queries (float64)."""

    backbone: torch.nn.Module
    images: Tensor
    labels: Tensor
    query: Tensor
    classes: list[int]


def gate_function(expect: Expect, p: dict[str, Tensor], layer: int) -> Callable[[Tensor], Tensor] | None:
    """NoRGa's residual gate ``s + α·σ(τ·s)`` on the scaled prefix scores (NORGA_SPEC §1.4), or none."""
    if expect.gate is None:
        return None
    alpha, tau, sigma = p[f"gates.{layer}.alpha"], p[f"gates.{layer}.tau"], ACTIVATIONS[expect.gate]
    return lambda scores: scores + alpha * sigma(tau * scores)


def per_head(vectors: Tensor, heads: int) -> Tensor:
    """(Lp, dim) prefix vectors as (heads, Lp, head_dim): dim split into heads."""
    return vectors.reshape(vectors.shape[0], heads, -1).permute(1, 0, 2)


def cosines(queries: Tensor, keys: Tensor) -> Tensor:
    """cos(query_b, key_j), (B, pool)."""
    return (queries @ keys.T) / (queries.norm(dim=1)[:, None] * keys.norm(dim=1)[None])


def chosen_slots(expect: Expect, keys: Tensor, x: Inputs, task: int, top_k: int) -> list[list[int]]:
    """Each sample's slots: the task's while training (task mask), else its top-k keys by cosine similarity
    to its query; the batch-wise vote gives every sample the batch's k most chosen slots (ties: lower index)."""
    batch = len(x.query)
    if expect.selection == "task":
        return [list(range(task * top_k, (task + 1) * top_k))] * batch
    chosen = []
    for similarity in cosines(x.query, keys).tolist():
        order = sorted(range(len(keys)), key=lambda j: -similarity[j])
        if similarity[order[top_k - 1]] - similarity[order[top_k]] < SELECTION_MARGIN:
            raise UnclearInputs
        chosen.append(order[:top_k])
    if expect.batchwise:
        if all(set(row) == set(chosen[0]) for row in chosen):
            raise UnclearInputs  # the vote would change nothing
        counts = [sum(row.count(j) for row in chosen) for j in range(len(keys))]
        vote = sorted(range(len(keys)), key=lambda j: (-counts[j], j))[:top_k]
        chosen = [vote] * batch
    return chosen


def keyed_loss(method, expect: Expect, p: dict[str, Tensor], x: Inputs, task: int, position: list[int]) -> Tensor:
    """L2P / DualPrompt / S-Prompt++: masked CE − λ·mean_b Σ_k cos(query_b, key_k) over the chosen slots."""
    s = method.settings
    keys = p["key.keys"]
    chosen = chosen_slots(expect, keys.detach(), x, task, s.top_k)
    batch = len(x.query)
    similarity = cosines(x.query, keys)
    pull = torch.stack([sum(similarity[b, j] for j in chosen[b]) for b in range(batch)])
    prefixes, tokens = {}, {}
    e_layers = sorted(set(s.layers))
    if s.prompt_type == "tokens":  # prompt tuning: (layers, pool, Lp, dim), a sample's k slots one after another
        for i, layer in enumerate(e_layers):
            tokens[layer] = [torch.cat([p["e.prompts"][i, j] for j in chosen[b]]) for b in range(batch)]
    else:  # the official pool tensor P (layers, 2 = key/value, pool, Lp, heads, head_dim)
        pool = torch.stack([p[f"e.slots.{j}"] for j in range(method.pool_size)], dim=2)
        for i, layer in enumerate(e_layers):
            if expect.layout == "official":  # top-1: the batch's first half K = V = key half, second half value half
                halves = [0 if position[b] < batch // 2 else 1 for b in range(batch)]
                keys_b = [pool[i, halves[b], chosen[b][0]].transpose(0, 1) for b in range(batch)]
                values_b = keys_b
            else:
                keys_b = [torch.cat([pool[i, 0, j].transpose(0, 1) for j in chosen[b]], dim=1) for b in range(batch)]
                values_b = [torch.cat([pool[i, 1, j].transpose(0, 1) for j in chosen[b]], dim=1) for b in range(batch)]
            prefixes[layer] = SlowPrefix(keys_b, values_b, gate_function(expect, p, layer))
    for i, layer in enumerate(sorted(set(s.g_layers)) if s.g_length else []):
        g = p["g.slots.0"]
        assert layer not in prefixes, "a block with both prompts is not in these cases"
        prefixes[layer] = SlowPrefix([g[i, 0].transpose(0, 1)] * batch, [g[i, 1].transpose(0, 1)] * batch,
                                     gate_function(expect, p, layer))
    assert all(layer < len(x.backbone.blocks) for layer in [*prefixes, *tokens])
    features = cls_features(x.backbone, x.images, prefixes, tokens)
    logits = features @ p["head.weight"].T + p["head.bias"]
    return masked_cross_entropy(logits, x.labels, x.classes).mean() - expect.pull_weight * pull.mean()


def ortho_penalty(matrix: Tensor) -> Tensor:
    """((W Wᵀ − I)²).mean() (CODA-Prompt's ``ortho_penalty``)."""
    gram = matrix @ matrix.T
    return ((gram - torch.eye(len(matrix), dtype=matrix.dtype)) ** 2).mean()


def task_rows(rows: Tensor, start: int, stop: int) -> Tensor:
    """The rows of tasks up to the training one (`stop`), those of earlier tasks (before `start`) detached."""
    return torch.cat([rows[:start].detach(), rows[start:stop]])


def coda_loss(method, expect: Expect, p: dict[str, Tensor], x: Inputs, task: int, position: list[int]) -> Tensor:
    """CODA-Prompt: α_m = cos(q ⊙ A_m, K_m) over the components of tasks ≤ t (earlier tasks' detached), prompt
    Σ_m α_m P_m split into key and value halves per head; masked CE + μ·Σ_layers [pen(K) + pen(A) + pen(P)]."""
    s, heads = method.settings, method.model.num_heads
    per_task = s.pool_size // method.num_tasks
    start, stop = task * per_task, (task + 1) * per_task
    prefixes, penalty = {}, 0.0
    for i, layer in enumerate(sorted(set(s.layers))):
        keys, attention, components = (task_rows(p[f"pool.{name}"][i], start, stop)
                                       for name in ("keys", "attention", "components"))
        attended = x.query[:, None, :] * attention[None]  # (B, m, key_dim): q ⊙ A_m
        weights = (attended * keys[None]).sum(2) / (attended.norm(dim=2) * keys.norm(dim=1)[None])  # cos
        prompts = torch.einsum("bm,mld->bld", weights, components)
        half = s.length // 2
        prefixes[layer] = SlowPrefix([per_head(prompt[:half], heads) for prompt in prompts],
                                     [per_head(prompt[half:], heads) for prompt in prompts],
                                     gate_function(expect, p, layer))
        penalty = penalty + ortho_penalty(keys) + ortho_penalty(attention) + ortho_penalty(components.flatten(1))
    features = cls_features(x.backbone, x.images, prefixes)
    logits = features @ p["head.weight"].T + p["head.bias"]
    return masked_cross_entropy(logits, x.labels, x.classes).mean() + expect.ortho_weight * penalty


def probe_loss(method, expect: Expect, p: dict[str, Tensor], x: Inputs, task: int, position: list[int]) -> Tensor:
    """Linear probe: masked CE of a linear head on the frozen CLS features."""
    logits = cls_features(x.backbone, x.images) @ p["head.weight"].T + p["head.bias"]
    return masked_cross_entropy(logits, x.labels, x.classes).mean()


LOSSES = {"l2p": keyed_loss, "dualprompt": keyed_loss, "sprompt": keyed_loss, "coda": coda_loss,
          "linear_probe": probe_loss}


def trained_names(case: Case, names: list[str]) -> list[str]:
    """What the method's optimizer is expected to train: the head and every prompt tensor; gates only when
    their schedule trains them at this task."""
    return [n for n in names if not n.startswith("gates.") or case.expect.gate_trained]


@dataclass
class Recomputed:
    losses: list[float]
    params: dict[str, Tensor]
    optimizer: HandOptimizer
    grads: dict[str, Tensor]  # the last step's effective gradients (after clipping and weight decay)


def recompute(method, case: Case, start: dict[str, Tensor], x: Inputs, positions: list[list[int]],
              clip: float | None) -> Recomputed:
    """Every epoch's loss and the parameters after the last step, from `start`, by the slow route."""
    e = case.expect
    loss_of = LOSSES[case.method]
    trained = trained_names(case, list(start))
    params = {n: t.double() for n, t in start.items()}
    optimizer = HandOptimizer(e.optimizer, e.weight_decay, clip)
    losses = []
    for epoch in range(e.epochs):
        leaves = {n: t.detach().clone().requires_grad_(n in trained) for n, t in params.items()}
        loss = loss_of(method, e, leaves, x, case.task, positions[epoch])
        found = torch.autograd.grad(loss, [leaves[n] for n in trained], allow_unused=True)
        grads = {n: g for n, g in zip(trained, found)}
        params = optimizer.step({n: t.detach() for n, t in leaves.items()}, grads,
                                epoch_lr(e.schedule, e.lr, epoch, e.epochs))
        losses.append(float(loss.detach()))
    return Recomputed(losses, params, optimizer, optimizer.last_gradients)


# ------------------------------------------------------------------------------- the harness
class RecordingDataset(Dataset):
    """Random images with labels; records the order the loader reads them in (the batch positions)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels, self.reads = images, labels, []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        self.reads.append(index)
        return self.images[index], self.labels[index]


def owned(method) -> dict[str, Tensor]:
    """Every tensor the method trains or may train, by name (its prompts and the classifier head)."""
    if method.name == "linear_probe":
        return dict(method.head.named_parameters(prefix="head"))
    return {**dict(method.model.backbone.head.named_parameters(prefix="head")),
            **dict(method.prompts.named_parameters())}


def freshen(method, rng: torch.Generator) -> None:
    """Move every owned tensor by fresh noise: the run's seed fixes the initial values, the test should not."""
    with torch.no_grad():
        for param in owned(method).values():
            param.add_(0.1 * torch.randn(param.shape, generator=rng))


def prepare_coda(method, case: Case, rng: torch.Generator) -> None:
    """Task t's components are re-initialised when it starts (`begin_task`, which `run_phase` repeats from the
    same seed); the earlier tasks' rows are disturbed first, as after training, so that they are not
    orthonormal and the orthogonality penalty is not zero. Checks what the re-initialisation promises."""
    pool = method.prompts["pool"]
    part = pool.task_slice(case.task)
    for task in range(case.task + 1):
        method.begin_task(task)
    with torch.no_grad():
        for param in (pool.components, pool.keys, pool.attention):
            param[:, : part.start] += 0.3 * torch.randn(param[:, : part.start].shape, generator=rng)
    method.begin_task(case.task)
    for param in (pool.components, pool.keys, pool.attention):
        for layer in range(pool.num_layers):  # Gram-Schmidt: the task's rows orthonormal, orthogonal to the earlier
            rows = param[layer].flatten(1).detach().double()
            gram = rows[part] @ rows[: part.stop].T
            torch.testing.assert_close(gram, torch.eye(*gram.shape, dtype=torch.float64).roll(part.start, 1),
                                       rtol=0, atol=1e-5)


def aim_keys(method, x: Inputs, rng: torch.Generator) -> None:
    """Keys for similarity selection, drawn in the span of the queries' deviations from their mean (plus a little
    noise): the frozen features of random images through a random ViT are nearly parallel (cos ≈ 0.95), so
    random keys would give every sample the same top-k, and the choice and the vote would go untested."""
    unit = x.query / x.query.norm(dim=1, keepdim=True)
    keys = method.prompts["key"].keys
    mix = torch.randn(len(keys), len(unit), generator=rng, dtype=torch.float64)
    noise = 0.01 * torch.randn(keys.shape, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        keys.copy_(mix @ (unit - unit.mean(dim=0)) + noise)


def starting_values(method, case: Case, before: dict[str, Tensor]) -> dict[str, Tensor]:
    """The values training starts from: DualPrompt / S-Prompt++ copy slot t−1 into slot t (all layers, key
    and value; not the key) before task t trains (the official ``shared_prompt_pool``)."""
    start = dict(before)
    if case.expect.sequential_init and case.task > 0:
        k = method.settings.top_k
        for j in range(case.task * k, (case.task + 1) * k):
            start[f"e.slots.{j}"] = before[f"e.slots.{j - k}"]
    return start


def draw_inputs(ctx, case: Case, rng: torch.Generator) -> Inputs:
    """A batch of random images and labels of the task's classes; their queries by the slow frozen forward."""
    classes = ctx.classes(case.task)
    images = torch.randn(BATCH, *ctx.tasks[case.task].train[0][0].shape, generator=rng)
    labels = torch.tensor(classes)[torch.randint(len(classes), (BATCH,), generator=rng)]
    with torch.no_grad():
        query = cls_features(ctx.model.backbone, images)
    return Inputs(ctx.model.backbone, images, labels, query, classes)


def calibrated_clip(method, case: Case, start: dict[str, Tensor], x: Inputs) -> float:
    """Half the norm of the first step's gradient, whichever half of the batch each sample lands in (the
    official layout depends on it): clipping then binds at the first step."""
    trained = trained_names(case, list(start))
    norms = []
    for first_half in itertools.combinations(range(BATCH), BATCH // 2):
        order = [*first_half, *(b for b in range(BATCH) if b not in first_half)]
        position = [order.index(b) for b in range(BATCH)]
        leaves = {n: t.double().detach().clone().requires_grad_(n in trained) for n, t in start.items()}
        loss = LOSSES[case.method](method, case.expect, leaves, x, case.task, position)
        grads = [g for g in torch.autograd.grad(loss, [leaves[n] for n in trained], allow_unused=True) if g is not None]
        norms.append(math.sqrt(sum(float((g**2).sum()) for g in grads)))
        if case.expect.layout != "official":
            break
    return 0.5 * min(norms)


@dataclass
class Trial:
    """One run of the method's phase and its recomputation."""

    names: list[str]  # the method's owned tensors
    start: dict[str, Tensor]  # their values when training starts (as the recomputation has them)
    before: dict[str, Tensor]  # their values before `run_phase`
    after: dict[str, Tensor]
    frozen_before: dict[str, Tensor]
    frozen_after: dict[str, Tensor]
    losses: list[float]  # what the method reported per epoch
    expected: Recomputed


def run_and_recompute(tmp_path, case: Case, seed: int) -> Trial:
    """Run `case`'s phase on fresh random inputs (one batch per epoch) and recompute it the slow way."""
    rng = torch.Generator().manual_seed(seed)
    engine = make_engine(tiny_config(case.method, **case.changes), tmp_path / "run")
    method, ctx = engine.method, engine.context
    check_plain(ctx.model.backbone)
    freshen(method, rng)
    if case.method == "coda":
        prepare_coda(method, case, rng)
    trained_head = "head." if case.method != "linear_probe" else None  # the probe has a head of its own
    frozen = {n: t.detach().clone() for n, t in ctx.model.backbone.named_parameters()
              if trained_head is None or not n.startswith(trained_head)}
    identity = [list(range(BATCH))] * case.expect.epochs
    for _ in range(5):  # inputs whose top-k choices are clear at every step
        x = draw_inputs(ctx, case, rng)
        if case.expect.selection == "similarity":
            aim_keys(method, x, rng)
        before = {n: t.detach().clone() for n, t in owned(method).items()}
        start = starting_values(method, case, before)
        try:
            clip = calibrated_clip(method, case, start, x) if case.expect.clip == "calibrate" else case.expect.clip
            recompute(method, case, start, x, identity, clip)
            break
        except UnclearInputs:
            continue
    else:
        raise AssertionError("five draws of inputs gave no clear top-k choices")
    if case.expect.clip == "calibrate":
        method.settings.train.clip_grad = clip
    dataset = RecordingDataset(x.images, x.labels)
    ctx.tasks[case.task] = TaskDatasets(x.classes, dataset, TensorDataset(x.images, x.labels),
                                        TensorDataset(x.images, x.labels))
    losses = []
    method.run_phase(case.task, method.phases(case.task)[0], 0, lambda epoch, logs: losses.append(logs["loss"]))
    if dataset.reads:  # the batch order of each epoch (the official layout depends on it)
        orders = [dataset.reads[e * BATCH : (e + 1) * BATCH] for e in range(case.expect.epochs)]
        positions = [[order.index(b) for b in range(BATCH)] for order in orders]
    else:  # the probe on cached features: the order does not matter
        positions = identity
    expected = recompute(method, case, start, x, positions, clip)
    if case.expect.clip == "calibrate":
        assert expected.optimizer.clip_scales[0] < 1, "the clip was meant to bind"
    return Trial(list(before), start, before, {n: t.detach() for n, t in owned(method).items()}, frozen,
                 {n: ctx.model.backbone.get_parameter(n).detach() for n in frozen}, losses, expected)


# ------------------------------------------------------------------------------ tolerances
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6  # the fp32 forward of a few hundred-term sums, against float64
GRAD_RTOL = 1e-4  # relative error of an fp32 gradient element against float64
GRAD_FLOOR = 1e-5  # absolute error of an element, relative to the tensor's largest: cancellation in sums


def sgd_mismatch(before: Tensor, after: Tensor, expected: Tensor) -> str | None:
    """The change after − before (SGD: linear in the gradients) against the recomputed one, within the fp32
    error of the gradients plus one rounding of the parameter per step; a description if it is off."""
    change, want = (after - before).double(), (expected - before.double())
    ulp = torch.finfo(torch.float32).eps * torch.maximum(before.abs(), after.abs()).double()
    tolerance = GRAD_RTOL * want.abs() + GRAD_FLOOR * want.abs().max() + 4 * ulp
    if ((change - want).abs() > tolerance).any():
        return f"changed by up to {float((change - want).abs().max()):.3g} more or less than recomputed " \
               f"(largest recomputed change {float(want.abs().max()):.3g})"
    return None


def adam_mismatch(before: Tensor, after: Tensor, expected: Tensor, grad: Tensor, lr: float) -> str | None:
    """Adam's first step is −lr·g/(|g| + eps): an element's tolerance is how far that moves when g moves by its
    fp32 error (tiny gradients, within their error of 0, may step anywhere in [−lr, lr]). A gradient that is
    exactly 0 (a masked class, an unchosen slot, an earlier task's rows) is 0 in fp32 too: no step there."""
    change, want = (after - before).double(), (expected - before.double())
    error = torch.where(grad == 0, 0.0, GRAD_RTOL * grad.abs() + GRAD_FLOOR * grad.abs().max())

    def step(g: Tensor) -> Tensor:
        return lr * g / (g.abs() + ADAM_EPS)

    sensitivity = torch.maximum((step(grad + error) - step(grad)).abs(), (step(grad - error) - step(grad)).abs())
    ulp = torch.finfo(torch.float32).eps * torch.maximum(before.abs(), after.abs()).double()
    tolerance = sensitivity + 1e-6 * lr + 4 * ulp  # fp32 rounding of the step itself, and of the parameter
    if ((change - want).abs() > tolerance).any():
        return f"changed by up to {float((change - want).abs().max()):.3g} more or less than recomputed (lr {lr})"
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_a_training_step_equals_its_independent_recomputation(tmp_path, fresh_seed, name):
    """Every epoch's loss, the change of every trained tensor and the stillness of every other one."""
    case = CASES[name]
    trial = run_and_recompute(tmp_path, case, fresh_seed)
    expected = trial.expected
    problems = []
    losses, want = torch.tensor(trial.losses, dtype=torch.float64), torch.tensor(expected.losses, dtype=torch.float64)
    if len(losses) != len(want) or not torch.allclose(losses, want, rtol=LOSS_RTOL, atol=LOSS_ATOL):
        problems.append(f"loss per epoch {trial.losses}, recomputed {expected.losses}")
    moved = []
    for n in trial.names:
        start, after = trial.start[n], trial.after[n]
        if n not in trained_names(case, trial.names):
            problem = None if torch.equal(after, trial.before[n]) else "not trained here, but moved"
        elif case.expect.optimizer == "adam":
            assert case.expect.epochs == 1, "the Adam tolerance is derived for its first step"
            grad = expected.grads.get(n, torch.zeros_like(start, dtype=torch.float64))
            problem = adam_mismatch(start, after, expected.params[n], grad, case.expect.lr)
        else:
            problem = sgd_mismatch(start, after, expected.params[n])
        if problem:
            problems.append(f"{n}: {problem}")
        moved.append(float((after - start).abs().max()))
    problems += [f"frozen {n} moved" for n, value in trial.frozen_before.items()
                 if not torch.equal(trial.frozen_after[n], value)]
    assert not problems, "\n".join(problems)
    assert max(moved) > 1e-3  # the update is not vacuous
