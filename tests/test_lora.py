"""InfLoRA and SD-LoRA against hand-computed cases and slow, obvious references (LORA_SPEC §7's oracles): the deltas
through the host, DualGPM, the designed down-projections, the magnitudes, the gradients of each phase, resume."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import Crash, crash_at, make_engine, run_fixture, tiny_config

from norga.data.splits import class_order
from norga.data.transforms import build_transforms
from norga.engine.loop import Position
from norga.engine.run_dir import RunDirectory
from norga.methods.lora.banks import InfLoRABank, SDLoRABank
from norga.methods.lora.dualgpm import (
    Subspace,
    designed_down,
    energy_threshold,
    first_subspace,
    flipped,
    updated_subspace,
)
from norga.methods.lora.moments import SecondMoments
from norga.nn import PromptedViT
from norga.nn.attachments import OutputHook

DIM, DEPTH = 16, 2


def host() -> PromptedViT:
    torch.manual_seed(0)
    return PromptedViT.from_timm("vit_tiny_patch16_224", num_classes=4, timm_kwargs=dict(
        img_size=16, patch_size=8, depth=DEPTH, embed_dim=DIM, num_heads=2)).eval()


def random_sdlora(tasks: int = 3, rank: int = 3, norm_product: bool = False) -> SDLoRABank:
    bank = SDLoRABank(tasks, DEPTH, DIM, rank, 0.8, torch.Generator().manual_seed(1), norm_product=norm_product)
    with torch.no_grad():
        for task in range(tasks):
            bank.up[task].normal_()
            bank.magnitudes[task].fill_(0.5 + task)
    return bank


def block_input(model: PromptedViT, images: torch.Tensor, block: int) -> torch.Tensor:
    """The input of block `block`'s ``attn.qkv`` on `images` (the frozen model)."""
    seen = []
    model.forward_features(images, {block: OutputHook("attn.qkv", lambda x, y: seen.append(x) or y)})
    return seen[0]


# ------------------------------------------------------------------------------------ plumbing, both banks
def test_zero_up_projections_leave_the_frozen_model_exactly():
    model, images = host(), torch.randn(3, 3, 16, 16)
    # the deltas reach the last block, which then runs timm's full forward; the frozen pass runs it too, so that the
    # two compare bit for bit (alone it computes the pooled row only: the same features to rounding, not to the bit)
    model._last_block_row_only = False
    frozen = model.forward_features(images)
    inflora, sdlora = InfLoRABank(3, DEPTH, DIM, 2), SDLoRABank(3, DEPTH, DIM, 2, 0.8)
    with torch.no_grad():
        inflora.down.normal_()
    for upto in range(3):
        assert torch.equal(model.forward_features(images, inflora.attachments(upto)), frozen)
    assert torch.equal(model.forward_features(images, sdlora.attachments(0)), frozen)


def test_a_delta_through_the_host_is_x_times_w_plus_ba_by_hand():
    model, images = host(), torch.randn(2, 3, 16, 16)
    block = model.backbone.blocks[1]
    x = block_input(model, images, 1)
    weight, bias = block.attn.qkv.weight, block.attn.qkv.bias
    inflora = InfLoRABank(3, DEPTH, DIM, 2)
    with torch.no_grad():
        inflora.down.normal_()
        for up in inflora.up:
            up.normal_()
    sdlora = random_sdlora()
    cases = {  # bank attachments -> the rows' hand-made ΔW (3d × d): Σ_i B_i A_i on k, v (InfLoRA)
        "inflora": (inflora.attachments(1)[1], torch.cat([torch.zeros(DIM, DIM), sum(
            inflora.up[i][1] @ inflora.down[i, 1] for i in range(2))])),
    }
    old = [sdlora.magnitudes[i] * (sdlora.up[i][t, 1] @ sdlora.down[i][t, 1])
           / torch.linalg.matrix_norm(sdlora.up[i][t, 1] @ sdlora.down[i][t, 1]) for i in range(2) for t in (0, 1)]
    current = [sdlora.magnitudes[2] * sdlora.up[2][t, 1] @ sdlora.down[2][t, 1] for t in (0, 1)]
    q, v = old[0] + old[2] + current[0], old[1] + old[3] + current[1]  # Σ_{i<t} m_i B_iA_i/‖B_iA_i‖ + m_t B_tA_t
    cases["sdlora"] = (sdlora.attachments(2)[1], torch.cat([q, torch.zeros(DIM, DIM), v]))
    for name, (attachments, delta) in cases.items():
        attachments = attachments if isinstance(attachments, list) else [attachments]
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for attachment in attachments:
                stack.enter_context(attachment.bind(block, 1))
            hooked = block.attn.qkv(x)
        by_hand = F.linear(x, weight + delta.detach(), bias)
        assert torch.allclose(hooked, by_hand, atol=1e-5, rtol=1e-5), name
        untouched = (delta.abs().sum(1) == 0)  # rows no target covers: exactly the frozen output
        assert torch.equal(hooked[..., untouched], F.linear(x, weight, bias)[..., untouched]), name


