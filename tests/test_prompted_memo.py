"""Prompted test features memoised per (image, slot): same predictions, fewer prompted passes, recomputed
when the slot's parameters change."""

from __future__ import annotations

import torch
from engine_fixtures import (
    NUM_TASKS,
    make_engine,
    make_tasks,
    tiny_config,
)

from norga.engine.loop import Engine
from norga.engine.run_dir import RunDirectory
from norga.methods.hide.prompted_memo import PromptedFeatureMemo


class CountingEncoder:
    """Features = f(row, slot) of fresh random tables; counts the rows it is asked to compute."""

    def __init__(self, size: int, slots: int, dim: int = 5) -> None:
        self.table = torch.randn(slots, size, dim)
        self.calls = 0

    def encoder(self, rows: torch.Tensor, slots: torch.Tensor):
        def encode(mask: torch.Tensor) -> torch.Tensor:
            self.calls += int(mask.sum())
            return self.table[slots[mask], rows[mask]]
        return encode


def test_memo_returns_what_encoding_returns_and_encodes_each_image_slot_pair_once():
    versions = {slot: 0 for slot in range(3)}
    memo = PromptedFeatureMemo(lambda slot: versions[slot])
    source = CountingEncoder(size=10, slots=3)
    rows, slots = torch.randperm(10)[:6], torch.randint(0, 3, (6,))
    first = memo.features("test", rows, slots, 10, source.encoder(rows, slots))
    torch.testing.assert_close(first, source.table[slots, rows], rtol=0, atol=0)
    assert source.calls == 6
    again = memo.features("test", rows, slots, 10, source.encoder(rows, slots))
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert source.calls == 6  # nothing recomputed
    other = (slots + 1) % 3  # same images, other slots: all new pairs
    memo.features("test", rows, other, 10, source.encoder(rows, other))
    assert source.calls == 12


def test_a_changed_slot_is_recomputed_and_the_others_are_not():
    versions = {0: 0, 1: 0}
    memo = PromptedFeatureMemo(lambda slot: versions[slot])
    source = CountingEncoder(size=8, slots=2)
    rows, slots = torch.arange(8), torch.tensor([0, 1] * 4)
    memo.features("test", rows, slots, 8, source.encoder(rows, slots))
    versions[1] += 1  # slot 1 trained since
    source.table[1] += 1.0
    result = memo.features("test", rows, slots, 8, source.encoder(rows, slots))
    assert source.calls == 8 + 4
    torch.testing.assert_close(result, source.table[slots, rows], rtol=0, atol=0)


def run_engine(tmp_path, memoise: bool) -> Engine:
    config = tiny_config(cache_prompted_features=memoise)
    engine = make_engine(config, RunDirectory(tmp_path / f"memo{memoise}"))
    engine.run()
    return engine


def test_runs_with_and_without_the_memo_predict_the_same(tmp_path):
    with_memo, without = run_engine(tmp_path, True), run_engine(tmp_path, False)
    for name in ("accuracy", "before_tap", "task_identity"):
        assert with_memo.matrices[name].to_dict() == without.matrices[name].to_dict()
    assert without.method.prompted_memo is None
    test_images = sum(len(task.test) for task in make_tasks())
    evaluated = sum(len(make_tasks()[seen].test) for task in range(NUM_TASKS) for seen in range(task + 1))
    evaluated += sum(len(make_tasks()[seen].test) for task in range(1, NUM_TASKS) for seen in range(task + 1))
    encoded = with_memo.method.prompted_memo.images_encoded
    assert test_images <= encoded < evaluated  # at least once per image, far fewer than one per evaluation
