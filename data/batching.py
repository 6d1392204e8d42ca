"""Epoch plans (steps -> length-grouped micro-batches -> row indices), the padding collator and the packer.

An optimizer step takes `seqs_per_step` rows drawn at random (eCeLLM: 128, as gradient accumulation
over micro-batches of 1). We keep the rows of a step random, so a step's gradient is the same
estimate it would be without grouping, and only group by length *within* the step: its rows, sorted
longest first, are cut into micro-batches whose padded size

    rows * round_up(max_len, multiple_of) <= max_tokens

(a row longer than max_tokens gets a micro-batch of its own), choosing the cuts that minimise padded
tokens plus a per-micro-batch overhead (pack_by_length). Each step's first micro-batch holds its
longest row, so an out-of-memory shows in the first micro-batch of a step rather than later.

The plan is a pure function of (lengths, epoch, seed, sizes): resuming mid-epoch is calling
plan_epoch again and skipping the steps already done.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def epoch_order(n: int, *, epoch: int, seed: int) -> np.ndarray:
    """The random permutation of range(n) for this (seed, epoch); numpy PCG64 seeded by [seed, epoch]."""
    rng = np.random.default_rng([seed % 2**63, epoch % 2**63])
    return rng.permutation(n)


def pack_by_length(rows: Sequence[int], lengths: Sequence[int], *, max_tokens: int, multiple_of: int = 8,
                   batch_overhead: int | None = None) -> list[list[int]]:
    """Cut `rows` into micro-batches of similar length, each within max_tokens.

    The rows are sorted longest first (ties by index) and cut into contiguous runs by dynamic
    programming, minimising

        sum over micro-batches of  rows * round_up(max_len, multiple_of) + batch_overhead

    i.e. padded tokens computed plus a fixed price per micro-batch (kernel launches, weight
    dequantisation) counted in tokens; default max_tokens // 32. With a price of 0 every row would
    get its own micro-batch; a very high price gives the fewest micro-batches.
    """
    if batch_overhead is None:
        batch_overhead = max_tokens // 32
    order = sorted(rows, key=lambda i: (-lengths[i], i))
    n = len(order)
    if n == 0:
        return []
    width = np.array([round_up(lengths[i], multiple_of) for i in order], dtype=np.int64)   # (n,) descending
    # best[k]: cheapest cost of the first k sorted rows; start[k]: where its last micro-batch starts.
    best = np.zeros(n + 1, dtype=np.int64)
    start = np.zeros(n + 1, dtype=np.int64)
    j = np.arange(n, dtype=np.int64)
    for k in range(1, n + 1):
        size = k - j[:k]                                      # (k,) rows in a micro-batch order[j:k]
        cost = best[:k] + size * width[:k] + batch_overhead   # its longest row is order[j]
        cost[(size * width[:k] > max_tokens) & (size > 1)] = np.iinfo(np.int64).max
        start[k] = int(np.argmin(cost))                       # first minimum: deterministic
        best[k] = cost[start[k]]
    micro_batches, k = [], n
    while k > 0:
        micro_batches.append(order[start[k]: k])
        k = int(start[k])
    return micro_batches[::-1]


def plan_epoch(lengths: Sequence[int], *, epoch: int, seed: int, seqs_per_step: int, max_tokens: int,
               multiple_of: int = 8, batch_overhead: int | None = None) -> list[list[list[int]]]:
    """plan[step][micro_batch] = row indices. Every row exactly once; same arguments, same plan.

    Step s holds rows order[s * seqs_per_step : (s + 1) * seqs_per_step] of epoch_order (the last
    step may hold fewer), grouped by length into micro-batches by pack_by_length.
    """
    if seqs_per_step < 1 or max_tokens < 1 or multiple_of < 1:
        raise ValueError("seqs_per_step, max_tokens and multiple_of must be positive")
    lengths = list(lengths)
    order = epoch_order(len(lengths), epoch=epoch, seed=seed).tolist()
    return [pack_by_length(order[start: start + seqs_per_step], lengths, max_tokens=max_tokens,
                           multiple_of=multiple_of, batch_overhead=batch_overhead)
            for start in range(0, len(order), seqs_per_step)]


def padding_stats(lengths: Sequence[int], plan: list[list[list[int]]], *, multiple_of: int = 8) -> dict:
    """Padding of a plan: tokens, padded_tokens (sum of rows * round_up(max_len)), padding fraction
    = 1 - tokens / padded_tokens overall and for the worst step, and the number of micro-batches."""
    tokens = padded = 0
    worst = 0.0
    micro = 0
    for step in plan:
        step_tokens = step_padded = 0
        for mb in step:
            step_tokens += sum(lengths[i] for i in mb)
            step_padded += len(mb) * round_up(max(lengths[i] for i in mb), multiple_of)
            micro += 1
        tokens, padded = tokens + step_tokens, padded + step_padded
        worst = max(worst, 1 - step_tokens / step_padded)
    return {"tokens": tokens, "padded_tokens": padded, "padding": 1 - tokens / padded if padded else 0.0,
            "worst_step_padding": worst, "steps": len(plan), "micro_batches": micro}


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


def pack(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict:
    """Lay a micro-batch's rows end to end, without padding (train.py's layout; model.Packing runs it).

    Returns input_ids (1, N) long and labels (1, N) long, N = the rows' total length, and `lengths`,
    the rows' lengths in order. Each row's first label becomes -100: labels[0] is never a target
    (labels are aligned with input_ids, position t predicts labels[t + 1]), and in the packed
    sequence the last token of one row must not be asked to predict the first of the next.
    """
    if len(input_ids) != len(labels) or not input_ids:
        raise ValueError("pack needs as many label rows as id rows, and at least one row")
    lengths = [len(x) for x in input_ids]
    for b, (n, y) in enumerate(zip(lengths, labels)):
        if n != len(y) or n == 0:
            raise ValueError(f"row {b}: {n} ids but {len(y)} labels (and a row needs at least one token)")
    ids = torch.as_tensor(np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids]))[None]   # (1, N)
    out_labels = torch.as_tensor(np.concatenate([np.asarray(y, dtype=np.int64) for y in labels]))[None]
    starts = np.cumsum([0] + lengths[:-1])
    out_labels[0, torch.as_tensor(starts)] = IGNORE_INDEX
    return {"input_ids": ids, "labels": out_labels, "lengths": lengths}
