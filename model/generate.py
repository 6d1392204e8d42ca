"""Batched greedy decoding with the KV cache.

Prompts of different lengths are left-padded; padding is handled by position (an attention mask
over real tokens, and position ids that count only real tokens), never by token id. Each row stops
at its first stop token (EOS); the batch stops when every row has stopped or after max_new_tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .llama import KVCache, Llama


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

    hidden = model(input_ids, position_ids=positions, attention_mask=mask[:, :L], cache=cache, return_hidden=True)
    next_ids = model.lm_head(hidden[:, -1]).argmax(-1)                            # (B,)
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
        hidden = model(next_ids[:, None], position_ids=position[:, None], attention_mask=mask[:, :L + step + 1],
                       cache=cache, return_hidden=True)
        next_ids = model.lm_head(hidden[:, -1]).argmax(-1)
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(B)]
    return [[t for t in row if t >= 0] for row in rows]


def generate_batched(model: Llama, prompts: Sequence[Sequence[int]], *, batch_size: int = 16,
                     max_new_tokens: int = 100, stop_ids: Sequence[int] = (), pad_id: int = 0,
                     progress: bool = False, on_batch=None) -> list[list[int]]:
    """`generate` over many prompts: sorted by length so batches pad little; results in input order.

    on_batch(indices, outputs), when given, is called after each batch with the positions (in
    `prompts`) it generated and their outputs, e.g. to save them as they come.
    """
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="generate", unit="row", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outputs = generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                           stop_ids=stop_ids, pad_id=pad_id)
        for i, out in zip(chunk, outputs):
            results[i] = out
        if on_batch is not None:
            on_batch(chunk, outputs)
        bar.update(len(chunk))
    bar.close()
    return results
