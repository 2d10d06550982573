"""Prompt pools of the baselines: key–query selection, batch-wise vote, token and prefix gathering, CODA."""

import pytest
import torch
import torch.nn.functional as F

from norga.nn import PrefixPool
from norga.nn.coda_pool import CodaPool, gram_schmidt, ortho_penalty
from norga.nn.prompt_keys import PromptKeys, majority_vote
from norga.nn.token_pool import TokenPool


# ------------------------------------------------------------------ key–query selection
def test_selection_picks_the_matching_key_and_pulls_it():
    keys = PromptKeys(pool_size=7, dim=16)
    chosen = torch.tensor([3, 0, 6, 3, 5])
    query = 2.5 * keys.keys.detach()[chosen] + 0.01 * torch.randn(5, 16)  # a scaled, noisy copy of one key
    selection = keys.select(query, top_k=1)
    assert selection.indices[:, 0].tolist() == chosen.tolist()
    by_hand = sum(F.cosine_similarity(query[b], keys.keys[chosen[b]], dim=0) for b in range(5)) / 5
    assert selection.pull.item() == pytest.approx(by_hand.item(), abs=1e-5)
    selection.pull.backward()
    touched = keys.keys.grad.abs().sum(dim=1) > 0
    assert touched.tolist() == [i in chosen.tolist() for i in range(7)]  # only the selected keys are pulled


def test_top_k_is_ordered_by_similarity_and_a_forced_choice_wins():
    keys = PromptKeys(pool_size=6, dim=8)
    query = torch.randn(4, 8)
    similarity = torch.stack([F.cosine_similarity(q.unsqueeze(0), keys.keys, dim=1) for q in query])
    assert (keys.similarity(query) - similarity).abs().max() <= 1e-5
    selection = keys.select(query, top_k=3)
    assert torch.equal(selection.indices, similarity.argsort(dim=1, descending=True)[:, :3])
    forced = keys.select(query, top_k=2, forced=torch.tensor([[4, 5]]))
    assert forced.indices.tolist() == [[4, 5]] * 4
    assert forced.pull.item() == pytest.approx(similarity[:, 4:6].sum().item() / 4, abs=1e-5)
    with pytest.raises(ValueError, match="top_k must be in \\[1, 6\\]"):
        keys.select(query, top_k=7)


def test_batchwise_vote_only_when_switched_on():
    keys = PromptKeys(pool_size=5, dim=8)
    chosen = torch.tensor([1, 1, 4, 2, 1, 4])
    query = keys.keys.detach()[chosen]
    assert keys.select(query, top_k=1).indices[:, 0].tolist() == chosen.tolist()
    voted = keys.select(query, top_k=1, batchwise=True).indices
    assert voted[:, 0].tolist() == [1] * 6


def test_majority_vote_counts_all_columns_and_breaks_ties_low():
    indices = torch.tensor([[3, 1], [1, 3], [2, 0], [0, 2]])
    assert majority_vote(indices, top_k=2).tolist() == [[0, 1]] * 4  # 0-3 twice each: lowest two
    assert majority_vote(torch.tensor([[2, 4], [4, 0], [4, 2]]), top_k=2).tolist() == [[4, 2]] * 3


# ------------------------------------------------------------------------ gathering
def test_token_pool_concatenates_a_samples_slots_in_order():
    pool = TokenPool(num_layers=2, pool_size=5, length=3, dim=4)
    indices = torch.tensor([[4, 1], [0, 0], [2, 3]])
    tokens = pool.gather_top_k(indices)
    for layer in range(2):
        for b, row in enumerate(indices.tolist()):
            expected = torch.cat([pool.prompts[layer, slot] for slot in row])
            assert torch.equal(tokens[layer][b], expected)
    pool.copy_slot(1, 3)
    assert torch.equal(pool.prompts[:, 3], pool.prompts[:, 1])


def test_prefix_pool_top_k_concatenates_slots_along_the_length():
    pool = PrefixPool(num_layers=2, num_slots=4, length=2, num_heads=3, head_dim=5)
    indices = torch.tensor([[2, 0], [1, 3]])
    gathered = pool.gather_top_k(indices)
    for layer, (key, value) in enumerate(gathered):
        for b, row in enumerate(indices.tolist()):
            for half, prefix in ((0, key), (1, value)):
                expected = torch.cat([pool.slots[s][layer, half] for s in row]).transpose(0, 1)  # (H, k·Lp, d)
                assert torch.equal(prefix[b], expected)
    single = pool.gather_top_k(indices[:, :1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, pool.gather(indices[:, 0])))
    with pytest.raises(ValueError, match="only reproduced for top_k = 1"):
        pool.gather_top_k(indices, layout="official")


