"""The prompt host (PromptedViT) with HiDe/NoRGa's TaskPrompts on several timm ViTs: equality with timm, batch
invariance, layouts, what trains, scoped prompt binding."""

from contextlib import ExitStack

import pytest
import timm
import torch
from prompted_fixture import Prompted
from torch.nn.functional import cross_entropy

from norga.nn import PrefixAttention, PromptedViT, TaskPrompts

SMALL_VITS = {
    "vit_tiny_32px": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3)),
    "vit_small_48px": ("vit_small_patch16_224", dict(img_size=48, patch_size=16, depth=2, embed_dim=96, num_heads=4)),
    "deit_tiny": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=16, depth=2)),
    "vit_base_qknorm": ("vit_base_patch16_224", dict(img_size=32, patch_size=16, depth=2, embed_dim=64, num_heads=4, qk_norm=True)),
}
NUM_CLASSES = 6


def build(key, num_slots=3, prompt_length=4, prompt_layers=(0, 1), gate="tanh", prefix_layout="correct", **host):
    name, timm_kwargs = SMALL_VITS[key]
    backbone = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **timm_kwargs).eval()
    model = PromptedViT(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **timm_kwargs), **host)
    prompts = TaskPrompts(model, num_slots, prompt_length, prompt_layers, gate=gate, prefix_layout=prefix_layout)
    return backbone, Prompted(model, prompts).eval()


def images(key, batch):
    size = SMALL_VITS[key][1]["img_size"]
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("key", sorted(SMALL_VITS))
def test_unprompted_forward_equals_timm(key):
    timm_model, model = build(key)
    model.host.backbone.load_state_dict(timm_model.state_dict())
    x = images(key, 3)
    with torch.no_grad():
        out = model(x)
        assert (out.logits - timm_model(x)).abs().max() <= 1e-5
        assert (out.features - timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)).abs().max() <= 1e-5
    prompted = [isinstance(block.attn, PrefixAttention) for block in model.host.backbone.blocks]
    assert prompted == [index in (0, 1) for index in range(len(prompted))]


@pytest.mark.parametrize("key", sorted(SMALL_VITS))
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_correct_layout_is_batch_invariant(key, impl):
    _, model = build(key, attention_impl=impl)
    x = images(key, 5)
    slots = torch.tensor([0, 2, 1, 2, 0])
    with torch.no_grad():
        together = model(x, slots).logits
        alone = torch.cat([model(x[b : b + 1], slots[b : b + 1]).logits for b in range(5)])
        shuffled = torch.randperm(5)
        reordered = model(x[shuffled], slots[shuffled]).logits
    assert (together - alone).abs().max() <= 1e-5
    assert (reordered - together[shuffled]).abs().max() <= 1e-5


def run_with_prefixes(model, x, per_layer):
    """Run the backbone with explicitly given per-layer prefixes (bypassing the pool)."""
    backbone = model.host.backbone
    attentions = [backbone.blocks[i].attn for i in model.prompts.layers]
    with ExitStack() as stack:
        for attention, gate, (keys, values) in zip(attentions, model.prompts.gates, per_layer):
            stack.enter_context(attention.bound(keys, values, gate))
        return model.host.classify(backbone.forward_head(backbone.forward_features(x), pre_logits=True))


def test_official_layout_equals_explicit_reshape_and_leaks_across_samples():
    from test_prefix_pool import official_reshape_by_hand

    _, model = build("vit_tiny_32px", prefix_layout="official")
    x = images("vit_tiny_32px", 6)
    slots = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        official = model(x, slots).logits
        by_hand = run_with_prefixes(model, x, official_reshape_by_hand(model.prompts.pool.prompts, slots.tolist()))
        assert (official - by_hand).abs().max() <= 1e-5
        # a sample's logits change when only its neighbour's slot changes
        changed = slots.clone()
        changed[1] = 2
        assert (model(x, changed).logits[0] - official[0]).abs().max() > 1e-3


def test_reference_and_fused_models_agree_in_outputs_and_gradients():
    _, model = build("vit_tiny_32px", gate="sigmoid")
    x = images("vit_tiny_32px", 4)
    labels = torch.randint(0, NUM_CLASSES, (4,))
    results = {}
    for impl in ("reference", "fused"):
        model.host.attention_impl = impl
        model.zero_grad()
        out = model(x, 1)
        cross_entropy(out.logits, labels).backward()
        results[impl] = (out.logits.detach(), [p.grad.clone() for p in (
            model.prompts.pool.slots[1], *model.prompts.gates.parameters(), *model.host.backbone.head.parameters())])
    (ref_logits, ref_grads), (fused_logits, fused_grads) = results["reference"], results["fused"]
    assert (ref_logits - fused_logits).abs().max() <= 1e-5
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in ref_grads[:3])  # gradient really reaches the used slot


