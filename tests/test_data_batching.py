"""data/: epoch plans (every row once, deterministic, resumable, within budget) and the collator."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data import collate, pack, plan_epoch, plan_stats
from data.batching import pack_by_length

lengths_st = st.lists(st.integers(min_value=1, max_value=3000), min_size=0, max_size=400)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, seqs_per_step=st.integers(1, 150), max_tokens=st.integers(8, 20000),
       seed=st.integers(0, 2**32), epoch=st.integers(0, 5))
def test_every_row_exactly_once_and_within_budget(lengths, seqs_per_step, max_tokens, seed, epoch):
    plan = plan_epoch(lengths, epoch=epoch, seed=seed, seqs_per_step=seqs_per_step, max_tokens=max_tokens)
    flat = [i for step in plan for micro in step for i in micro]
    assert sorted(flat) == list(range(len(lengths)))
    sizes = [sum(len(m) for m in step) for step in plan]
    assert all(n == seqs_per_step for n in sizes[:-1]) and (not sizes or 1 <= sizes[-1] <= seqs_per_step)
    for step in plan:
        for micro in step:
            assert micro, "empty micro-batch"
            assert sum(lengths[i] for i in micro) <= max_tokens or len(micro) == 1
        # the step's longest row is in its first micro-batch (an out-of-memory shows there first)
        assert max(lengths[i] for i in step[0]) == max(lengths[i] for m in step for i in m)


def test_same_seed_same_order_and_resume_mid_epoch():
    lengths = [(i * 7919) % 1500 + 20 for i in range(1000)]
    kwargs = dict(seqs_per_step=64, max_tokens=8192)
    plan = plan_epoch(lengths, epoch=2, seed=13, **kwargs)
    assert plan == plan_epoch(lengths, epoch=2, seed=13, **kwargs)
    assert plan != plan_epoch(lengths, epoch=2, seed=14, **kwargs)
    assert plan != plan_epoch(lengths, epoch=3, seed=13, **kwargs)
    # a run stopped after 5 steps rebuilds the plan from (seed, epoch) and carries on at step 5
    done = [row for step in plan[:5] for micro in step for row in micro]
    resumed = plan_epoch(lengths, epoch=2, seed=13, **kwargs)[5:]
    assert resumed == plan[5:]
    assert sorted(done + [r for step in resumed for m in step for r in m]) == list(range(1000))


def test_steps_mix_lengths_at_random():
    """Steps are random draws (not length-sorted); only micro-batches are grouped by length."""
    lengths = list(range(10, 1010))
    plan = plan_epoch(lengths, epoch=0, seed=0, seqs_per_step=100, max_tokens=1 << 20)
    spans = [max(lengths[r] for m in s for r in m) - min(lengths[r] for m in s for r in m) for s in plan]
    assert min(spans) > 500


def test_a_row_longer_than_the_budget_gets_its_own_micro_batch():
    plan = plan_epoch([5000, 10, 10, 10], epoch=0, seed=0, seqs_per_step=4, max_tokens=1024)
    assert plan[0][0] == [0] and sorted(plan[0][1]) == [1, 2, 3]


def test_first_fit_decreasing_fills_micro_batches():
    """Rows go to the first micro-batch with room, longest first: no two micro-batches could be merged, and the
    example's 8 rows (3,100 tokens) get 4 micro-batches of at most 1024 real tokens, the fewest possible."""
    lengths = [100, 120, 300, 310, 900, 1000, 240, 130]
    micro = pack_by_length(range(len(lengths)), lengths, max_tokens=1024)
    assert micro == [[5], [4, 1], [3, 2, 6, 7], [0]]
    sums = [sum(lengths[i] for i in m) for m in micro]
    assert all(a + b > 1024 for i, a in enumerate(sums) for b in sums[i + 1:])
    stats = plan_stats(lengths, [micro], max_tokens=1024)
    assert stats["micro_batches"] == 4 and stats["tokens"] == 3100 and stats["fill"] == pytest.approx(3100 / 4096)


def test_collate_pads_right_to_a_multiple_of_8():
    ids = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    labels = [[-100, 6, 7], [-100, -100, 3, 4, 5, 6, 7, 8, 9]]
    batch = collate(ids, labels, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    assert collate(ids, labels, pad_id=0, multiple_of=1)["input_ids"].shape == (2, 9)
    with pytest.raises(ValueError, match="row 0: 3 ids but 2 labels"):
        collate([[1, 2, 3]], [[1, 2]], pad_id=0)


def test_pack_lays_rows_end_to_end_and_masks_each_first_label():
    ids = [[5, 6, 7], [1, 2, 3, 4]]
    labels = [[5, 6, 7], [-100, -100, 3, 4]]          # the first row is trained on inputs: labels[0] = 5
    batch = pack(ids, labels)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2, 3, 4]]
    # row 0's first label and row 1's first label are never targets: 7 must not be asked to predict 1
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, 3, 4]]
    assert batch["lengths"] == [3, 4]
    with pytest.raises(ValueError, match="row 1: 2 ids but 1 labels"):
        pack([[1], [1, 2]], [[1], [2]])
    with pytest.raises(ValueError, match="at least one row"):
        pack([], [])


def test_pack_fills_to_a_multiple_with_a_row_no_loss_sees():
    ids, labels = [[5, 6, 7], [1, 2, 3, 4]], [[5, 6, 7], [-100, -100, 3, 4]]
    batch = pack(ids, labels, multiple=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2, 3, 4, 0]] and batch["filler"] == 1
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, 3, 4, -100]]
    assert batch["lengths"] == [3, 4, 1]                       # the filler is a row of its own: it attends to itself
    assert pack(ids, labels, multiple=7)["lengths"] == [3, 4] and pack(ids, labels, multiple=7)["filler"] == 0
    assert pack(ids, labels, multiple=64)["input_ids"].shape == (1, 64)