# ---------------------------------------------------------------------------- CODA
def test_ortho_penalty_is_zero_for_orthonormal_rows_and_positive_otherwise():
    orthonormal = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64)).Q.T  # 5 orthonormal rows of dim 12
    assert ortho_penalty(orthonormal).item() == pytest.approx(0.0, abs=1e-20)
    skewed = orthonormal.clone()
    skewed[1] = skewed[1] + 0.3 * skewed[0]
    random = torch.randn(5, 12, dtype=torch.float64)
    by_hand = ((random @ random.T - torch.eye(5, dtype=torch.float64)) ** 2).sum() / 25
    assert ortho_penalty(skewed).item() > 1e-3 and ortho_penalty(random).item() == pytest.approx(by_hand.item())


def test_gram_schmidt_rows_are_orthonormal_and_orthogonal_to_the_frozen_rows():
    frozen = torch.randn(6, 20)  # trained rows: not orthogonal to each other
    new = gram_schmidt(frozen, 4, torch.Generator().manual_seed(1))
    assert (new @ new.T - torch.eye(4)).abs().max() <= 1e-5
    assert (new @ frozen.T).abs().max() <= 1e-5
    assert torch.equal(new, gram_schmidt(frozen, 4, torch.Generator().manual_seed(1)))  # seeded
    with pytest.raises(ValueError, match="cannot have 21 orthogonal vectors of dimension 20"):
        gram_schmidt(frozen, 15)


def coda_pool(tasks=3, per_task=2, length=4, heads=2, head_dim=4, layers=2):
    pool = CodaPool(layers, tasks * per_task, length, heads, head_dim, tasks)
    for task in range(tasks):
        pool.init_task(task, torch.Generator().manual_seed(task))
    return pool


def test_coda_task_init_keeps_earlier_tasks_and_orthogonalises_the_new_slice():
    pool = coda_pool()
    with torch.no_grad():
        pool.keys.add_(0.1 * torch.randn_like(pool.keys))  # "training" moves them off orthogonality
    before = pool.keys.detach().clone()
    pool.init_task(2, torch.Generator().manual_seed(9))
    assert torch.equal(pool.keys[:, :4], before[:, :4])
    for param in (pool.keys, pool.attention, pool.components):
        rows = param[1].flatten(1)
        new, frozen = rows[4:6], rows[:4]
        assert (new @ new.T - torch.eye(2)).abs().max() <= 1e-5 and (new @ frozen.T).abs().max() <= 1e-5


def test_coda_prompts_equal_a_loop_over_components():
    pool = coda_pool()
    query = torch.randn(3, 8)
    task, heads, head_dim = 1, 2, 4
    prefixes = pool.prefixes(query, task)
    used = 4  # components of tasks 0 and 1
    for layer, (key, value) in enumerate(prefixes):
        for b in range(3):
            prompt = torch.zeros(4, 8)
            for m in range(used):
                weight = F.cosine_similarity(query[b] * pool.attention[layer, m], pool.keys[layer, m], dim=0)
                prompt += weight * pool.components[layer, m]
            per_head = prompt.reshape(4, heads, head_dim).transpose(0, 1)  # (H, Lp, d)
            assert (key[b] - per_head[:, :2]).abs().max() <= 1e-5
            assert (value[b] - per_head[:, 2:]).abs().max() <= 1e-5


def test_coda_training_moves_only_the_current_task_slice():
    pool = coda_pool()
    key, value = pool.prefixes(torch.randn(3, 8), task=1, train=True)[0]
    (key.sum() + value.square().sum() + pool.ortho_loss(1)).backward()
    for param in (pool.keys, pool.attention, pool.components):
        moved = param.grad[0].flatten(1).abs().sum(dim=1) > 0
        assert moved.tolist() == [False, False, True, True, False, False]


def test_coda_ortho_loss_is_zero_after_init_and_positive_once_moved():
    pool = coda_pool()
    assert pool.ortho_loss(2).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        pool.components[0, 5].mul_(2.0)
    assert pool.ortho_loss(2).item() > 1e-3
    assert pool.ortho_loss(1).item() == pytest.approx(0.0, abs=1e-10)  # component 5 belongs to task 2


def test_coda_pool_refuses_impossible_settings():
    with pytest.raises(ValueError, match="even"):
        CodaPool(1, 4, 3, 2, 4, 2)
    with pytest.raises(ValueError, match="at least one component per task"):
        CodaPool(1, 2, 4, 2, 4, 3)
    with pytest.raises(ValueError, match="exceeds the key dimension 8"):
        CodaPool(1, 9, 4, 2, 4, 3)
