"""Reparameterized prefixes (``prompt.param: mlp``, ``prompt_param: mlp``): the official MLP and its init, the
interleaved key/value columns, folding (bit-identical logits), HiDe's momentum and sequential init acting on the
produced prefixes, what receives gradients, exact resume mid-task, and DualPrompt's run changed by the setting
(the SMoPE / reparameterization spec's oracles B6.1-6)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from engine_fixtures import Crash, crash_at, make_engine, run_fixture, tiny_config
from prompted_fixture import Prompted

from norga.config import ConfigError
from norga.config_io import load_config
from norga.engine.loop import Position
from norga.nn import PrefixMLP, PrefixPool, PromptedViT, TaskPrompts
from norga.nn.prefix_reparam import embedding_bound
from norga.runtime.seeding import generator

LAYERS, SLOTS, LP, H, D = 2, 3, 3, 2, 4  # pool-level tests: D is the head dim (width H·D = 8)


def tiny_prompted(param="mlp", length=2, gate="tanh"):
    """A 2-block ViT of width 32 (patch 8, 3 channels) with NoRGa's task prompts over blocks 0 and 1."""
    kwargs = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
    host = PromptedViT(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs))
    prompts = TaskPrompts(host, SLOTS, length, (0, 1), gate=gate, param=param)
    return Prompted(host, prompts).eval()


