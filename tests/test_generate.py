"""The fast generator (batched, left-padded, KV cache) against slow references, on CPU.

Reference decoder: no cache and no padding; every step re-runs the whole sequence so far through
the network and takes the argmax of the last position. `generate` / `generate_batched` must give
exactly the same ids for every prompt, at batch sizes 1 and 16, on the tiny random model and on
the real SmolLM2-135M; and the same ids as transformers' `generate` (greedy, left padding) on a
tiny model converted to `LlamaForCausalLM`.
"""

from __future__ import annotations

import random

import pytest
import torch

from model import generate, generate_batched, load_model


def reference_greedy(model, prompt: list[int], *, max_new_tokens: int, stop_ids=()) -> list[int]:
    """One token at a time, whole unpadded sequence each step, argmax; stop tokens not returned."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            hidden = model(torch.tensor([ids]), return_hidden=True)   # (1, T, hidden), no cache, no mask
            token = int(model.lm_head(hidden[0, -1]).argmax())        # head on the last position only
            if token in stop_ids:
                break
            out.append(token)
            ids.append(token)
    return out


def fixed_prompts(tokenizer, vocab_size: int, n: int = 20, seed: int = 1234) -> list[list[int]]:
    """Deterministic prompts of lengths 1 to ~40: some real text, some random ids."""
    texts = ["### Instruction:\nIs the product relevant to the query?\n\n### Response:\n", "yes", "A: B:",
             "product title", "Users who buy product 1 may also buy product 2."]
    prompts = [tokenizer.encode(t, bos=True) for t in texts]
    rng = random.Random(seed)
    while len(prompts) < n:
        prompts.append([rng.randrange(3, vocab_size) for _ in range(rng.randint(1, 40))])
    return prompts


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


def with_extra_stop(model, prompts, max_new_tokens):
    """EOS plus a token that the reference does emit mid-answer, so that rows stop at different steps."""
    first = reference_greedy(model, prompts[0], max_new_tokens=max_new_tokens)
    return {model.config.eos_token_id, first[len(first) // 2]}


@pytest.fixture(scope="module")
def tiny_case(tiny):
    """(prompts, stop ids, reference outputs) for the tiny model, computed once."""
    model, tokenizer = tiny
    prompts = fixed_prompts(tokenizer, model.config.vocab_size)
    stops = with_extra_stop(model, prompts, 12)
    expected = [reference_greedy(model, p, max_new_tokens=12, stop_ids=stops) for p in prompts]
    assert len({len(e) for e in expected}) > 1, "the fixture should make rows stop at different steps"
    return prompts, stops, expected


@pytest.mark.parametrize("batch_size", [1, 16])
def test_tiny_matches_reference_decoder(tiny, tiny_case, batch_size):
    model, tokenizer = tiny
    prompts, stops, expected = tiny_case
    got = generate_batched(model, prompts, batch_size=batch_size, max_new_tokens=12, stop_ids=stops,
                           pad_id=tokenizer.pad_id)
    assert got == expected
    # one call to `generate` with 16 rows of mixed lengths (heavy left padding)
    assert generate(model, prompts[:16], max_new_tokens=12, stop_ids=stops, pad_id=tokenizer.pad_id) == expected[:16]


def test_tiny_padding_id_does_not_matter(tiny):
    model, tokenizer = tiny
    prompts = fixed_prompts(tokenizer, model.config.vocab_size, n=8)
    a = generate(model, prompts, max_new_tokens=6, pad_id=0)
    b = generate(model, prompts, max_new_tokens=6, pad_id=model.config.vocab_size - 1)
    assert a == b


def test_smollm2_matches_reference_decoder(smollm2):
    model, tokenizer = smollm2
    texts = ["The capital of France is", "Question: is a phone case a substitute for a phone?\nAnswer:",
             "Below is an instruction that describes a task.\n\n### Instruction:\nSay yes.\n\n### Response:\n",
             "Hello"]
    prompts = [tokenizer.encode(t, bos=True) for t in texts]
    stops = tokenizer.stop_ids
    expected = [reference_greedy(model, p, max_new_tokens=8, stop_ids=stops) for p in prompts]
    for batch_size in (1, 16):
        got = generate_batched(model, prompts, batch_size=batch_size, max_new_tokens=8, stop_ids=stops,
                               pad_id=tokenizer.pad_id)
        assert got == expected, f"batch size {batch_size}"


def test_tiny_matches_transformers_generate(tiny_dir):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = load_model(tiny_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_dir), torch_dtype=torch.float32).eval()
    prompts = fixed_prompts(tokenizer, model.config.vocab_size, n=8, seed=7)
    pad = tokenizer.pad_id
    L = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    # no stop token: every row runs the full 20 steps in both implementations
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=pad, min_new_tokens=20)
    expected = out[:, L:].tolist()
    assert generate(model, prompts, max_new_tokens=20, stop_ids=(), pad_id=pad) == expected
    assert generate_batched(model, prompts, batch_size=3, max_new_tokens=20, pad_id=pad) == expected
