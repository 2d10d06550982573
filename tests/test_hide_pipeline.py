"""The HiDe-Prompt / NoRGa pipeline pinned step by step against independent, slow recomputations.

Each test drives the method's own phases on the generated benchmark and checks one step of it: a change to
any step (the sign or weight of the contrastive term, the momentum in the forward or its commit, the copy of
slot t-1 into slot t, the masked cross-entropy, the gate schedule, the class statistics, which classes the
task-adaptive stages sample, the task-identity training, the final masking) makes one of them fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import make_engine, tiny_config

from norga.methods.base import PredictRequest
from norga.methods.hide import task_adaptive
from norga.methods.hide.gaussians import official_tap_batches
from norga.methods.hide.task_identity import TaskIdentityModel
from norga.nn import Prefix
from norga.runtime.seeding import generator

NO_LOG = lambda epoch, logs: None  # noqa: E731


def pipeline(tmp_path, method="norga", **changes):
    """An engine whose phases the tests run one by one; SGD without clipping so an update is -lr·gradient."""
    sgd = {"optimizer": "sgd", "clip_grad": None, "batch_size": 64}
    settings = {f"wtp.train.{k}": v for k, v in sgd.items()} | {f"tii.train.{k}": v for k, v in sgd.items()}
    settings |= {"tii.augment": False, "wtp.train.schedule": "constant", "prompt.momentum": 0.25}
    if method == "norga":
        settings["gate_train_tasks"] = "first"
    return make_engine(tiny_config(method, **(settings | changes)), tmp_path / "run")


def run_phases(engine, task, until=None):
    """Run `task`'s phases in order (evaluations skipped), stopping before the phase named `until`."""
    for phase in engine.method.phases(task):
        if phase.name == until:
            return
        if phase.evaluate is None:
            engine.method.run_phase(task, phase, 0, NO_LOG)


def task_images(engine, task):
    images, labels = zip(*(engine.context.tasks[task].train[i] for i in range(len(engine.context.tasks[task].train))))
    return torch.stack(images), torch.as_tensor(labels)


def slow_contrastive(features, prototypes, temperature):
    """Row i of [prototypes; features] must be most similar to itself: mean over rows of -log softmax_i."""
    rows = torch.cat([prototypes, features]) if prototypes is not None else features
    total = 0.0
    for i in range(len(rows)):
        scores = torch.stack([rows[i] @ rows[j] / temperature for j in range(len(rows))])
        total = total - (scores[i] - torch.logsumexp(scores, dim=0))
    return total / len(rows)


def slow_masked_ce(logits, labels, allowed):
    """Cross-entropy over the allowed classes only, averaged over the batch."""
    columns = torch.tensor(allowed)
    picked = logits[:, columns]
    targets = torch.tensor([allowed.index(int(label)) for label in labels])
    return torch.stack([-(picked[b, targets[b]] - torch.logsumexp(picked[b], dim=0)) for b in range(len(labels))]).mean()


def test_a_prompt_training_step_equals_its_independent_recomputation(tmp_path):
    """Task 1, one SGD step: slot 1 (copied from 0, blended with momentum m) and the head move by -lr·∇ of
    masked CE + w·contrastive([prototypes of task 0; features]); the gates (trained on task 0 only) stay."""
    engine = pipeline(tmp_path, **{"wtp.train.epochs": 1, "wtp.contrastive_weight": 0.7,
                                   "wtp.contrastive_temperature": 0.5, "wtp.head_lr_scale": 0.3})
    method, ctx = engine.method, engine.context
    s = method.settings
    run_phases(engine, 0)
    run_phases(engine, 1, until="wtp_train")
    prompts, host = method.prompts, ctx.model
    slot0 = prompts.pool.slots[0].detach().clone()
    head = [p.detach().clone() for p in host.head_parameters()]
    gates = [p.detach().clone() for p in prompts.gates.parameters()]
    prototypes = method.prompt_gaussians.means(ctx.classes(0)).float()

    # the independent recomputation: slot 1 starts as slot 0; the forward uses (1-m)·P1 + m·mean(P0)
    p1 = slot0.clone().requires_grad_(True)
    head_copy = [p.clone().requires_grad_(True) for p in head]
    blended = (1 - s.prompt.momentum) * p1 + s.prompt.momentum * slot0
    images, labels = task_images(engine, 1)
    prefixes = {layer: Prefix(blended[i, 0].transpose(0, 1).unsqueeze(0), blended[i, 1].transpose(0, 1).unsqueeze(0),
                              gate) for i, (layer, gate) in enumerate(zip(prompts.layers, prompts.gates))}
    features = host.forward_features(images, prefixes=prefixes)
    logits = F.linear(features, head_copy[0], head_copy[1])
    loss = slow_masked_ce(logits, labels, ctx.classes(1)) + s.wtp.contrastive_weight * slow_contrastive(
        features, prototypes, s.wtp.contrastive_temperature)
    grad_p1, *grad_head = torch.autograd.grad(loss, [p1, *head_copy])

    host.train()
    method.run_phase(1, method.phases(1)[3], 0, NO_LOG)  # wtp_train
    lr = s.wtp.train.lr
    torch.testing.assert_close(prompts.pool.slots[1].detach(), slot0 - lr * grad_p1, rtol=1e-4, atol=1e-6)
    for after, before, grad in zip(host.head_parameters(), head, grad_head):
        torch.testing.assert_close(after.detach(), before - lr * s.wtp.head_lr_scale * grad, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(a.detach(), b) for a, b in zip(prompts.gates.parameters(), gates))  # first task only
    assert torch.equal(prompts.pool.slots[0].detach(), slot0)  # a finished slot never moves
    assert (grad_p1.abs().sum() > 0) and (prompts.pool.slots[1].detach() - slot0).abs().max() > 1e-6


