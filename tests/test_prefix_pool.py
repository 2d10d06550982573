"""PrefixPool: slot gathering in both layouts, sequential init and the momentum blend."""

import pytest
import torch

from norga.nn import PrefixPool

LAYERS, SLOTS, LP, H, D = 3, 4, 2, 3, 5


def make_pool():
    return PrefixPool(LAYERS, SLOTS, LP, H, D)


def test_shape_and_uniform_init():
    pool = make_pool()
    assert pool.prompts.shape == (LAYERS, 2, SLOTS, LP, H, D)
    assert pool.prompts.min() >= -1 and pool.prompts.max() <= 1 and pool.prompts.std() > 0.4


def test_correct_layout_uses_each_samples_own_slot():
    pool = make_pool()
    slots = torch.randint(0, SLOTS, (7,))
    prefixes = pool.gather(slots, "correct")
    assert len(prefixes) == LAYERS
    for layer, (keys, values) in enumerate(prefixes):
        assert keys.shape == values.shape == (7, H, LP, D)
        for b, slot in enumerate(slots.tolist()):
            assert torch.equal(keys[b], pool.prompts[layer, 0, slot].transpose(0, 1))
            assert torch.equal(values[b], pool.prompts[layer, 1, slot].transpose(0, 1))


def official_reshape_by_hand(prompts, slots):
    """The official `prompt[:, :, idx].reshape(L, B, 2, Lp, H, d)` re-done with explicit flat indices."""
    layers, batch = prompts.shape[0], len(slots)
    gathered = [[[prompts[l, kv, s] for s in slots] for kv in range(2)] for l in range(layers)]  # [l][kv][b]
    per_layer = []
    for l in range(layers):
        flat = [gathered[l][kv][b] for kv in range(2) for b in range(batch)]  # memory order (kv, b)
        # reading the same memory as (b, kv): element (b, kv) is flat item 2*b + kv
        keys = torch.stack([flat[2 * b] for b in range(batch)])
        values = torch.stack([flat[2 * b + 1] for b in range(batch)])
        per_layer.append((keys.transpose(1, 2), values.transpose(1, 2)))
    return per_layer


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_official_layout_equals_explicit_reshape(batch):
    pool = make_pool()
    slots = torch.randint(0, SLOTS, (batch,))
    for (keys, values), (want_k, want_v) in zip(pool.gather(slots, "official"), official_reshape_by_hand(pool.prompts, slots.tolist())):
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)


def test_official_layout_mixes_halves_as_documented():
    """NORGA_SPEC §1.6 for even B: b < B/2 -> K = key half of slot(2b), V = key half of slot(2b+1);
    b >= B/2 -> K = value half of slot(2b-B), V = value half of slot(2b-B+1)."""
    pool = make_pool()
    batch = 6
    slots = torch.randperm(SLOTS).repeat(2)[:batch]
    prefixes = pool.gather(slots, "official")
    for layer, (keys, values) in enumerate(prefixes):
        for b in range(batch):
            half, first = (0, 2 * b) if b < batch // 2 else (1, 2 * b - batch)
            assert torch.equal(keys[b], pool.prompts[layer, half, slots[first]].transpose(0, 1))
            assert torch.equal(values[b], pool.prompts[layer, half, slots[first + 1]].transpose(0, 1))


def test_int_slot_broadcasts_and_matches_tensor_slots():
    pool = make_pool()
    for layout in ("correct", "official"):
        by_int = pool.gather(2, layout, batch_size=4)
        by_tensor = pool.gather(torch.full((4,), 2), layout)
        for (k1, v1), (k2, v2) in zip(by_int, by_tensor):
            assert torch.equal(k1.expand_as(k2), k2) and torch.equal(v1.expand_as(v2), v2)
    assert pool.gather(2, "correct")[0][0].shape[0] == 1


def test_bad_slots_and_layout():
    pool = make_pool()
    with pytest.raises(IndexError, match=r"prompt slots must be in \[0, 4\)"):
        pool.gather(torch.tensor([0, 4]))
    with pytest.raises(IndexError, match=r"prompt slots must be in \[0, 4\)"):
        pool.gather(-1)
    with pytest.raises(ValueError, match="unknown prefix layout 'shuffled'"):
        pool.gather(torch.tensor([0]), "shuffled")


def test_copy_slot():
    pool = make_pool()
    before = pool.prompts.detach().clone()
    pool.copy_slot(1, 2)
    assert torch.equal(pool.prompts[:, :, 2], before[:, :, 1])
    assert torch.equal(pool.prompts[:, :, [0, 1, 3]], before[:, :, [0, 1, 3]])


def test_momentum_blend_formula_gradient_and_commit():
    pool = make_pool()
    m = torch.rand(()).item()
    before = pool.prompts.detach().clone()
    blended = pool.blended(2, m)
    expected = (1 - m) * before[:, :, 2] + m * (before[:, :, 0] + before[:, :, 1]) / 2
    torch.testing.assert_close(blended, expected)
    blended.sum().backward()
    torch.testing.assert_close(pool.slots[2].grad, torch.full_like(expected, 1 - m))
    assert all(pool.slots[i].grad is None for i in (0, 1, 3))
    pool.commit_blend(2, m)
    torch.testing.assert_close(pool.prompts[:, :, 2], expected)
    assert torch.equal(pool.prompts[:, :, [0, 1, 3]], before[:, :, [0, 1, 3]])


def test_momentum_gather_matches_blend_and_needs_an_int_slot():
    pool = make_pool()
    keys, values = pool.gather(1, "correct", momentum=0.25)[0]
    blended = pool.blended(1, 0.25)
    assert torch.equal(keys[0], blended[0, 0].transpose(0, 1)) and torch.equal(values[0], blended[0, 1].transpose(0, 1))
    with pytest.raises(ValueError, match="pass slots as an int"):
        pool.gather(torch.tensor([1, 1]), momentum=0.25)


def test_momentum_is_a_no_op_for_slot_zero_or_zero_momentum():
    pool = make_pool()
    assert pool.blended(0, 0.5) is pool.slots[0]
    assert pool.blended(3, 0.0) is pool.slots[3]


def test_trainable_slot_and_load_prompts():
    pool = make_pool()
    pool.set_trainable_slot(2)
    assert [p.requires_grad for p in pool.slots] == [False, False, True, False]
    pool.set_trainable_slot(None)
    assert not any(p.requires_grad for p in pool.slots)
    official = torch.randn(LAYERS, 2, SLOTS, LP, H, D)
    pool.load_prompts(official)
    assert torch.equal(pool.prompts, official)
    with pytest.raises(ValueError, match="prompts must be shaped"):
        pool.load_prompts(official[:, :, :2])