def test_the_backbone_state_dict_is_timms_after_deltas_were_attached():
    model = host()
    before = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    bank = random_sdlora()
    model.forward_features(torch.randn(2, 3, 16, 16), bank.attachments(2))
    after = model.backbone.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert not model.backbone.blocks[0].attn.qkv._forward_hooks


# --------------------------------------------------------------------------------------- DualGPM, by hand
def diag(*values: float, d: int = 8) -> torch.Tensor:
    return torch.diag(torch.tensor(list(values) + [0.0] * (d - len(values)), dtype=torch.float64))


def same_span(basis: torch.Tensor, *axes: int) -> bool:
    expected = torch.eye(basis.shape[0], dtype=torch.float64)[:, list(axes)]
    return basis.shape[1] == len(axes) and torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-12)


def test_dualgpm_on_the_hand_made_case():
    first = first_subspace(diag(4, 3), 0.95)  # energies 16, 9: shares 0.64, 1.0 -> r = 1 (64 % < ε is kept)
    assert first.kind == "remove" and same_span(first.basis, 0)
    second = updated_subspace(first, diag(0, 3), 0.955)  # nothing captured yet: one direction added
    assert second.kind == "remove" and same_span(second.basis, 0, 1)
    down = designed_down(diag(5, 2, 1), first, 2)
    assert torch.allclose(down.abs(), torch.eye(8, dtype=torch.float64)[1:3] / math.sqrt(3), atol=1e-12)
    assert torch.allclose(down @ first.projector(), torch.zeros(2, 8, dtype=torch.float64), atol=1e-12)


def test_a_first_task_past_half_the_width_stores_the_complement_or_the_official_basis_and_stops():
    moment = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))  # shares 0.64, 0.93, 1: r = 2 >= 1.5
    correct = first_subspace(moment, 0.95)
    assert correct.kind == "retain" and same_span(correct.basis, 2)
    with pytest.raises(ValueError, match="official_retain_basis=false"):
        first_subspace(moment, 0.95, official_retain_basis=True)


def test_a_remove_basis_past_half_the_width_flips_to_its_complement_and_retain_updates_shrink_it():
    wide = flipped(Subspace(torch.eye(4, dtype=torch.float64)[:, :3], "remove"))
    assert wide.kind == "retain" and same_span(wide.basis, 3)
    free = Subspace(torch.eye(8, dtype=torch.float64)[:, 4:7], "retain")  # e5, e6, e7 free
    shrunk = updated_subspace(free, diag(0, 0, 0, 0, 0, 9), 0.95)  # the new task fills e6: e5, e7 stay free
    assert shrunk.kind == "retain" and same_span(shrunk.basis, 4, 6)


def test_the_threshold_schedule():
    assert [round(energy_threshold(0.95, 1.0, t, 10), 6) for t in (0, 1, 9)] == [0.95, 0.955, 0.995]
    assert round(energy_threshold(0.98, 1.0, 19, 20), 6) == 0.999


def random_moment(d: int = DIM, rows: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, d, dtype=torch.float64)
    return x.T @ x / rows


@pytest.mark.parametrize("kind", ["remove", "retain"])
def test_the_designed_down_projection_is_orthogonal_to_the_protected_subspace(kind):
    protected = torch.linalg.qr(torch.randn(DIM, 5, dtype=torch.float64))[0]
    stored = protected if kind == "remove" else torch.linalg.qr(
        (torch.eye(DIM, dtype=torch.float64) - protected @ protected.T) @ torch.randn(DIM, DIM - 5, dtype=torch.float64)
    )[0][:, : DIM - 5]
    down = designed_down(random_moment(), Subspace(stored, kind), 4)
    assert torch.allclose(down @ down.T, torch.eye(4, dtype=torch.float64) / 3, atol=1e-12)
    assert (down @ protected).abs().max() < 1e-12


def test_second_moments_are_the_one_shot_mean_over_every_token():
    model, images = host(), torch.randn(5, 3, 16, 16)
    moments = SecondMoments(DEPTH, DIM)
    for part in images.split(2):  # batches of 2, 2, 1
        model.forward_features(part, moments.hooks())
    x = block_input(model, images, 1).reshape(-1, DIM).double()
    assert torch.allclose(moments.means()[1], x.T @ x / len(x), atol=1e-12)