def test_the_gates_train_on_the_first_task_only(tmp_path):
    engine = pipeline(tmp_path, **{"wtp.train.epochs": 1})
    gates = engine.method.prompts.gates
    start = [p.detach().clone() for p in gates.parameters()]
    run_phases(engine, 0)
    after_first = [p.detach().clone() for p in gates.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(after_first, start))
    run_phases(engine, 1)
    assert all(torch.equal(p.detach(), b) for p, b in zip(gates.parameters(), after_first))


def test_a_new_slot_starts_as_the_previous_one_and_the_momentum_commit_blends_it(tmp_path):
    """With no prompt epochs at task 1, slot 1 is slot 0 (copied; the blend of a copy with its source is itself);
    at task 2 the committed slot is (1-m)·trained + m·mean(slots 0, 1)."""
    engine = pipeline(tmp_path, **{"wtp.train.epochs": 1})
    method = engine.method
    pool, m = method.prompts.pool, method.settings.prompt.momentum
    run_phases(engine, 0)
    method.settings.wtp.train.epochs = 0
    run_phases(engine, 1)
    torch.testing.assert_close(pool.slots[1].detach(), pool.slots[0].detach(), rtol=0, atol=1e-7)
    with torch.no_grad():  # make slot 1 differ, so the mean of earlier slots is not slot 0
        pool.slots[1].add_(torch.randn_like(pool.slots[1]))
    method.settings.wtp.train.epochs = 1
    run_phases(engine, 2, until="momentum")
    trained = pool.slots[2].detach().clone()
    earlier = (pool.slots[0].detach() + pool.slots[1].detach()) / 2
    run_phases_named(engine, 2, "momentum")
    torch.testing.assert_close(pool.slots[2].detach(), (1 - m) * trained + m * earlier, rtol=1e-6, atol=1e-7)


def run_phases_named(engine, task, name):
    phase = next(p for p in engine.method.phases(task) if p.name == name)
    engine.method.run_phase(task, phase, 0, NO_LOG)