def test_only_the_trained_slot_gates_and_head_train():
    _, model = build("vit_tiny_32px")
    model.train()
    host, prompts = model.host, model.prompts
    frozen = {k: v.clone() for k, v in host.backbone.state_dict().items() if not k.startswith("head.")}
    assert {n for n, p in host.named_parameters() if p.requires_grad} == {"backbone.head.weight", "backbone.head.bias"}
    trained = prompts.train_slot(0, "first")
    assert {n for n, p in prompts.named_parameters() if p.requires_grad} == {
        "pool.slots.0", "gates.0.alpha", "gates.0.tau", "gates.1.alpha", "gates.1.tau"}
    assert len(trained) == 5 and len(host.head_parameters()) == 2
    assert {n for n, p in prompts.named_parameters() if n.startswith("gates") and p.requires_grad} == {
        "gates.0.alpha", "gates.0.tau", "gates.1.alpha", "gates.1.tau"}  # official: gates train on task 0 ...
    assert [n for n, _ in prompts.named_parameters() if _.requires_grad] and not any(
        p.requires_grad for p in prompts.train_slot(1, "first") if p.dim() == 0)  # ... only
    prompts.train_slot(0, "first")
    # weight decay on every parameter given to the optimizer: frozen slots must still not move
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    prompts_before = prompts.pool.prompts.detach().clone()
    x = images("vit_tiny_32px", 4)
    cross_entropy(model(x, 0, momentum=0.0).logits, torch.randint(0, NUM_CLASSES, (4,))).backward()
    optimizer.step()
    after = host.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert not torch.equal(prompts.pool.prompts[:, :, 0], prompts_before[:, :, 0])
    assert torch.equal(prompts.pool.prompts[:, :, 1:], prompts_before[:, :, 1:])  # other slots untouched


def test_alpha_zero_norga_equals_hide_prompt():
    _, norga = build("vit_tiny_32px", gate="gelu")
    _, hide = build("vit_tiny_32px", gate="none")
    hide.load_state_dict({k: v for k, v in norga.state_dict().items() if "gates" not in k})
    for gate in norga.prompts.gates:
        torch.nn.init.zeros_(gate.alpha)
    x = images("vit_tiny_32px", 3)
    slots = torch.tensor([2, 0, 1])
    with torch.no_grad():
        assert (norga(x, slots).logits - hide(x, slots).logits).abs().max() <= 1e-5
        assert (norga(x, slots).logits - norga(x).logits).abs().max() > 1e-4  # prompts do act


def test_momentum_forward_uses_the_blended_slot():
    _, model = build("vit_tiny_32px")
    x = images("vit_tiny_32px", 2)
    with torch.no_grad():
        blended = model(x, 2, momentum=0.3).logits
        model.prompts.pool.commit_blend(2, 0.3)
        committed = model(x, 2).logits
    assert (blended - committed).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="pass slots as an int"):
        model(x, torch.tensor([2, 2]), momentum=0.3)


def test_gate_schedule_and_attention_switch():
    _, model = build("vit_tiny_32px")
    model.prompts.train_slot(1, "first")
    assert not any(p.requires_grad for p in model.prompts.gates.parameters())
    model.host.attention_impl = "reference"
    assert all(model.host.backbone.blocks[i].attn.impl == "reference" for i in model.prompts.layers)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        model.host.attention_impl = "flash"


def test_bad_configuration_errors():
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    host = PromptedViT(backbone)
    with pytest.raises(ValueError, match=r"prompt layers must be block indices in \[0, 2\)"):
        TaskPrompts(host, 2, 3, (0, 5))
    with pytest.raises(ValueError, match="unknown prefix layout"):
        TaskPrompts(host, 2, 3, (0,), prefix_layout="mixed")
    with pytest.raises(ValueError, match="unknown gate 'tahn'"):
        TaskPrompts(host, 2, 3, (0,), gate="tahn")
    with pytest.raises(TypeError, match="needs a timm VisionTransformer"):
        PromptedViT(torch.nn.Linear(2, 2))
    prompts = TaskPrompts(host, 2, 3, (0,))
    with pytest.raises(ValueError, match=r"prefix_k must be shaped \(batch, 3, length, 64\)"):
        with host.backbone.blocks[0].attn.bound(torch.zeros(1, 2, 3, 64), torch.zeros(1, 3, 3, 64), prompts.gates[0]):
            pass


def test_from_timm_builds_a_host_that_runs_task_prompts():
    host = PromptedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=dict(img_size=32, patch_size=8, depth=2),
                                 num_classes=4)
    prompts = TaskPrompts(host, num_slots=2, length=3, layers=(0, 1), gate="sigmoid")
    out = host(torch.randn(2, 3, 32, 32), prefixes=prompts.prefixes(torch.tensor([0, 1]), 2))
    assert out.logits.shape == (2, 4) and out.features.shape == (2, 192)


def bound_key(attention):
    """The prefix keys a block's attention would use for its next call (its route, given no queries)."""
    route, _gate = attention._prefix
    return route(None)[0]


