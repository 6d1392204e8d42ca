"""Greedy decoding with the KV cache: one static batch (`generate`), or a whole set of prompts with
continuous batching (`generate_batched`, what evaluate.py runs).

`generate`: prompts of different lengths are left-padded; padding is handled by position (an
attention mask over real tokens, and position ids that count only real tokens), never by token id.
Each row stops at its first stop token (EOS); the batch stops when every row has stopped or after
max_new_tokens.

`generate_batched`: `batch_size` slots, each holding one sequence in its own row of a `SlotCache`
(stored from position 0, no padding). Every decode step runs one token of every occupied slot, at
that row's own position, attending to that row's own cached length. A row that stops frees its slot
at once; the next waiting prompts (in token order) are prefilled together, end to end without
padding (`Packing`: each prompt attends causally to itself alone), straight into the freed slots.
A prompt's prefix that the prompt prefilled before it shares (eCeLLM's preamble and, within a task,
its instruction) is copied from the cache, not computed again: evaluation prompts share about 40% of
their tokens this way. When nothing waits any more, the last occupied slots move into the holes, so a
step only ever runs the rows still generating. Rows never wait for the longest answer of their batch.
The positions and the attention each token sees are those of `generate` and of an unpadded
one-row decode, so the greedy ids are the same (up to float rounding in the matrix products).

Every forward here is the model's own `Llama.forward`, given the cache, positions and mask (or the
packing), with `last_only`: the head runs on each row's last token only.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch

from .llama import KVCache, Llama, Packing


@torch.inference_mode()
def generate(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 100,
             stop_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (lists of ids); stop tokens are not returned."""
    device = model.lm_head.weight.device if hasattr(model.lm_head, "weight") else next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    input_ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L + max_new_tokens), dtype=torch.bool, device=device)  # real tokens, prompt + answer
    for i, p in enumerate(prompts):
        input_ids[i, L - len(p):] = torch.tensor(p, device=device)
        mask[i, L - len(p):L] = True
    positions = (mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)                  # (B, L)
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(model.config, B, L + max_new_tokens, dtype, device)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)

    next_ids = model(input_ids, position_ids=positions, attention_mask=mask[:, :L], cache=cache,
                     last_only=True).argmax(-1)                                   # (B,)
    position = positions[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    generated = []
    for step in range(max_new_tokens):
        done |= torch.isin(next_ids, stops)
        generated.append(torch.where(done, -1, next_ids))
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask[:, L + step] = True
        position = position + 1
        next_ids = model(next_ids[:, None], position_ids=position[:, None], attention_mask=mask[:, :L + step + 1],
                         cache=cache, last_only=True).argmax(-1)
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(B)]
    return [[t for t in row if t >= 0] for row in rows]