def test_class_statistics_are_the_means_of_the_frozen_and_the_prompted_features(tmp_path):
    engine = pipeline(tmp_path, **{"wtp.train.epochs": 1})
    method, ctx = engine.method, engine.context
    run_phases(engine, 0)
    images, labels = task_images(engine, 0)
    with torch.no_grad():
        frozen = ctx.model.forward_features(images)
        prompted = method.encode(images, 0)
    for label in ctx.classes(0):
        mine = labels == label
        torch.testing.assert_close(method.tii_gaussians.means([label])[0].float(), frozen[mine].mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(method.prompt_gaussians.means([label])[0].float(), prompted[mine].mean(0),
                                   rtol=1e-4, atol=1e-5)
    assert (frozen - prompted).abs().max() > 1e-4  # the two statistics really differ


def test_the_task_identity_step_equals_its_independent_recomputation(tmp_path):
    """One SGD step of the TII model on task 1's cached frozen features with CE masked to task 1's classes."""
    engine = pipeline(tmp_path, **{"tii.train.epochs": 1})
    method, ctx = engine.method, engine.context
    run_phases(engine, 0)
    images, labels = task_images(engine, 1)
    with torch.no_grad():
        frozen = ctx.model.forward_features(images)
    before = {k: v.clone() for k, v in method.tii.state_dict().items()}
    copy = TaskIdentityModel(ctx.model.embed_dim, ctx.num_classes, method.settings.tii.mlp_hidden)
    copy.load_state_dict(before)
    copy.train()
    loss = slow_masked_ce(copy(frozen), labels, ctx.classes(1))
    grads = dict(zip([n for n, _ in copy.named_parameters()], torch.autograd.grad(loss, list(copy.parameters()))))
    run_phases_named(engine, 1, "tii_train")
    lr = method.settings.tii.train.lr
    for name, value in method.tii.named_parameters():
        torch.testing.assert_close(value.detach(), before[name] - lr * grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", ["tii_tap", "tap"])
def test_the_task_adaptive_stages_sample_every_seen_class_and_only_those(tmp_path, monkeypatch, stage):
    engine = pipeline(tmp_path)
    seen_labels = []
    original = task_adaptive.official_tap_batches

    def spy(gaussians, classes, *rest):
        for features, labels in original(gaussians, classes, *rest):
            seen_labels.append(labels)
            yield features, labels

    run_phases(engine, 0)
    run_phases(engine, 1, until=stage)
    monkeypatch.setattr(task_adaptive, "official_tap_batches", spy)
    run_phases_named(engine, 1, stage)
    sampled = set(torch.cat(seen_labels).tolist())
    assert sampled == set(engine.context.classes_until(1))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_a_tap_epoch_is_sgd_with_its_momentum_on_the_gaussian_draws_of_the_seen_classes(tmp_path, momentum):
    """The head's TAP after task 1, one epoch (official chunking: |C_<1| chunks of samples_per_class draws): the head
    moves as hand-written SGD with momentum m (v <- m·v + g, w <- w - lr·v) on CE masked to the seen classes."""
    engine = pipeline(tmp_path, **{"wtp.tap.momentum": momentum, "wtp.tap.epochs": 1})
    method, ctx = engine.method, engine.context
    run_phases(engine, 0)
    run_phases(engine, 1, until="tap")
    cfg, seen = method.settings.wtp.tap, ctx.classes_until(1)
    draws = list(official_tap_batches(method.prompt_gaussians, seen, len(ctx.classes(0)), cfg.samples_per_class,
                                      generator(ctx.config.seed, "tap", 1, 0)))
    assert len(draws) == 2 and len(list(ctx.model.head_parameters())) == 2  # weight, bias: no fc_norm here
    weight, bias = [p.detach().clone() for p in ctx.model.head_parameters()]
    velocity = None
    for features, labels in draws:
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        grads = torch.autograd.grad(slow_masked_ce(F.linear(features, w, b), labels, seen), [w, b])
        velocity = list(grads) if velocity is None else [momentum * v + g for v, g in zip(velocity, grads)]
        weight, bias = weight - cfg.lr * velocity[0], bias - cfg.lr * velocity[1]
    run_phases_named(engine, 1, "tap")
    for after, expected in zip(ctx.model.head_parameters(), (weight, bias)):
        torch.testing.assert_close(after.detach(), expected, rtol=1e-4, atol=1e-6)


def test_tap_trains_the_classifier_it_names_and_nothing_else(tmp_path):
    engine = pipeline(tmp_path)
    method = engine.method
    run_phases(engine, 0)
    run_phases(engine, 1, until="tap")
    tii = {k: v.clone() for k, v in method.tii.state_dict().items()}
    prompts = {k: v.clone() for k, v in method.prompts.state_dict().items()}
    head = [p.detach().clone() for p in engine.context.model.head_parameters()]
    run_phases_named(engine, 1, "tap")
    assert all(torch.equal(v, tii[k]) for k, v in method.tii.state_dict().items())
    assert all(torch.equal(v, prompts[k]) for k, v in method.prompts.state_dict().items())
    assert all(not torch.equal(p.detach(), b) for p, b in zip(engine.context.model.head_parameters(), head))


@pytest.mark.parametrize("mask", [True, False])
def test_the_final_argmax_is_over_the_seen_classes_unless_the_official_switch_is_set(tmp_path, mask):
    engine = pipeline(tmp_path, **{"eval.mask_final_logits": mask})
    run_phases(engine, 0)
    unseen = engine.context.classes(2)[0]
    with torch.no_grad():
        engine.context.model.backbone.head.bias[unseen] = 1e4  # an unseen class that wins every argmax
    images, _ = task_images(engine, 0)
    predicted = engine.method.predict(PredictRequest(images, seen_tasks=1)).classes
    if mask:
        assert set(predicted.tolist()) <= set(engine.context.classes(0))
    else:
        assert set(predicted.tolist()) == {unseen}


def test_hide_prompt_runs_with_no_gate_and_records_it(tmp_path):
    engine = pipeline(tmp_path, method="hide", **{"wtp.train.epochs": 1})
    assert all(gate.is_identity for gate in engine.method.prompts.gates)
    assert engine.method.run_record() == {"gate": "none"} and "gate_train_tasks" not in engine.method.compat()