def test_prompt_binding_is_scoped_and_reentrant():
    """A prefix binding lasts for one call (also when it raises) and a nested binding restores the outer one."""
    timm_model, model = build("vit_tiny_32px")
    model.host.backbone.load_state_dict(timm_model.state_dict())
    attention = model.host.backbone.blocks[0].attn
    x = images("vit_tiny_32px", 2)
    outer = model.prompts.prefixes(0, 2)[0]
    inner = model.prompts.prefixes(1, 2)[0]
    with torch.no_grad():
        with attention.bound(*outer):
            with attention.bound(*inner):
                assert bound_key(attention) is inner.key
            assert bound_key(attention) is outer.key  # restored, not cleared
        assert attention._prefix is None
        with pytest.raises(AssertionError, match="Input height"):
            model(x[:, :, :5], 0)  # wrong image size: the forward raises inside the binding
        assert all(getattr(b.attn, "_prefix", None) is None for b in model.host.backbone.blocks)
        assert (model(x).logits - timm_model(x)).abs().max() <= 1e-5  # nothing left bound


# ------------------------------------------------- prompts a method supplies (the baselines)
# ------------------------------------------------- prompts a method supplies (the baselines)
def slow_prompt_tuning(timm_model, x, tokens_at):
    """Prompt tuning spelled out: timm's blocks one by one, tokens concatenated in front before each listed block."""
    h = timm_model.norm_pre(timm_model.patch_drop(timm_model._pos_embed(timm_model.patch_embed(x))))
    for index, block in enumerate(timm_model.blocks):
        if index in tokens_at:
            h = torch.cat([tokens_at[index].expand(len(x), -1, -1), h], dim=1)
        h = block(h)
    h = timm_model.norm(h)[:, sum(t.shape[1] for t in tokens_at.values()):]
    return timm_model.forward_head(h, pre_logits=True)


@pytest.mark.parametrize("key", ["vit_tiny_32px", "vit_base_qknorm"])
def test_prompt_tuning_equals_concatenating_tokens_by_hand(key):
    timm_model, prompted = build(key)
    model = prompted.host
    model.backbone.load_state_dict(timm_model.state_dict())
    dim = timm_model.embed_dim
    x = images(key, 3)
    tokens_at = {0: torch.randn(3, 4, dim), 1: torch.randn(1, 2, dim)}  # per-sample at block 0, shared at block 1
    with torch.no_grad():
        got = model.forward_features(x, prompt_tokens=tokens_at)
        want = slow_prompt_tuning(timm_model, x, tokens_at)
        assert (got - want).abs().max() <= 1e-5
        assert (got - model.forward_features(x)).abs().max() > 1e-4  # the tokens do act
        assert (model.forward_features(x) - timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
                ).abs().max() <= 1e-5  # and the hooks are gone afterwards


def test_explicit_prefixes_equal_the_task_prompts_and_need_prefix_attention():
    from norga.nn import Prefix

    _, model = build("vit_tiny_32px", num_slots=3, prompt_layers=(0, 1), gate="tanh")
    x = images("vit_tiny_32px", 4)
    slots = torch.tensor([2, 0, 1, 2])
    gathered = model.prompts.pool.gather(slots)
    explicit = {layer: Prefix(k, v, gate) for layer, gate, (k, v) in zip(model.prompts.layers, model.prompts.gates, gathered)}
    with torch.no_grad():
        assert (model.host(x, prefixes=explicit).logits - model(x, slots).logits).abs().max() <= 1e-6
    with pytest.raises(TypeError, match="block 2 has no prefix attention: call model.install_prefix_layers\\(\\[2\\]\\)"):
        model.host(x, prefixes={2: Prefix(*gathered[0])})


def test_installing_prefix_attention_elsewhere_changes_nothing_until_used():
    timm_model, model = build("vit_tiny_32px")
    host = model.host
    host.backbone.load_state_dict(timm_model.state_dict())
    host.install_prefix_layers([2])
    assert isinstance(host.backbone.blocks[2].attn, PrefixAttention)
    x = images("vit_tiny_32px", 2)
    with torch.no_grad():
        assert (host(x).logits - timm_model(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="block 3 does not exist in this 3-block backbone"):
        host.install_prefix_layers([3])


def test_the_host_alone_has_no_prompts_and_only_its_head_trains():
    name, timm_kwargs = SMALL_VITS["vit_tiny_32px"]
    timm_model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **timm_kwargs).eval()
    host = PromptedViT(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **timm_kwargs)).eval()
    host.backbone.load_state_dict(timm_model.state_dict())
    assert not any(isinstance(block.attn, PrefixAttention) for block in host.backbone.blocks)
    assert {n for n, p in host.named_parameters() if p.requires_grad} == {"backbone.head.weight", "backbone.head.bias"}
    assert set(host.state_dict()) == {f"backbone.{k}" for k in timm_model.state_dict()}  # no method state
    x = images("vit_tiny_32px", 2)
    with torch.no_grad():
        assert (host(x).logits - timm_model(x)).abs().max() <= 1e-5