# ------------------------------------------------------------------------------------------ SD-LoRA parts
def test_sdlora_normalisation_by_hand():
    bank = SDLoRABank(2, 1, 2, 1, 0.8)
    with torch.no_grad():
        bank.down[0].copy_(torch.tensor([[1.0, 0.0]]).expand(2, 1, 1, 2))
        bank.up[0].copy_(torch.tensor([[2.0], [0.0]]).expand(2, 1, 2, 1))
        bank.magnitudes[0].fill_(1.0)
    direction = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(bank.delta_weight(0, 0, 1), direction)  # ‖BA‖ = 2 = ‖B‖·‖A‖ at rank 1
    for norm_product in (False, True):
        ranked = random_sdlora(rank=3, norm_product=norm_product)
        with torch.no_grad():
            ranked.magnitudes[0].fill_(1.0)
            ranked.up[1].zero_()
        norm = torch.linalg.matrix_norm(ranked.delta_weight(0, 0, 1))
        assert torch.isclose(norm, torch.tensor(1.0)) if not norm_product else norm < 1


def test_a_finished_task_keeps_its_function_where_one_magnitude_can_and_the_closest_one_elsewhere():
    bank = random_sdlora()
    with torch.no_grad():  # equal norms everywhere: scale each block and target's B to ‖BA‖ = 2
        for target in range(2):
            for block in range(DEPTH):
                bank.up[0][target, block] *= 2 / bank.direction_norm(0, target, block)
        bank.up[1].zero_()
    before = [bank.delta_weight(t, b, 0) for t in range(2) for b in range(DEPTH)]
    bank.finish_task(0)
    after = [bank.delta_weight(t, b, 1) for t in range(2) for b in range(DEPTH)]
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(before, after))
    uneven = random_sdlora()
    m = float(uneven.magnitudes[0].detach())
    raw = [uneven.up[0][t, b] @ uneven.down[0][t, b] for t in range(2) for b in range(DEPTH)]
    uneven.finish_task(0)
    m_new = torch.tensor(float(uneven.magnitudes[0].detach()), dtype=torch.float64, requires_grad=True)
    directions = [(r / torch.linalg.matrix_norm(r)).double().detach() for r in raw]
    loss = sum(((m * r.double().detach()) - m_new * d).pow(2).sum() for r, d in zip(raw, directions))
    (gradient,) = torch.autograd.grad(loss, m_new)  # m' minimises the weight-space distance
    assert abs(float(gradient)) < 1e-4 * float(loss)


def test_the_official_reset_puts_every_magnitude_back():
    bank = random_sdlora()
    bank.reset_magnitudes(2, 0.8)
    assert [float(m) for m in bank.magnitudes] == pytest.approx([0.8] * 3)


def test_class_orders_and_unnormalised_input():  # LORA_SPEC §7 oracle 15
    assert class_order(200, 1993, rule="numpy")[:8] == [168, 136, 51, 9, 183, 101, 171, 99]
    assert class_order(100, 1994, rule="numpy")[:8] == [72, 6, 33, 96, 60, 94, 29, 40]
    assert class_order(200, 1995, rule="numpy")[:8] == [146, 198, 169, 126, 142, 183, 108, 86]
    assert class_order(10, 3, rule="none") == list(range(10))
    _, unnormalised = build_transforms(16, (0.5,) * 3, (0.5,) * 3, "none")
    _, normalised = build_transforms(16, (0.5,) * 3, (0.5,) * 3, "backbone")
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(unnormalised(image), normalised(image) * 0.5 + 0.5, atol=1e-6)  # the mean/std left out


# ---------------------------------------------------------------------------------- the methods in a run
def run_phases(method, task: int, until: str | None = None) -> None:
    for phase in method.phases(task):
        if phase.name == until:
            return
        method.run_phase(task, phase, 0, lambda epoch, logs: None)


def trained_tensors(method) -> set[str]:
    named = {f"model.{n}": p for n, p in method.model.named_parameters()}
    named |= {f"lora.{n}": p for n, p in method.bank.named_parameters()}
    named |= {f"heads.{n}": p for n, p in method.heads.named_parameters()}
    return {name for name, param in named.items() if param.grad is not None}


def one_backward(method, task: int) -> set[str]:
    method.bank.zero_grad(set_to_none=True)
    method.heads.zero_grad(set_to_none=True)
    batch = next(iter(method.ctx.train_loader(task, 0, 4)))
    method.bank.train_only(task)
    method.heads.train_only(task)
    logits = method.logits(batch.images, task, range(task, task + 1))
    F.cross_entropy(logits, batch.labels).backward()
    return trained_tensors(method)