def test_keys_and_values_are_the_interleaved_columns_of_each_layers_own_mlp():
    net = PrefixMLP(LAYERS, LP, H, D).double()
    produced = net()
    assert produced.shape == (LAYERS, 2, LP, H, D) and produced.dtype == torch.float64
    for layer in range(LAYERS):
        first, last = net.mlps[layer][0], net.mlps[layer][2]
        for row in range(LP):
            out = last.weight @ torch.tanh(first.weight @ net.embeddings[layer, row] + first.bias) + last.bias
            for column in range(H * D):  # key c is output column 2c, value c is column 2c+1
                head, dim = divmod(column, D)
                key, value = produced[layer, 0, row, head, dim], produced[layer, 1, row, head, dim]
                torch.testing.assert_close(key, out[2 * column], rtol=1e-12, atol=1e-15)
                torch.testing.assert_close(value, out[2 * column + 1], rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # hand-set output: column j of every row is j
        for mlp in net.mlps:
            mlp[2].weight.zero_()
            mlp[2].bias.copy_(torch.arange(2 * H * D, dtype=torch.float64))
    produced = net()
    assert torch.equal(produced[:, 0].flatten(-2), torch.arange(0, 2 * H * D, 2).double().expand(LAYERS, LP, -1))
    assert torch.equal(produced[:, 1].flatten(-2), torch.arange(1, 2 * H * D, 2).double().expand(LAYERS, LP, -1))


def test_init_draws_the_official_embedding_bound_then_torchs_default_linears_in_order():
    """As ReparamPrefix builds it: embeddings U(±sqrt(6/(patch inputs + D))) (VPT's xavier bound), then per layer
    nn.Linear(D, 48) and nn.Linear(48, 2D) as constructed (weight, bias)."""
    seed, width, patch_inputs = int(torch.randint(0, 2**31, ())), H * D, 3 * 8 * 8
    net = PrefixMLP(LAYERS, LP, H, D, patch_inputs=patch_inputs, generator=torch.Generator().manual_seed(seed))
    bound = math.sqrt(6 / (patch_inputs + width))
    torch.manual_seed(seed)
    embeddings = torch.empty(LAYERS, LP, width).uniform_(-bound, bound)
    linears = [[torch.nn.Linear(width, 48), torch.nn.Linear(48, 2 * width)] for _ in range(LAYERS)]
    assert torch.equal(net.embeddings, embeddings)
    for mlp, (first, last) in zip(net.mlps, linears):
        assert isinstance(mlp[1], torch.nn.Tanh)
        for mine, official in ((mlp[0], first), (mlp[2], last)):
            assert torch.equal(mine.weight, official.weight) and torch.equal(mine.bias, official.bias)
    assert embedding_bound(3 * 16 * 16, 768) == 0.0625  # ViT-B/16


def test_vit_b_sizes_parameter_count_and_initial_scale():
    """ViT-B width: 112,176 MLP parameters per layer plus Lp·768 embeddings; the produced prefixes start with
    std ≈ 0.085 (the last bias's U(±1/sqrt(48)) dominates: sqrt(1/144 + 48·(σ_h²)/144) with σ_h ≈ 0.03)."""
    net = PrefixMLP(1, 10, 12, 64)
    mlp_params = sum(p.numel() for p in net.mlps.parameters())
    assert mlp_params == 112_176 and net.embeddings.numel() == 10 * 768
    with torch.no_grad():
        std = net().std().item()
    assert 0.080 < std < 0.090  # the sample std of 15,360 values, ~1 % relative noise
    assert net.embeddings.abs().max() <= 0.0625


@pytest.mark.parametrize("path", ["one slot with momentum", "per-sample slots"])
@pytest.mark.parametrize("amp", [False, True])
def test_a_folded_slot_gives_bit_identical_logits(path, amp):
    model = tiny_prompted()
    pool = model.prompts.pool
    pool.begin_slots([2], None, torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, 16, 16)
    slots, momentum = (2, 0.3) if path == "one slot with momentum" else (torch.tensor([2, 0, 2, 1]), 0.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        produced = model(x, slots, momentum).logits
        pool.commit(2, momentum)
        assert pool.network_of(2) is None  # folded: a plain slot
        folded = model(x, slots).logits
        other_slot = model(x, torch.tensor([0, 0, 0, 0])).logits
    assert torch.equal(produced, folded)
    assert (produced - other_slot).abs().max() > 1e-4  # the slot acts


def test_momentum_blends_the_produced_prefixes_and_the_commit_folds_that_blend():
    pool = PrefixPool(LAYERS, SLOTS, LP, H, D, param="mlp")
    with torch.no_grad():
        pool.slots[2].fill_(float("nan"))  # the raw parameter of a bound slot is never read
    pool.begin_slots([2], None, torch.Generator().manual_seed(0))
    m, earlier = 0.25, (pool.slots[0].detach() + pool.slots[1].detach()) / 2
    blended = pool.blended(2, m)
    torch.testing.assert_close(blended, (1 - m) * pool.networks[0]() + m * earlier, rtol=1e-6, atol=1e-7)
    blended.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.networks[0].parameters())
    assert all(slot.grad is None for slot in pool.slots)
    pool.commit(2, m)
    assert torch.equal(pool.slots[2], blended.detach()) and pool.network_of(2) is None
    with torch.no_grad():
        pool.networks[0].embeddings.add_(1.0)
    pool.commit(2, m)  # a folded slot stays as it is (a resumed run may commit again)
    assert torch.equal(pool.slots[2], blended.detach())


def test_sequential_init_continues_the_mlp_and_a_fresh_init_redraws_it():
    pool = PrefixPool(LAYERS, SLOTS, LP, H, D, param="mlp")
    pool.begin_slots([0], None, torch.Generator().manual_seed(0))
    with torch.no_grad():  # task 0's training
        for p in pool.networks[0].parameters():
            p.add_(torch.randn_like(p))
    trained = pool.slot(0).detach().clone()
    pool.commit(0)
    pool.begin_slots([1], [0], torch.Generator().manual_seed(1))  # the generator is not drawn from
    assert torch.equal(pool.slot(1), trained) and torch.equal(pool.slot(1), pool.slots[0])
    pool.commit(1)
    pool.begin_slots([2], None, torch.Generator().manual_seed(5))
    fresh = PrefixMLP(LAYERS, LP, H, D, generator=torch.Generator().manual_seed(5))
    assert torch.equal(pool.slot(2), fresh())
    raw = PrefixPool(LAYERS, SLOTS, LP, H, D)
    raw.begin_slots([1], [0])
    assert torch.equal(raw.slots[1], raw.slots[0])


def test_only_the_bound_mlp_trains_and_gradients_reach_it_not_the_raw_prefixes():
    model = tiny_prompted()
    prompts, host = model.prompts, model.host
    prompts.pool.begin_slots([0], None, torch.Generator().manual_seed(0))
    prompts.pool.commit(0)
    prompts.pool.begin_slots([1], [0])
    trainable = prompts.train_slot(1, "none")
    network = prompts.pool.networks[0]
    assert {id(p) for p in trainable} == {id(p) for p in network.parameters()}
    loss = model(torch.randn(3, 3, 16, 16), 1, 0.1).logits.square().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert all(slot.grad is None for slot in prompts.pool.slots)
    assert all(p.grad is None for name, p in host.backbone.named_parameters() if not name.startswith("head."))
    prompts.freeze()
    assert not any(p.requires_grad for p in prompts.parameters())


def test_an_mlp_whose_output_is_its_bias_equals_the_raw_slot_holding_that_bias():
    """Spec B6.5: with the last linear zeroed and interleave(K, V) as its bias (Lp 1), the produced slot is (K, V),
    and the logits equal those of a raw slot holding (K, V)."""
    model = tiny_prompted(length=1)
    pool = model.prompts.pool
    pool.begin_slots([2], None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer, mlp in enumerate(pool.networks[0].mlps):
            keys, values = pool.slots[1][layer, 0, 0].flatten(), pool.slots[1][layer, 1, 0].flatten()
            mlp[2].weight.zero_()
            mlp[2].bias.copy_(torch.stack([keys, values], dim=1).flatten())  # k0 v0 k1 v1 ...
        x = torch.randn(3, 3, 16, 16)
        assert torch.equal(model(x, 2).logits, model(x, 1).logits)


@pytest.mark.parametrize(("param", "sequential"), [("mlp", True), ("raw", False), ("mlp", False)])
def test_hides_sequential_init_setting_copies_slot_t_minus_1_or_starts_afresh(tmp_path, param, sequential):
    """Task 1's prompt phase (no epochs) starts slot 1 as slot 0 / from slot 0's MLP, or afresh: raw, the slot's own
    init; mlp, an MLP drawn from the run's (seed, "prompt_init", 1) generator. (Raw with sequential init:
    tests/test_hide_pipeline.py.)"""
    no_epochs = {f"{stage}.epochs": 0 for stage in ("tii.train", "tii.tap", "wtp.train", "wtp.tap")}
    config = tiny_config("hide", **{"prompt.param": param, "prompt.sequential_init": sequential, **no_epochs})
    method = make_engine(config, tmp_path / "run").method
    pool, no_log = method.prompts.pool, lambda epoch, logs: None
    for phase in method.phases(0):  # task 0 (its slot committed: folded, with mlp)
        if phase.evaluate is None:
            method.run_phase(0, phase, 0, no_log)
    before = [pool.slot(0).detach().clone(), pool.slot(1).detach().clone()]
    method.run_phase(1, next(p for p in method.phases(1) if p.name == "wtp_train"), 0, no_log)
    if sequential:
        assert torch.equal(pool.slot(1), before[0])
    elif param == "raw":
        assert torch.equal(pool.slot(1), before[1]) and not torch.equal(before[1], before[0])
    else:
        fresh = PrefixMLP(2, 2, 2, 16, patch_inputs=3 * 8 * 8, generator=generator(config.seed, "prompt_init", 1))
        assert torch.equal(pool.slot(1), fresh()) and not torch.equal(pool.slot(1), before[0])


def test_bad_combinations_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"hide\.prompt\.param=mlp has no prompts .* hide\.prompt\.length"):
        load_config(None, ["method=hide", "hide.prompt.length=0", "hide.prompt.param=mlp"])
    with pytest.raises(ConfigError, match=r"l2p\.prompt_param=mlp .* l2p\.prompt_type=prefix"):
        load_config(None, ["method=l2p", "l2p.prompt_param=mlp"])
    config = tiny_config("dualprompt", prompt_param="mlp", pool_size=2)
    with pytest.raises(ConfigError, match=r"dualprompt\.pool_size=3 "):
        make_engine(config, tmp_path / "refused")


def crash_and_resume(config, directory, *crash_points):
    """A run crashed right after checkpoint ``crash_points[0]``, resumed and crashed after the next one, ..., then
    resumed to its end: its matrices and final checkpoint."""
    for position in crash_points:
        with pytest.raises(Crash):
            run_fixture(config, directory, after_epoch=crash_at(position), resume=position is not crash_points[0])
    matrices = run_fixture(config, directory, resume=True)
    return matrices, final_method_state(directory)


def final_method_state(directory):
    return torch.load(directory / "checkpoints" / "task3.pt", weights_only=True)["method"]


def assert_same_runs(first, second):
    """Equal matrices, and every tensor of the final method checkpoints (prompts, networks, head ...) equal."""
    (matrices_a, state_a), (matrices_b, state_b) = first, second
    assert set(matrices_a) == set(matrices_b)
    for name in matrices_a:
        assert torch.equal(torch.as_tensor(matrices_a[name].correct), torch.as_tensor(matrices_b[name].correct)), name
    for section in ("model", "prompts"):
        assert state_a[section].keys() == state_b[section].keys()
        for key in state_a[section]:
            assert torch.equal(state_a[section][key], state_b[section][key]), f"{section}.{key}"


def test_norga_with_mlp_prefixes_resumes_exactly_mid_task_and_between_training_and_folding(tmp_path):
    short = {"tii.train.epochs": 1, "tii.tap.epochs": 1, "wtp.tap.epochs": 1}  # the stages around the prompts
    config = tiny_config("norga", **{"prompt.param": "mlp", **short})
    engine = make_engine(config, tmp_path / "straight")
    straight = engine.run(), final_method_state(tmp_path / "straight")
    prompts = straight[1]["prompts"]
    assert any(key.startswith("pool.networks.") for key in prompts) and torch.equal(prompts["pool.bound"],
                                                                                    torch.tensor([-1]))
    phases = [phase.name for phase in engine.method.phases(1)]
    mid_task, before_folding = Position(1, phases.index("wtp_train"), 1), Position(1, phases.index("momentum"), 0)
    assert_same_runs(straight, crash_and_resume(config, tmp_path / "crashed", mid_task, before_folding))


def test_dualprompt_prompt_param_changes_its_run_folds_every_task_and_resumes_exactly(tmp_path):
    changes = {"train.epochs": 2}
    raw = run_fixture(tiny_config("dualprompt", **changes), tmp_path / "raw"), final_method_state(tmp_path / "raw")
    config = tiny_config("dualprompt", prompt_param="mlp", **changes)
    mlp = run_fixture(config, tmp_path / "mlp"), final_method_state(tmp_path / "mlp")
    raw_e = [raw[1]["prompts"][f"e.slots.{slot}"] for slot in range(3)]
    mlp_e = [mlp[1]["prompts"][f"e.slots.{slot}"] for slot in range(3)]
    assert all((a - b).abs().max() > 0.1 for a, b in zip(raw_e, mlp_e))  # U(-1, 1) raw vs ~0.1-scale produced
    # every slot folded; the last task's slot and the G-prompt are what their networks (kept for sequential
    # init) produce
    prompts = mlp[1]["prompts"]
    assert torch.equal(prompts["e.bound"], torch.tensor([-1])) and torch.equal(prompts["g.bound"], torch.tensor([-1]))
    network = PrefixMLP(1, 2, 2, 16)
    network.load_state_dict({key.removeprefix("e.networks.0."): value for key, value in prompts.items()
                             if key.startswith("e.networks.0.")})
    with torch.no_grad():
        assert torch.equal(network(), mlp_e[2])
    assert_same_runs(mlp, crash_and_resume(config, tmp_path / "crashed", Position(1, 0, 1)))