class SlotCache:
    """Keys and values of `slots` independent sequences: (layers, slots + 1, n_kv, max_len, hd) each.

    Each slot holds one sequence from position 0; slot `slots` (the store) keeps the last prompt
    prefilled, whose prefix later prompts copy instead of computing (`share`). Two modes, set by the
    generator before a forward:
    prefill(slots, packing): the forward holds the new tokens of sequences end to end (a `Packing`):
    sequence r continues slots[r], which holds its first packing.past[r] tokens, at positions past..;
    its keys are the slot's whole sequence; decode(rows, write_at): the forward holds one token of each
    of slots 0..rows-1, written at write_at (rows,), and attends to that slot's keys 0..write_at.
    """

    def __init__(self, config, slots: int, max_len: int, dtype, device):
        self.max_len = max_len
        shape = (config.num_hidden_layers, slots + 1, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.arange = torch.arange(slots, device=device)
        self.store, self.stored = slots, []     # the store slot and the token ids it holds
        self.target = self.packing = self.write_at = None
        self.rows = self.span = 0

    def prefill(self, target: list[int], packing: Packing):
        self.target, self.packing = target, packing

    def decode(self, rows: int, write_at: torch.Tensor, span: int):
        self.target, self.rows, self.write_at, self.span = None, rows, write_at, span

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.target is not None:                                          # prefill: k (1, n_kv, N, hd)
            past = self.packing.past
            for slot, (a, b), p in zip(self.target, self.packing.spans, past):
                self.k[layer, slot, :, p:p + b - a] = k[0, :, a:b]
                self.v[layer, slot, :, p:p + b - a] = v[0, :, a:b]
            if not any(past):
                return k, v
            whole = list(zip(self.target, self.packing.key_lengths))         # each slot's sequence, prefix included
            return (torch.cat([self.k[layer, slot, :, :end] for slot, end in whole], dim=1)[None],   # (1, n_kv, K, hd)
                    torch.cat([self.v[layer, slot, :, :end] for slot, end in whole], dim=1)[None])
        n, at = self.rows, self.write_at                                     # decode: k (n, n_kv, 1, hd)
        kb, vb = self.k[layer, :n], self.v[layer, :n]                        # views of the occupied slots
        kb[self.arange[:n], :, at] = k[:, :, 0]
        vb[self.arange[:n], :, at] = v[:, :, 0]
        return kb[:, :, :self.span], vb[:, :, :self.span]

    def move(self, src: int, dst: int, length: int):
        """Copy slot src's first `length` positions to slot dst (every layer)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def keep(self, slot: int, ids: Sequence[int]):
        """The store takes the prompt `ids` that slot holds (its keys and values at 0..len(ids)-1)."""
        self.move(slot, self.store, len(ids))
        self.stored = list(ids)

    def share(self, slot: int, ids: Sequence[int]) -> int:
        """Copy into slot the prefix of `ids` the store holds (`reusable_prefix`); return its length."""
        n = reusable_prefix(self.stored, ids)
        self.move(self.store, slot, n)
        return n


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Tokens of `prompt` whose keys and values a cache holding `cached` already has: their common prefix,
    leaving at least the prompt's last token to compute (its logits give the first new token)."""
    n, limit = 0, min(len(cached), len(prompt) - 1)
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return n


@torch.inference_mode()
def generate_batched(model: Llama, prompts: Sequence[Sequence[int]], *, batch_size: int = 16,
                     max_new_tokens: int | Sequence[int] = 100, stop_ids: Sequence[int] = (), pad_id: int = 0,
                     progress: bool = False, on_batch=None) -> list[list[int]]:
    """Greedy continuations of many prompts with continuous batching; results in input order.

    max_new_tokens: one limit for all, or one per prompt. At most `batch_size` rows decode together.
    Prompts are taken in token order (lexicographic on ids, ties in input order), so that each shares
    the longest prefix with the one prefilled before it. on_batch(indices, outputs), when given, is
    called with the positions (in `prompts`) of finished rows and their outputs, `batch_size` rows at
    a time (the rest at the end), e.g. to save them as they come. pad_id is accepted and unused
    (nothing is padded here), so that a call written for `generate` runs unchanged.
    """
    from tqdm import tqdm

    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    if len(limits) != n:
        raise ValueError(f"{len(limits)} max_new_tokens for {n} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    results: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=n, desc="generate", unit="row", disable=not progress)
    finished: list[int] = []   # rows done but not yet passed to on_batch

    def finish(i: int | None = None):
        """Row i is done; pass finished rows on, batch_size at a time (all that are left when i is None)."""
        if i is not None:
            finished.append(i)
            bar.update(1)
        while finished and (len(finished) >= batch_size or i is None):
            chunk, finished[:] = finished[:batch_size], finished[batch_size:]
            if on_batch is not None:
                on_batch(chunk, [results[j] for j in chunk])

    # in token order, so that each prompt shares the longest prefix with the one before it (the store's)
    waiting = deque(i for i in sorted(range(n), key=lambda i: list(prompts[i])) if limits[i] > 0)
    for i in range(n):
        if limits[i] <= 0:
            finish(i)
    if not waiting:
        finish()
        bar.close()
        return results

    device = model.lm_head.weight.device if hasattr(model.lm_head, "weight") else next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    slots = min(batch_size, len(waiting))
    max_len = max(len(prompts[i]) + limits[i] for i in waiting)
    cache = SlotCache(model.config, slots, max_len, dtype, device)
    stops = set(stop_ids)
    row_of: list[int] = [-1] * slots       # prompt index held by each slot (-1: free)
    pos: list[int] = [0] * slots           # per slot: where its next fed token goes (= tokens cached)
    tokens = torch.zeros(slots, dtype=torch.long, device=device)            # per slot: the token to feed next
    occupied = 0                           # slots 0..occupied-1 hold rows, some possibly just finished

    def take(slot: int, token: int) -> bool:
        """Record a row's new token; True if the row goes on (its slot then feeds `token`)."""
        i = row_of[slot]
        if token in stops:
            done = True
        else:
            results[i].append(token)
            done = len(results[i]) >= limits[i]
        if done:
            row_of[slot] = -1
            finish(i)
        return not done

    while True:
        # 1. waiting prompts into the free slots: each copies the prefix it shares with the store's prompt,
        #    and the rest of them are prefilled together (end to end, each causal on its own sequence)
        while waiting and (occupied < slots or -1 in row_of[:occupied]):
            free = [s for s in range(occupied) if row_of[s] < 0] + list(range(occupied, slots))
            take_n = 1 if not cache.stored else min(len(free), len(waiting))  # the very first alone: then shared
            new = [waiting.popleft() for _ in range(take_n)]
            free = free[:len(new)]
            past = [cache.share(s, prompts[i]) for s, i in zip(free, new)]
            packing = Packing([len(prompts[i]) - p for i, p in zip(new, past)], device, past=past)
            ids = torch.cat([torch.as_tensor(prompts[i][p:], dtype=torch.long) for i, p in zip(new, past)])[None]
            cache.prefill(free, packing)
            first = model(ids.to(device), packing=packing, cache=cache, last_only=True).argmax(-1)   # (len(new),)
            tokens[torch.tensor(free, device=device)] = first
            cache.keep(free[-1], prompts[new[-1]])
            occupied = max(occupied, max(free) + 1)
            for s, i, t in zip(free, new, first.tolist()):
                row_of[s], pos[s] = i, len(prompts[i])
                take(s, t)
        # 2. nothing waits: close the holes by moving the last occupied slots into them
        s = 0
        while True:
            while occupied and row_of[occupied - 1] < 0:
                occupied -= 1
            if s >= occupied:
                break
            if row_of[s] < 0:   # a hole below the last occupied slot: that slot moves into it
                last = occupied - 1
                cache.move(last, s, pos[last])
                row_of[s], pos[s], row_of[last] = row_of[last], pos[last], -1
                tokens[s] = tokens[last]
            s += 1
        if occupied == 0:
            break
        # 3. one decode step of slots 0..occupied-1, each at its own position
        m = occupied
        at = torch.tensor(pos[:m], device=device)                            # (m,)
        span = max(pos[:m]) + 1
        mask = None                                          # every row at the last position: it sees all keys
        if min(pos[:m]) < span - 1:
            mask = (torch.arange(span, device=device)[None, :] <= at[:, None])[:, None, None, :]   # (m, 1, 1, span)
        cache.decode(m, at, span)
        tokens[:m] = model(tokens[:m, None], position_ids=at[:, None], attention_mask=mask, cache=cache,
                           last_only=True).argmax(-1)
        for s, t in enumerate(tokens[:m].tolist()):
            pos[s] += 1
            take(s, t)
    finish()
    bar.close()
    return results


@torch.inference_mode()
def next_token_logprobs(model: Llama, prompts: Sequence[Sequence[int]], token_ids: Sequence[int], *,
                        batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """log p(t | prompt) of each token t in `token_ids` at the position after each prompt: (prompts, tokens).

    What label decoding reads (evaluate.py --decode labels|threshold): one forward pass per prompt, no
    generation. Prompts go in length order, `batch_size` at a time, end to end without padding (Packing);
    each row's distribution is the full-vocabulary log-softmax at its last position, then the columns asked for.
    """
    device = next(model.parameters()).device
    columns = torch.tensor(list(token_ids), device=device)
    out = torch.empty(len(prompts), len(columns))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="scoring labels", unit="rows")
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        lengths = [len(prompts[i]) for i in chosen]
        ids = torch.tensor([t for i in chosen for t in prompts[i]], device=device)[None]         # (1, N)
        logits = model(ids, packing=Packing(lengths, device=device), last_only=True).float()   # (B, vocab)
        out[chosen] = torch.log_softmax(logits, dim=-1)[:, columns].cpu()
        if bar is not None:
            bar.update(len(chosen))
    if bar is not None:
        bar.close()
    return out