def test_inflora_trains_only_the_tasks_up_projection_and_head_and_old_inputs_keep_their_outputs(tmp_path):
    method = make_engine(tiny_config("inflora"), tmp_path / "run").method
    run_phases(method, 0)
    run_phases(method, 1, until="train_up")
    assert one_backward(method, 1) == {"lora.up.1", "heads.heads.1.weight", "heads.heads.1.bias"}
    subspace = method.subspaces[0]
    assert subspace.kind == "remove"
    assert (method.bank.down[1, 0].double() @ subspace.basis).abs().max() < 1e-6
    x = (torch.randn(3, 5, subspace.basis.shape[1], dtype=torch.float64) @ subspace.basis.T).float()
    qkv = method.model.backbone.blocks[0].attn.qkv

    def outputs():
        delta = method.bank.attachments(1)[0]
        with torch.no_grad(), delta.bind(method.model.backbone.blocks[0], 0):
            return qkv(x)

    before, up_before = outputs(), method.bank.up[1].detach().clone()
    method.run_phase(1, method.phases(1)[1], 0, lambda epoch, logs: None)  # train_up of task 1
    assert not torch.equal(method.bank.up[1], up_before)
    assert torch.allclose(outputs(), before, atol=1e-5)


def test_sdlora_trains_the_new_pair_every_magnitude_so_far_and_the_head_and_old_directions_stay(tmp_path):
    method = make_engine(tiny_config("sdlora"), tmp_path / "run").method
    run_phases(method, 0)
    assert one_backward(method, 1) == {"lora.down.1", "lora.up.1", "lora.magnitudes.0", "lora.magnitudes.1",
                                       "heads.heads.1.weight", "heads.heads.1.bias"}
    old = [tensor.detach().clone() for tensor in (method.bank.down[0], method.bank.up[0], method.heads.heads[0].weight)]
    run_phases(method, 1)
    assert all(torch.equal(now, then) for now, then in zip(
        (method.bank.down[0], method.bank.up[0], method.heads.heads[0].weight), old))
    assert type(method.optimizer).__name__ == "Adam"  # the configured optimizer, with its weight decay
    assert method.optimizer.defaults["weight_decay"] == method.settings.train.weight_decay > 0


def test_sdlora_official_sgd_ignores_the_configured_optimizer(tmp_path):
    config = tiny_config("sdlora", official_sgd=True, **{"train.weight_decay": 0.1})
    method = make_engine(config, tmp_path / "run").method
    run_phases(method, 0)
    assert type(method.optimizer).__name__ == "SGD"
    assert method.optimizer.defaults["momentum"] == 0.9 and method.optimizer.defaults["weight_decay"] == 0.0


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Each method's uninterrupted tiny run, once for the module."""
    runs = {}

    def run(method: str):
        if method not in runs:
            runs[method] = tmp_path_factory.mktemp(f"straight_{method}")
            run_fixture(tiny_config(method), runs[method])
        return runs[method]

    return run


@pytest.mark.parametrize("method,position", [
    ("inflora", Position(1, 1, 1)),  # mid-task: after an epoch of train_up, the designed A kept
    ("inflora", Position(1, 0, 0)),  # between tasks
    ("sdlora", Position(1, 0, 1)),  # mid-task: the magnitudes resume as they were
    ("sdlora", Position(1, 0, 0)),
])
def test_a_run_killed_mid_task_or_between_tasks_resumes_to_the_same_bits(tmp_path, straight_runs, method, position):
    config = tiny_config(method)
    straight = straight_runs(method)
    with pytest.raises(Crash):
        run_fixture(config, tmp_path / "crashed", after_epoch=crash_at(position))
    state, _ = RunDirectory(tmp_path / "crashed", create=False).load_state()
    assert Position(**state["position"]) == position
    run_fixture(config, tmp_path / "crashed", resume=True)
    final = [torch.load(run / "checkpoints" / "task3.pt", weights_only=True) for run in (straight, tmp_path / "crashed")]
    for section in ("lora", "heads"):
        for key, tensor in final[0]["method"][section].items():
            assert torch.equal(tensor, final[1]["method"][section][key]), (section, key)


