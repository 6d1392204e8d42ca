"""Epoch plans (steps -> micro-batches -> row indices), the packer train.py runs, and a padding collator.

An optimizer step takes `seqs_per_step` rows drawn at random (eCeLLM: 128, as gradient accumulation
over micro-batches of 1). We keep the rows of a step random, so a step's gradient is the same
estimate it would be without grouping, and only group them *within* the step into micro-batches
that train.py lays end to end without padding (`pack`; attention runs row by row, model.Packing).
A micro-batch's cost is then its real tokens, the same whatever the grouping, plus a fixed price
per micro-batch (kernel launches, weight dequantisation): so the plan is the fewest micro-batches
of at most `max_tokens` real tokens each, first-fit over the rows sorted longest first
(pack_by_length; a row longer than max_tokens gets a micro-batch of its own). Each step's first
micro-batch holds its longest row, so an out-of-memory shows in the first micro-batch of a step.

The plan is a pure function of (lengths, epoch, seed, sizes): resuming mid-epoch is calling
plan_epoch again and skipping the steps already done.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .encode import IGNORE_INDEX


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def epoch_order(n: int, *, epoch: int, seed: int) -> np.ndarray:
    """The random permutation of range(n) for this (seed, epoch); numpy PCG64 seeded by [seed, epoch]."""
    rng = np.random.default_rng([seed % 2**63, epoch % 2**63])
    return rng.permutation(n)


def pack_by_length(rows: Sequence[int], lengths: Sequence[int], *, max_tokens: int) -> list[list[int]]:
    """Group `rows` into micro-batches of at most max_tokens real tokens: first-fit decreasing.

    The rows, sorted longest first (ties by index), go one by one into the first micro-batch with room
    for them (sum of lengths <= max_tokens), else into a new one. First-fit decreasing uses at most
    11/9 of the fewest micro-batches possible plus one; the first micro-batch holds the longest row.
    """
    order = sorted(rows, key=lambda i: (-lengths[i], i))
    micro_batches: list[list[int]] = []
    used: list[int] = []                     # real tokens in each micro-batch so far
    for i in order:
        fits = next((b for b, n in enumerate(used) if n + lengths[i] <= max_tokens), None)
        if fits is None:
            micro_batches.append([i])
            used.append(lengths[i])
        else:
            micro_batches[fits].append(i)
            used[fits] += lengths[i]
    return micro_batches


def plan_epoch(lengths: Sequence[int], *, epoch: int, seed: int, seqs_per_step: int,
               max_tokens: int) -> list[list[list[int]]]:
    """plan[step][micro_batch] = row indices. Every row exactly once; same arguments, same plan.

    Step s holds rows order[s * seqs_per_step : (s + 1) * seqs_per_step] of epoch_order (the last
    step may hold fewer), grouped into micro-batches by pack_by_length.
    """
    if seqs_per_step < 1 or max_tokens < 1:
        raise ValueError("seqs_per_step and max_tokens must be positive")
    lengths = list(lengths)
    order = epoch_order(len(lengths), epoch=epoch, seed=seed).tolist()
    return [pack_by_length(order[start: start + seqs_per_step], lengths, max_tokens=max_tokens)
            for start in range(0, len(order), seqs_per_step)]


def plan_stats(lengths: Sequence[int], plan: list[list[list[int]]], *, max_tokens: int) -> dict:
    """What a plan asks of each step: tokens, steps, micro_batches, and fill = tokens / (micro_batches *
    max_tokens), how full the micro-batches are on average."""
    tokens = sum(lengths[i] for step in plan for mb in step for i in mb)
    micro = sum(len(step) for step in plan)
    return {"tokens": tokens, "steps": len(plan), "micro_batches": micro,
            "fill": tokens / (micro * max_tokens) if micro else 0.0}


def collate(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *, pad_id: int,
            multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to T = round_up(longest, multiple_of).

    Returns input_ids (B, T) long (pad_id on padding), labels (B, T) long (-100 on padding) and
    attention_mask (B, T) bool (True on real tokens). Padding is decided by position (each row's
    length), never by token id, so with pad_id == EOS the EOS labels stay.
    """
    if len(input_ids) != len(labels) or not input_ids:
        raise ValueError("collate needs as many label rows as id rows, and at least one row")
    B = len(input_ids)
    T = round_up(max(len(x) for x in input_ids), multiple_of)
    ids = torch.full((B, T), pad_id, dtype=torch.long)                 # (B, T)
    out_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)     # (B, T)
    mask = torch.zeros((B, T), dtype=torch.bool)                        # (B, T)
    for b, (x, y) in enumerate(zip(input_ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"row {b}: {len(x)} ids but {len(y)} labels")
        ids[b, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        out_labels[b, : len(y)] = torch.as_tensor(y, dtype=torch.long)
        mask[b, : len(x)] = True
    return {"input_ids": ids, "labels": out_labels, "attention_mask": mask}


def pack(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *, multiple: int = 1) -> dict:
    """Lay a micro-batch's rows end to end, without padding (train.py's layout; model.Packing runs it).

    Returns input_ids (1, N) long and labels (1, N) long, N = the rows' total length, and `lengths`,
    the rows' lengths in order. Each row's first label becomes -100: labels[0] is never a target
    (labels are aligned with input_ids, position t predicts labels[t + 1]), and in the packed
    sequence the last token of one row must not be asked to predict the first of the next.

    multiple > 1: N is rounded up to a multiple of it by one more row of token 0, every label -100 (so no
    loss sees it, and as a row of its own it attends to nothing else), its length last in `lengths`;
    `filler` is its length (0 when none was needed). train.py does so on a CPU in bf16/fp16: see FILL_TO there.
    """
    if len(input_ids) != len(labels) or not input_ids:
        raise ValueError("pack needs as many label rows as id rows, and at least one row")
    lengths = [len(x) for x in input_ids]
    for b, (n, y) in enumerate(zip(lengths, labels)):
        if n != len(y) or n == 0:
            raise ValueError(f"row {b}: {n} ids but {len(y)} labels (and a row needs at least one token)")
    filler = -sum(lengths) % multiple
    rows = [np.asarray(x, dtype=np.int64) for x in input_ids] + ([np.zeros(filler, dtype=np.int64)] if filler else [])
    ids = torch.as_tensor(np.concatenate(rows))[None]                                          # (1, N)
    out_labels = torch.as_tensor(np.concatenate([np.asarray(y, dtype=np.int64) for y in labels]
                                                + ([np.full(filler, IGNORE_INDEX)] if filler else [])))[None]
    lengths += [filler] if filler else []
    starts = np.cumsum([0] + lengths[:-1])
    out_labels[0, torch.as_tensor(starts)] = IGNORE_INDEX
    return {"input_ids": ids, "labels": out_labels, "lengths": lengths, "filler": filler}
