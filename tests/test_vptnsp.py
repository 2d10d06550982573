"""VPT-NSP² as a method (spec oracles O4, O8, O9, O10 and the official forward and statistics pass): the LayerNorm
caveat of the paper's conditions, gradients only where intended, the schedule's drop epochs and the class order,
the forward and the statistics against written-out references, and kill-and-resume bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import Crash, build, make_engine, tiny_config
from test_nsp_components import ToyBlock, fresh_generator

from norga.data.splits import class_order
from norga.engine.loop import Position, open_run
from norga.methods.base import Phase
from norga.methods.nsp.collector import collect_statistics
from norga.methods.nsp.method import drop_epochs, prompt_statistics_loss
from norga.methods.nsp.null_space import descending_eigh, projector
from norga.methods.nsp.settings import NSPTrainConfig
from norga.methods.nsp.statistics import LayerStatistics, prompt_attention
from norga.runtime.optim import build_optimizer
from norga.runtime.projected_adam import ProjectedAdam


def method_of(tmp_path, name: str = "run", **changes):
    """A tiny vptnsp run's method, before any task (tests/tiny.yaml's section with `changes`)."""
    return make_engine(tiny_config("vptnsp", **changes), tmp_path / name).method


def no_logs(epoch: int, logs: dict) -> None:
    pass


def learn_task(method, task: int, collect: bool = True) -> None:
    method.run_phase(task, Phase("train", method.settings.train.epochs), 0, no_logs)
    if collect:
        method.run_phase(task, Phase("null_space"), 0, no_logs)


# ------------------------------------------------------------------------ the LayerNorm caveat (O4)

def ln_rows(prompt: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(prompt, prompt.shape[-1:], gain, torch.zeros_like(gain))


def output_change(block: ToyBlock, images: torch.Tensor, prompt: torch.Tensor, step: torch.Tensor, gain: torch.Tensor,
                  eps: float) -> float:
    before = block.attention(images, ln_rows(prompt, gain))
    return (block.attention(images, ln_rows(prompt + eps * step, gain)) - before).abs().max().item()


def test_with_layernorm_on_the_prompt_path_a_projected_step_moves_old_outputs_at_first_order():
    """O4: the conditions (Ω1 = Q·W_k, Ω2 = S_P of LN1(P)) drop LN1's gain and each token's 1/σ, so the exactly
    projected step ΔP = B2·G·B1 on P still moves the old outputs in proportion to ε (not at round-off as in O3)."""
    g = fresh_generator()
    dim, heads, tokens, prompts = 24, 2, 3, 8
    block, images = ToyBlock(dim, heads, g), torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    prompt = torch.randn(prompts, dim, generator=g, dtype=torch.float64) * 2 + 0.5
    grad = torch.randn(prompts, dim, generator=g, dtype=torch.float64)
    for gain in (torch.ones(dim, dtype=torch.float64), 1 + 0.5 * torch.randn(dim, generator=g, dtype=torch.float64)):
        left, right = block.exact_projectors(block.statistics(images, ln_rows(prompt, gain)), heads * tokens)
        step = left @ grad @ right
        ratios = [output_change(block, images, prompt, step, gain, eps) / eps for eps in (1e-4, 1e-5, 1e-6)]
        unprojected = output_change(block, images, prompt, grad, gain, 1e-6) / 1e-6
        assert ratios[0] == pytest.approx(ratios[2], rel=1e-2), ratios  # first order: |ΔF| ∝ ε
        assert 1e-4 * unprojected < ratios[2] < unprojected, (ratios, unprojected)


def constrained_step(block: ToyBlock, images: torch.Tensor, prompt: torch.Tensor, scale: float,
                     g: torch.Generator) -> torch.Tensor:
    """A random ΔP in the paper's null spaces (of the features of LN1(P)) whose rows also have zero mean and are
    orthogonal to their own normalised prompt row (so LN1 keeps each token's mean and std to first order)."""
    queries, image_keys, _, prompt_keys, _ = block.parts(images, ln_rows(prompt, torch.full_like(prompt[0], scale)))
    rows, dim = prompt.shape
    omega1 = torch.einsum("bhnd,hde->hne", queries, block.w_k.reshape(block.heads, block.head_dim, dim)).reshape(-1, dim)
    omega2 = prompt_attention(queries, image_keys, prompt_keys, block.head_dim ** -0.5).reshape(-1, rows)
    normalised = (prompt - prompt.mean(-1, keepdim=True)) / prompt.std(-1, unbiased=False, keepdim=True)
    eye_rows, eye_dim = torch.eye(rows, dtype=prompt.dtype), torch.eye(dim, dtype=prompt.dtype)
    constraints = torch.cat([
        torch.kron(eye_rows, omega1),  # Ω1 ΔP_iᵀ = 0 for every row i
        torch.kron(omega2, eye_dim),  # Ω2 ΔP = 0 column by column
        torch.kron(eye_rows, torch.ones(1, dim, dtype=prompt.dtype)),  # zero row means
        torch.block_diag(*normalised[:, None, :]),  # tangent rows
    ])
    _, values, vectors = torch.linalg.svd(constraints)
    rank = int((values > values[0] * 1e-10).sum())
    null = vectors[rank:].T
    return (null @ (null.T @ torch.randn(rows * dim, generator=g, dtype=prompt.dtype))).reshape(rows, dim)


def test_under_the_papers_assumptions_old_outputs_move_only_at_second_order():
    """O4: with a constant LN1 gain, prompt tokens of one std and a step that keeps each token's mean and std, LN1 is
    linear along the step, the conditions hold for LN1(P + εΔP) to first order and |ΔF| / ε falls with ε."""
    g = fresh_generator()
    dim, heads, tokens, prompts = 24, 2, 3, 8
    block, images = ToyBlock(dim, heads, g), torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    raw = torch.randn(prompts, dim, generator=g, dtype=torch.float64)
    prompt = 1.7 * (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, unbiased=False, keepdim=True) + 0.3
    scale = 1.3
    step = constrained_step(block, images, prompt, scale, g)
    gain = torch.full((dim,), scale, dtype=torch.float64)
    ratios = [output_change(block, images, prompt, step, gain, eps) / eps for eps in (1e-3, 1e-4, 1e-5)]
    assert ratios[1] < 0.2 * ratios[0] and ratios[2] < 0.2 * ratios[1], ratios  # ∝ ε: second order
    free = torch.randn(prompts, dim, generator=g, dtype=torch.float64)
    assert output_change(block, images, prompt, free, gain, 1e-5) / 1e-5 > 1e3 * ratios[2]


# ---------------------------------------------------------------------- the official forward, the statistics pass

def official_features(method, images: torch.Tensor) -> torch.Tensor:
    """The official forward written out: in every prompted block the prompts join the tokens after them, norm1 and
    attention run over all, the prompts' outputs are dropped; the class token after the final norm."""
    vit = method.model.backbone
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for index, block in enumerate(vit.blocks):
        if index in method.layers:
            prompt = method.prompts[str(index)].expand(len(x), -1, -1)
            mixed = block.attn(block.norm1(torch.cat([x, prompt], dim=1)))[:, : x.shape[1]]
        else:
            mixed = block.attn(block.norm1(x))
        x = x + block.ls1(mixed)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return vit.norm(x)[:, 0]


def test_prompts_reach_the_image_tokens_exactly_as_in_the_official_forward(tmp_path):
    method = method_of(tmp_path, layers=[1])
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(method.features(images), official_features(method, images))
        assert not torch.allclose(method.features(images), method.model.forward_features(images), atol=1e-4)


def test_the_statistics_pass_records_each_blocks_queries_and_prompt_attention(tmp_path):
    """The collector against the block's features computed by hand from its input (captured by a pre-hook)."""
    method = method_of(tmp_path)
    dataset = method.ctx.tasks[0].train_eval
    prompts = {layer: method.prompts[str(layer)] for layer in method.layers}
    got = collect_statistics(method.ctx, prompts, dataset, 5, per_batch_mean=False)
    blocks = method.model.backbone.blocks
    inputs = {layer: [] for layer in method.layers}
    handles = [blocks[layer].register_forward_pre_hook(lambda _m, args, layer=layer: inputs[layer].append(args[0]))
               for layer in method.layers]
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        method.features(images)
    for handle in handles:
        handle.remove()
    for layer in method.layers:
        attn, x = blocks[layer].attn, inputs[layer][0].double()
        heads, head_dim, dim = attn.num_heads, attn.head_dim, x.shape[-1]
        weight, bias = attn.qkv.weight.double(), attn.qkv.bias.double()

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

        norm = blocks[layer].norm1
        z = F.layer_norm(x, (dim,), norm.weight.double(), norm.bias.double(), norm.eps)
        p = blocks[layer].norm1(prompts[layer]).double()
        queries, keys = split(z @ weight[:dim].T + bias[:dim]), split(z @ weight[dim:2 * dim].T + bias[dim:2 * dim])
        prompt_keys = split(p @ weight[dim:2 * dim].T + bias[dim:2 * dim])
        expected = LayerStatistics.empty(heads, head_dim, prompts[layer].shape[1])
        expected.add(queries, prompt_attention(queries, keys, prompt_keys, head_dim ** -0.5))
        assert got[layer].images == len(dataset) and got[layer].batches == -(-len(dataset) // 5)
        torch.testing.assert_close(got[layer].query_gram, expected.query_gram, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[layer].attention_gram, expected.attention_gram, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- gradients only where intended (O8)

def test_gradients_reach_the_prompts_and_the_current_head_only_and_old_heads_stay(tmp_path):
    method = method_of(tmp_path)
    learn_task(method, 0)
    old_head = {key: value.clone() for key, value in method.heads[0].state_dict().items()}
    backbone = {key: value.clone() for key, value in method.model.backbone.state_dict().items()}
    batch = next(iter(method.ctx.train_loader(1, 0, 4)))
    prompts = method.named_prompts()
    anchored = prompt_statistics_loss(prompts, method.anchors)
    assert anchored.item() == 0.0  # the prompts are the anchors at a task's first step ...
    assert all(g is None or not g.any() for g in torch.autograd.grad(anchored, list(prompts.values()),
                                                                      allow_unused=True))  # ... and it pulls nowhere
    for p in [*method.prompts.parameters(), *method.heads.parameters()]:
        p.grad = None  # left by task 1's last step
    method.task_loss(1, batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.heads[1].parameters())
    for t in (0, 2):
        assert all(p.grad is None for p in method.heads[t].parameters())
    assert all(p.grad is None for p in method.model.parameters())
    assert all(not anchor.requires_grad for anchor in method.anchors.values())
    for p in method.prompts.parameters():
        p.grad = None
    for p in method.heads[1].parameters():
        p.grad = None
    learn_task(method, 1, collect=False)
    assert all(torch.equal(old_head[key], value) for key, value in method.heads[0].state_dict().items())
    assert all(torch.equal(backbone[key], value) for key, value in method.model.backbone.state_dict().items())
    assert method.optimizer.projected_names == sorted(prompts)


def test_the_prompt_statistics_loss_is_the_mean_l1_of_token_means_and_stds_summed_over_blocks():
    g = fresh_generator()
    prompts = {f"prompts.{i}": torch.randn(1, 4, 6, generator=g, dtype=torch.float64) for i in range(2)}
    anchors = {name: torch.randn(1, 4, 6, generator=g, dtype=torch.float64) for name in prompts}
    expected = 0.0
    for name in prompts:
        for t in range(4):
            p, a = prompts[name][0, t].tolist(), anchors[name][0, t].tolist()
            mean_p, mean_a = sum(p) / 6, sum(a) / 6
            std_p = (sum((v - mean_p) ** 2 for v in p) / 6) ** 0.5
            std_a = (sum((v - mean_a) ** 2 for v in a) / 6) ** 0.5
            expected += (abs(mean_p - mean_a) + abs(std_p - std_a)) / 4
    assert prompt_statistics_loss(prompts, anchors).item() == pytest.approx(expected, rel=1e-12)
    assert prompt_statistics_loss(prompts, {}) == 0.0


# --------------------------------------------------------------------------- schedule and class order (O9)

def test_projected_adam_from_the_settings_is_torch_adam_until_projections_are_set():
    """O6(a) through the settings: ``projected_adam`` built from the train section (lr, betas, eps, weight decay)
    takes torch's Adam steps bit for bit while it has no projections."""
    g = fresh_generator()
    cfg = NSPTrainConfig(lr=0.003, weight_decay=0.01, betas=[0.8, 0.99], eps=1e-6)
    ours, reference = (torch.randn(2, 4, 5, generator=g).requires_grad_() for _ in range(2))
    reference.data.copy_(ours.data)
    optimizer = build_optimizer([{"params": [ours], "param_names": ["prompts.0"]}], cfg)
    torch_adam = torch.optim.Adam([reference], lr=0.003, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, foreach=False)
    for _ in range(4):
        grad = torch.randn(2, 4, 5, generator=g)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        optimizer.step()
        torch_adam.step()
    assert isinstance(optimizer, ProjectedAdam) and torch.equal(ours, reference)


def test_drop_epochs_of_the_paper_and_of_the_official_code():
    paper, official = drop_epochs([0.5, 0.8], 100, False), drop_epochs([0.5, 0.8], 100, True)
    assert (paper, official) == ([50, 80], [40, 70])
    assert drop_epochs([0.5, 0.8], 10, True) == [4, 7]  # per code epoch: 1e-2 ×4, 1e-3 ×3, 1e-4 ×3 (spec O9)


def test_the_training_phase_runs_at_the_official_rates_per_epoch(tmp_path):
    method = method_of(tmp_path, official_lr_drops=True, **{"train.epochs": 10, "train.lr": 0.01})
    rates = []
    method.run_phase(0, Phase("train", 10), 0, lambda epoch, logs: rates.append(logs["lr"]))
    assert rates == pytest.approx([1e-2] * 4 + [1e-3] * 3 + [1e-4] * 3, rel=1e-12)
    method = method_of(tmp_path, "paper", **{"train.epochs": 10, "train.lr": 0.01})
    rates = []
    method.run_phase(0, Phase("train", 10), 0, lambda epoch, logs: rates.append(logs["lr"]))
    assert rates == pytest.approx([1e-2] * 5 + [1e-3] * 3 + [1e-4] * 2, rel=1e-12)


def test_numpys_pcg64_class_order_of_the_official_seeds():
    """Spec §6.3 (computed there with numpy): the first classes of seeds 2024, 2025, 2026."""
    assert class_order(100, 2024, rule="pcg64")[:10] == [55, 17, 75, 11, 2, 29, 49, 48, 41, 45]
    assert class_order(200, 2024, rule="pcg64")[:5] == [192, 54, 163, 105, 170]
    assert class_order(100, 2025, rule="pcg64")[:5] == [79, 92, 13, 3, 76]
    assert class_order(100, 2026, rule="pcg64")[:5] == [16, 17, 97, 10, 91]
    assert sorted(class_order(100, 2024, rule="pcg64")) == list(range(100))
    assert class_order(100, 2024) != class_order(100, 2024, rule="pcg64")


# -------------------------------------------------------------------------------- phases and projectors

def test_the_null_space_phase_builds_the_projectors_from_the_accumulated_statistics(tmp_path):
    """After two tasks the projector of each block is the paper's projector of the sum of both tasks' statistics."""
    method = method_of(tmp_path)
    assert [p.name for p in method.phases(0)] == ["train", "null_space"]
    assert [p.name for p in method.phases(2)] == ["train"]
    learn_task(method, 0)
    first = {name: stats.query_gram.clone() for name, stats in method.statistics.layers.items()}
    learn_task(method, 1)
    prompts = {layer: method.prompts[str(layer)] for layer in method.layers}
    again = collect_statistics(method.ctx, prompts, method.ctx.tasks[1].train_eval, 5, False)
    for layer in method.layers:
        name = method.prompt_name(layer)
        torch.testing.assert_close(method.statistics.layers[name].query_gram, first[name] + again[layer].query_gram)
        weight = method.model.backbone.blocks[layer].attn.qkv.weight
        c1 = method.statistics.layers[name].affinity_covariance(weight[32:64])
        values, vectors = descending_eigh(c1)
        left, right = method.projectors[name]
        assert left.shape == (4, 4) and right.dtype == torch.float32
        start = int(torch.argmax(values[:-2] - 2 * values[1:-1] + values[2:])) + 2
        torch.testing.assert_close(right, projector(vectors[:, start:]).float())
        assert method.run_record()["vptnsp"]["null_dims"][name]["right"] == 32 - start
        assert torch.equal(method.anchors[name], method.prompts[str(layer)].detach())


# ----------------------------------------------------------------------------------- kill and resume (O10)

def snapshot(method) -> list[torch.Tensor]:
    """Every tensor of the method's light and heavy state, in a fixed order (moments, statistics, projectors ...)."""
    def flat(value):
        if isinstance(value, torch.Tensor):
            yield value.detach().clone()
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                yield from flat(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from flat(item)

    return list(flat({"light": method.state_dict(), "heavy": method.heavy_state_dict()}))


def recorded_run(config, directory, crash_at: Position | None = None, resume: bool = False) -> dict:
    snapshots: dict[tuple, list[torch.Tensor]] = {}
    holder = {}

    def after(position: Position) -> None:
        snapshots[(position.task, position.phase, position.epoch)] = snapshot(holder["engine"].method)
        if position == crash_at:
            raise Crash(str(position))

    holder["engine"] = engine = open_run(build(config), directory, resume=resume, after_epoch=after)
    engine.run()
    return snapshots


RESUMED_CONFIG = {"null_space.nullity": "adaptive", "null_space.normalize_projection": True,
                  "null_space.eta_affinity": 0.9, "null_space.eta_aggregation": 0.9}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> dict:
    """Snapshots at every checkpoint of an uninterrupted tiny run (the official projector, so that every part of
    it is checkpointed and compared)."""
    return recorded_run(tiny_config("vptnsp", **RESUMED_CONFIG), tmp_path_factory.mktemp("straight") / "run")


@pytest.mark.parametrize("crash_at", [Position(1, 0, 1), Position(0, 2, 0), Position(1, 0, 0)],
                         ids=["mid-task", "after-the-statistics", "between-tasks"])
def test_kill_and_resume_is_bit_identical_with_statistics_projectors_and_moments(tmp_path, crash_at, straight_run):
    config = tiny_config("vptnsp", **RESUMED_CONFIG)
    with pytest.raises(Crash):
        recorded_run(config, tmp_path / "crashed", crash_at=crash_at)
    resumed = recorded_run(config, tmp_path / "crashed", resume=True)
    after = [key for key in straight_run if key > (crash_at.task, crash_at.phase, crash_at.epoch)]
    assert after and set(after) <= set(resumed)
    for key in after:
        assert len(straight_run[key]) == len(resumed[key]), key
        assert all(torch.equal(a, b) for a, b in zip(straight_run[key], resumed[key])), key