@pytest.mark.parametrize("preset, method, benchmark, tasks, seed, backbone, order", [
    ("cifar100_in21k_inflora", "inflora", "cifar100", 10, 0, "vit_base_patch16_224.augreg_in21k", "none"),
    ("imr5_in21k_inflora", "inflora", "imagenet-r", 5, 0, "vit_base_patch16_224.augreg_in21k", "none"),
    ("imr10_in21k_inflora", "inflora", "imagenet-r", 10, 0, "vit_base_patch16_224.augreg_in21k", "none"),
    ("imr20_in21k_inflora", "inflora", "imagenet-r", 20, 0, "vit_base_patch16_224.augreg_in21k", "none"),
    ("cifar100_augreg2_sdlora", "sdlora", "cifar100", 10, 1993, "vit_base_patch16_224.augreg2_in21k_ft_in1k", "numpy"),
    ("imr5_augreg2_sdlora", "sdlora", "imagenet-r", 5, 1995, "vit_base_patch16_224.augreg2_in21k_ft_in1k", "numpy"),
    ("imr10_augreg2_sdlora", "sdlora", "imagenet-r", 10, 1995, "vit_base_patch16_224.augreg2_in21k_ft_in1k", "numpy"),
    ("imr20_augreg2_sdlora", "sdlora", "imagenet-r", 20, 1995, "vit_base_patch16_224.augreg2_in21k_ft_in1k", "numpy"),
    ("ina_augreg2_sdlora", "sdlora", "imagefolder", 10, 1993, "vit_base_patch16_224.augreg2_in21k_ft_in1k", "numpy"),
])
def test_presets_of_the_official_configurations(preset, method, benchmark, tasks, seed, backbone, order):
    """LORA_SPEC §2.9 (InfLoRA's configs) and §3.8 (SD-LoRA's), unnormalised input, the correct defaults on."""
    from norga.config_io import load_config

    config = load_config(preset)
    assert (config.method, config.data.benchmark, config.data.num_tasks, config.seed, config.backbone.name) == (
        method, benchmark, tasks, seed, backbone)
    assert (config.data.normalization, config.data.class_order, config.settings.rank) == ("none", order, 10)
    s = config.settings
    if method == "inflora":
        epochs, threshold = (20, 0.95) if benchmark == "cifar100" else (50, 0.98)
        assert (s.train.epochs, s.train.lr, s.train.optimizer, s.train.schedule, s.threshold_first) == (
            epochs, 5e-4, "adam", "coda_cosine", threshold)
        assert not s.official_retain_basis
    else:
        assert (s.train.epochs, s.train.batch_size, s.init_magnitude) == (20, 128, 0.8)
        assert not (s.official_sgd or s.official_magnitude_reset or s.official_norm_product)


def test_trainable_counts_match_the_official_logs_and_the_cosine_schedule_its_end():
    """LORA_SPEC §6: InfLoRA trains 184,320 + 7,690 = 192,010 numbers a CIFAR task (its log), SD-LoRA 368,640 + the
    magnitudes so far; §7 oracle 10: the CODA cosine schedule ends at lr0·0.015707."""
    from norga.methods.lora.heads import TaskHeads
    from norga.runtime.optim import schedule_factor

    heads = TaskHeads(768, [list(range(10 * t, 10 * t + 10)) for t in range(10)], 100)
    inflora = InfLoRABank(10, 12, 768, 10).train_only(3) + heads.train_only(3)
    assert sum(p.numel() for p in inflora) == 192_010
    sdlora = SDLoRABank(10, 12, 768, 10, 0.8).train_only(3)
    assert sum(p.numel() for p in sdlora) == 368_640 + 4
    assert schedule_factor("coda_cosine", 0, 20, 5e-4) == 1.0
    assert schedule_factor("coda_cosine", 19, 20, 5e-4) == pytest.approx(0.015707, abs=1e-6)


def test_a_magnitudes_gradient_is_the_sum_over_blocks_and_targets_of_its_directions_inner_products():
    """LORA_SPEC §7 oracle 14, through the factored deltas the host runs: ∂L/∂m_0 = Σ_l ⟨∂L/∂ΔW_l, D_l⟩."""
    from norga.methods.lora.banks import low_rank_delta

    bank = random_sdlora()
    x = torch.randn(2, 5, DIM)
    loss, expected = 0.0, 0.0
    for target in range(2):
        for block in range(DEPTH):
            g = torch.randn(2, 5, DIM)
            loss = loss + (low_rank_delta(*bank.block_weights(target, block, 1))(x) * g).sum()
            raw = (bank.up[0][target, block] @ bank.down[0][target, block]).detach()
            expected = expected + (torch.einsum("bno,bni->oi", g, x) * raw / torch.linalg.matrix_norm(raw)).sum()
    (gradient,) = torch.autograd.grad(loss, bank.magnitudes[0])
    assert torch.allclose(gradient, expected, rtol=1e-4, atol=1e-4)
