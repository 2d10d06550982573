"""SMoPE against the oracles of SMOPE_REPARAM_SPEC A15: routed attention against a slow re-implementation of the
official attention, dense = top-K of all experts, the penalty, router and prototype losses on hand-made scores, the
usage flags, which parameters each phase trains, and the routing state across a resume."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from engine_fixtures import Crash, build, crash_at, run_fixture, tiny_config
from slow_vit import embed, gelu, layer_norm, like
from torch import Tensor, nn

from norga.engine.loop import Position
from norga.methods.hide.gaussians import ClassGaussians
from norga.methods.smope.experts import (
    ExpertPool,
    expert_scores,
    penalised,
    prototype_loss,
    router_loss,
    top_experts,
    usage_flags,
)
from norga.methods.smope.method import SMoPE
from norga.nn import PromptedViT
from norga.runtime.context import RunContext
from norga.runtime.optim import cosine_iteration_lr

HEADS, DIM, EXPERTS = 2, 32, 5


def tiny_host(dtype: torch.dtype = torch.float64) -> PromptedViT:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=16, patch_size=8,
                              depth=2, embed_dim=DIM, num_heads=HEADS).eval()
    with torch.no_grad():  # norms that are not the identity at init, so that they matter
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    host = PromptedViT(model).to(dtype)
    host.install_prefix_layers([0, 1])
    return host


def pool_of(host: PromptedViT, top_k: int, seed: int = 0) -> ExpertPool:
    pool = ExpertPool([0, 1], HEADS, EXPERTS, DIM // HEADS, top_k, torch.Generator().manual_seed(seed))
    return pool.to(next(host.parameters()).dtype)


# --------------------------------------------------- the official attention, slowly
def official_attention(block: nn.Module, x: Tensor, keys: Tensor, values: Tensor, penalty: Tensor | None, k: int,
                       record: list) -> Tensor:
    """SMoPE's routed attention as the official code computes it (SMOPE_REPARAM_SPEC A5), one sample and head at a
    time: the mean query's unscaled scores s, ``label = s - penalty·(max s - min s)``, its top-k, and per query token
    the logits [s of the selected · scale | q·kᵀ · scale] over [selected values; v] (penalty None: dense)."""
    attn = block.attn
    batch, tokens, dim = x.shape
    head_dim = dim // HEADS
    scale = 1 / math.sqrt(head_dim)
    qkv = x @ like(attn.qkv.weight, x).T + like(attn.qkv.bias, x)
    q, kk, v = (qkv[..., part * dim:(part + 1) * dim].reshape(batch, tokens, HEADS, head_dim).transpose(1, 2)
                for part in range(3))
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(HEADS):
            q_bar = q[b, h].mean(dim=0)
            s = torch.stack([q_bar @ keys[h, j] for j in range(len(keys[h]))])
            if penalty is None:
                chosen = list(range(len(s)))
            else:
                label = s - penalty[h] * (s.max() - s.min())
                chosen = label.topk(k).indices.tolist()
                record.append((b, h, s, set(chosen)))
            prefix_logits = torch.stack([s[j] for j in chosen]) * scale
            logits = torch.cat([prefix_logits.expand(tokens, -1), q[b, h] @ kk[b, h].T * scale], dim=1)
            weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            out[b, h] = weights @ torch.cat([torch.stack([values[h, j] for j in chosen]), v[b, h]])
    merged = out.transpose(1, 2).reshape(batch, tokens, dim)
    return merged @ like(attn.proj.weight, x).T + like(attn.proj.bias, x)


def official_features(backbone: nn.Module, images: Tensor, pool: ExpertPool, penalties: Tensor | None,
                      record: list) -> Tensor:
    x = embed(backbone, images.double())
    for index, block in enumerate(backbone.blocks):
        keys, values = pool.keys[index].double(), pool.values[index].double()
        penalty = None if penalties is None else penalties[index].double()
        x = x + official_attention(block, layer_norm(x, block.norm1), keys, values, penalty, pool.top_k, record)
        hidden = gelu(layer_norm(x, block.norm2) @ like(block.mlp.fc1.weight, x).T + like(block.mlp.fc1.bias, x))
        x = x + hidden @ like(block.mlp.fc2.weight, x).T + like(block.mlp.fc2.bias, x)
    return layer_norm(x, backbone.norm)[:, 0]


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_routed_prompted_features_are_the_official_attentions_with_the_mean_query_scores(impl):
    torch.manual_seed(1)
    host = tiny_host()
    host.attention_impl = impl
    pool = pool_of(host, top_k=2)
    penalties = (torch.rand(2, HEADS, EXPERTS) < 0.4).double() * 0.7  # some experts flagged
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    record, expected_record = [], []
    with torch.no_grad():
        features = host.forward_features(images, attachments=pool.attachments(penalties, record))
    expected = official_features(host.backbone, images, pool, penalties, expected_record)
    torch.testing.assert_close(features, expected, rtol=1e-10, atol=1e-10)
    for routed, start in zip(record, (0, 3 * HEADS)):  # the in-attention scores and selections of each block
        for offset, (b, h, s, chosen) in enumerate(expected_record[start:start + 3 * HEADS]):
            assert (b, h) == divmod(offset, HEADS)
            torch.testing.assert_close(routed.scores[b, h], s, rtol=1e-12, atol=1e-12)
            assert set(routed.selected[b, h].tolist()) == chosen
    assert {len(c) for *_, c in expected_record} == {2}


def test_top_k_of_every_expert_without_penalty_is_the_dense_attention():
    torch.manual_seed(2)
    host = tiny_host()
    pool = pool_of(host, top_k=EXPERTS)
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        routed = host.forward_features(images, attachments=pool.attachments(torch.zeros(2, HEADS, EXPERTS)))
        dense = host.forward_features(images, attachments=pool.attachments(None))
    torch.testing.assert_close(routed, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense, official_features(host.backbone, images, pool, None, []), rtol=1e-10,
                               atol=1e-10)
    with torch.no_grad():  # a sparse top-K is another model (the oracle is not vacuous)
        sparse = host.forward_features(images, attachments=pool_of(host, top_k=2).attachments(
            torch.zeros(2, HEADS, EXPERTS)))
    assert (sparse - dense).abs().max() > 1e-3


def test_a_uniform_penalty_changes_no_selection_and_the_hand_made_penalty_case():
    scores = torch.randn(6, HEADS, EXPERTS, dtype=torch.float64)
    assert torch.equal(top_experts(penalised(scores, torch.full((HEADS, EXPERTS), 2.0)), 3), top_experts(scores, 3))
    s = torch.tensor([[[3.0, 1.0, 2.0, 0.0]]])
    flagged = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(penalised(s, 0.7 * flagged), torch.tensor([[[0.9, 1.0, 2.0, 0.0]]]))
    assert set(top_experts(penalised(s, 0.7 * flagged), 2).flatten().tolist()) == {2, 1}
    assert set(top_experts(penalised(s, 0.4 * flagged), 2).flatten().tolist()) == {2, 0}


def test_router_loss_on_the_hand_made_scores():
    s = torch.tensor([[[3.0, 1.0, 2.0, 0.0]]], dtype=torch.float64)
    selected = top_experts(s, 2)  # experts 0 and 2
    # z = [3, 2.2, 2, 1.2] (the unselected raised by 0.4 x range 3): CE 0.6844 (target 0) + 1.6844 (target 2)
    z = torch.tensor([3.0, 2.2, 2.0, 1.2], dtype=torch.float64)
    hand = -(z.log_softmax(0)[0] + z.log_softmax(0)[2])
    torch.testing.assert_close(router_loss(s, selected, 0.4), hand.reshape(1))
    assert abs(float(hand) - (0.6844 + 1.6844)) < 1e-3
    plain = -(s[0, 0].log_softmax(0)[0] + s[0, 0].log_softmax(0)[2])
    torch.testing.assert_close(router_loss(s, selected, 0.0), plain.reshape(1))


def test_prototype_loss_is_the_per_head_cross_entropy_of_the_flagged_snapshot_keys():
    torch.manual_seed(3)
    old, keys = torch.randn(2, HEADS, EXPERTS, 4, dtype=torch.float64), torch.randn(2, HEADS, EXPERTS, 4,
                                                                                     dtype=torch.float64)
    frequent = torch.rand(2, HEADS, EXPERTS) < 0.5
    frequent[0, 0] = False  # a head with nothing flagged adds nothing
    expected = torch.zeros((), dtype=torch.float64)
    for layer in range(2):
        for head in range(HEADS):
            p = old[layer, head][frequent[layer, head]]
            if len(p) == 0:
                continue
            targets = (p @ old[layer, head].T).topk(3, dim=1).indices
            for i in range(3):
                expected = expected + F.cross_entropy(p @ keys[layer, head].T, targets[:, i])
    torch.testing.assert_close(prototype_loss(old, keys, frequent, 3), expected)


def test_usage_flags_code_and_poster_rules():
    counts = torch.tensor([6, 0, 0, 4])
    assert usage_flags(counts, "mean_nonzero").tolist() == [True, False, False, False]
    assert usage_flags(counts, "mean_all").tolist() == [True, False, False, True]
    assert usage_flags(torch.zeros(4, dtype=torch.long), "mean_nonzero").all()
    assert usage_flags(torch.tensor([10, 0, 3, 1]), "mean_all").tolist() == [True, False, False, False]


def test_gradients_reach_the_selected_experts_the_router_loss_every_key_the_prototype_loss_keys_only():
    torch.manual_seed(4)
    host = tiny_host(torch.float32)
    pool = pool_of(host, top_k=2)
    images = torch.randn(2, 3, 16, 16)
    penalties = torch.zeros(2, HEADS, EXPERTS)

    def grads(loss_of) -> tuple[Tensor, Tensor]:
        pool.zero_grad(set_to_none=False)
        record = []
        loss_of(host(images, attachments=pool.attachments(penalties, record)), record).backward()
        return pool.keys.grad.clone(), pool.values.grad.clone()

    pool.keys.grad = torch.zeros_like(pool.keys)
    pool.values.grad = torch.zeros_like(pool.values)
    record: list = []
    key_grad, value_grad = grads(lambda out, rec: (record.extend(rec), out.logits.sum())[1])
    used = torch.zeros(2, HEADS, EXPERTS, dtype=torch.bool)
    for routed in record:
        used[routed.layer].view(-1)[(torch.arange(HEADS)[None, :, None] * EXPERTS + routed.selected).flatten()] = True
    assert not used.all()  # some experts were not selected by any sample
    assert (key_grad.abs().sum(-1)[~used] == 0).all() and (value_grad.abs().sum(-1)[~used] == 0).all()
    assert (key_grad.abs().sum(-1)[used] > 0).all() and (value_grad.abs().sum(-1)[used] > 0).all()
    key_grad, value_grad = grads(lambda out, rec: sum(router_loss(r.scores, r.selected, 0.4).sum() for r in rec))
    # every key; values only of blocks before the last (through the later blocks' queries)
    assert (key_grad.abs().sum(-1) > 0).all() and (value_grad[-1] == 0).all() and value_grad[0].abs().sum() > 0
    pool.old_keys.copy_(torch.rand_like(pool.keys))
    pool.frequent.fill_(True)
    key_grad, value_grad = grads(lambda out, rec: prototype_loss(pool.old_keys, pool.keys, pool.frequent, 2))
    assert (key_grad.abs().sum(-1) > 0).all() and (value_grad == 0).all()
    assert all(p.grad is None for p in host.backbone.blocks.parameters())
    record.clear()
    pool.zero_grad(set_to_none=False)
    host(images, attachments=pool.attachments(None)).logits.sum().backward()  # dense: every expert
    assert (pool.keys.grad.abs().sum(-1) > 0).all() and (pool.values.grad.abs().sum(-1) > 0).all()


# ------------------------------------------------------------ the method's phases
def snapshot(method: SMoPE) -> dict[str, Tensor]:
    named = {f"model.{name}": p for name, p in method.model.named_parameters()}
    named |= {f"experts.{name}": t for name, t in method.pool.state_dict().items()}
    return {name: tensor.detach().clone() for name, tensor in named.items()}


def changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_each_phase_trains_what_it_should_and_nothing_else():
    ctx = RunContext(build(tiny_config("smope")))
    method = SMoPE(ctx, ctx.config.settings)
    head = {f"model.{name}" for name, _ in method.model.named_parameters() if name.startswith("backbone.head.")}
    effects = {}
    for task in (0, 1):
        for phase in method.phases(task):
            before = snapshot(method)
            method.run_phase(task, phase, 0, lambda epoch, logs: None)
            effects[task, phase.name] = changed(before, snapshot(method))
    pool_parameters = {"experts.keys", "experts.values"}
    assert [p.name for p in method.phases(0)] == ["dense_warmup", "train", "usage", "class_stats"]
    assert [p.name for p in method.phases(1)] == ["boundary", "train", "usage", "class_stats", "alignment"]
    assert effects[0, "dense_warmup"] == pool_parameters | head
    assert effects[0, "train"] == effects[1, "train"] == pool_parameters | head
    assert effects[0, "usage"] == effects[1, "usage"] == {"experts.usage"}
    assert effects[0, "class_stats"] == effects[1, "class_stats"] == set()
    assert effects[1, "boundary"] >= {"experts.old_keys"} and effects[1, "boundary"] <= {"experts.old_keys",
                                                                                          "experts.frequent"}
    assert effects[1, "alignment"] == head
    assert int(method.pool.usage.sum()) == 2 * 2 * HEADS * 2 * 16  # 2 tasks x 16 images x top-2, per block and head


def test_usage_counts_and_exclusion_after_a_resume_equal_the_uninterrupted_runs(tmp_path):
    config = tiny_config("smope")
    straight = run_fixture(config, tmp_path / "straight")
    after_usage = Position(1, 3, 0)  # task 2, after its usage pass, before its class statistics
    with pytest.raises(Crash):
        run_fixture(config, tmp_path / "crashed", after_epoch=crash_at(after_usage))
    resumed = run_fixture(config, tmp_path / "crashed", resume=True)
    final = [torch.load(tmp_path / run / "checkpoints" / "task3.pt", weights_only=True)["method"]["experts"]
             for run in ("straight", "crashed")]
    for key in ("usage", "frequent", "old_keys", "keys", "values"):
        assert torch.equal(final[0][key], final[1][key]), key
    assert int(final[0]["usage"].sum()) > 0 and bool(final[0]["frequent"].any())
    assert torch.equal(torch.as_tensor(straight["accuracy"].correct), torch.as_tensor(resumed["accuracy"].correct))


def test_the_official_reload_evaluates_without_excluding_never_used_experts():
    ctx = RunContext(build(tiny_config("smope")))
    method = SMoPE(ctx, ctx.config.settings)
    method.pool.usage.fill_(5)
    method.pool.usage[:, :, :2] = 0  # two experts never used: excluded unless the official reload is asked for
    images = torch.randn(6, 3, 16, 16)
    excluded = method.encode(images, method.pool.evaluation_penalties(2.0))
    assert not torch.equal(excluded, method.encode(images, method.pool.evaluation_penalties(0.0)))
    from norga.methods.base import PredictRequest
    method.settings.official_reload_evaluation = True
    reloaded = method.model.classify(method.encode(images, torch.zeros_like(method.pool.usage, dtype=torch.float)))
    assert torch.equal(method.predict(PredictRequest(images, 1)).classes, method.seen_classes(reloaded, 1))


def test_class_gaussians_diagonal_are_population_variances_sampled_per_dimension():
    features = torch.randn(7, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    gaussians = ClassGaussians(diagonal=True)
    gaussians.add_class(4, features)
    variance = ((features - features.mean(0)) ** 2).mean(0) + 1e-4
    torch.testing.assert_close(gaussians.covariance(4).double(), variance, rtol=1e-6, atol=0)
    draws, labels = gaussians.sample([4], 5, torch.Generator().manual_seed(9))
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(draws.double(), gaussians.mean(4).double() + noise * variance.sqrt(), rtol=1e-6,
                               atol=1e-6)
    restored = ClassGaussians()
    restored.load_state_dict(copy.deepcopy(gaussians.state_dict()))
    assert restored.diagonal and torch.equal(restored.sample([4], 5, torch.Generator().manual_seed(9))[0], draws)


def test_the_per_iteration_cosine_freezes_then_decays_to_its_final_lr():
    lrs = [cosine_iteration_lr(i, 6, 1.0, freeze=2) for i in range(8)]
    assert lrs[:2] == [1e-6, 1e-6] and lrs[2] == 1.0 and lrs[6:] == [1e-6, 1e-6]
    assert math.isclose(lrs[4], 1e-6 + 0.5 * (1 - 1e-6))  # halfway through the 4 cosine iterations
    assert expert_scores(torch.ones(1, 1, 3, 2), torch.ones(1, 4, 2)).shape == (1, 1, 4)


def test_no_normalisation_feeds_pixels_in_zero_one_as_the_official_code():
    from norga.data.transforms import build_transforms

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    _, plain = build_transforms(16, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1), "none")
    _, normalised = build_transforms(16, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1), "backbone")
    scale, shift = torch.tensor([0.25, 0.2, 0.1])[:, None, None], torch.tensor([0.5, 0.4, 0.3])[:, None, None]
    torch.testing.assert_close(plain(image), normalised(image) * scale + shift)
    assert 0.0 <= float(plain(image).min()) and float(plain(image).max()) <= 1.0


def test_the_training_loss_is_current_task_cross_entropy_plus_the_weighted_router_and_prototype_losses():
    ctx = RunContext(build(tiny_config("smope")))
    method = SMoPE(ctx, ctx.config.settings)
    s, pool, model = method.settings, method.pool, method.model
    torch.manual_seed(5)
    pool.usage.random_(0, 5)
    pool.cross_boundary("mean_nonzero")  # flags and a key snapshot, then keys that moved since
    with torch.no_grad():
        pool.keys.add_(0.1 * torch.randn_like(pool.keys))

    def current_task_ce(logits: Tensor, labels: Tensor, task: int) -> Tensor:
        classes = ctx.classes(task)
        column = torch.tensor([classes.index(int(label)) for label in labels])
        return -logits[:, classes].log_softmax(dim=1)[torch.arange(len(labels)), column].mean()

    for task in (0, 1):
        batch = next(iter(ctx.train_loader(task, 0, 4)))
        record = []
        logits = model(batch.images, attachments=pool.attachments(pool.frequent.float() * s.noise, record)).logits
        router = sum(router_loss(r.scores, r.selected, s.noise) for r in record).mean()
        expected = current_task_ce(logits, batch.labels, task) + s.alpha_router * router
        if task > 0:
            expected = expected + s.alpha_proto * prototype_loss(pool.old_keys, pool.keys, pool.frequent, s.top_k)
        torch.testing.assert_close(method.training_loss(task, dense=False)(batch), expected)
        dense_logits = model(batch.images, attachments=pool.attachments(None)).logits
        torch.testing.assert_close(method.training_loss(task, dense=True)(batch),
                                   current_task_ce(dense_logits, batch.labels, task))
    proto = prototype_loss(pool.old_keys, pool.keys, pool.frequent, s.top_k)
    assert float(s.alpha_router * router.detach()) > 1e-3 and float(s.alpha_proto * proto.detach()) > 1e-3


@pytest.mark.parametrize("kernel", ["explicit", "bias"])
def test_the_fused_kernels_with_the_token_mean_gate_match_the_reference_and_flex_refuses_it(kernel):
    from norga.nn import TokenMeanGate, fused_prefix_attention, reference_prefix_attention

    torch.manual_seed(6)
    q, k, v = (torch.randn(2, HEADS, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(2, HEADS, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, HEADS, 7, 4, dtype=torch.float64)
    results = []
    for attend in (reference_prefix_attention, lambda *a: fused_prefix_attention(*a, kernel=kernel)):
        out = attend(q, k, v, pk, pv, TokenMeanGate(), 0.5)
        results.append((out, *torch.autograd.grad(out, (q, k, v, pk, pv), grad_out)))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="flex prefix kernel modifies each score alone"):
        fused_prefix_attention(q, k, v, pk, pv, TokenMeanGate(), 0.5, kernel="flex")
