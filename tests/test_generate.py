"""The fast generator (batched, left-padded, KV cache) against slow references, on CPU.

Reference decoder: no cache and no padding; every step re-runs the whole sequence so far through
the network and takes the argmax of the last position. `generate` / `generate_batched` must give
exactly the same ids for every prompt, at batch sizes 1 and 16, on the tiny random model and on
the real SmolLM2-135M; and the same ids as transformers' `generate` (greedy, left padding) on a
tiny model converted to `LlamaForCausalLM`. `generate_batched` (continuous batching: rows leave
and join the batch at every step) must also give the ids of the static path it replaced (sorted
chunks of `batch_size` through `generate`), on many stop points, per-row limits and batch sizes,
and on real ECInstruct prompts with SmolLM2.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from model import generate, generate_batched, load_model, next_token_logprobs

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "ecinstruct_sample.jsonl"


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


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_prefixes_are_copied_not_recomputed(tiny, batch_size):
    """Prompts that share prefixes (one common head, groups with longer ones, a duplicate, a prompt that is
    another's prefix, one sharing nothing): the reference decoder's ids, with fewer tokens computed."""
    model, _ = tiny
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(3, model.config.vocab_size) for _ in range(n)]  # noqa: E731
    head, group_a, group_b = [1] + ids(12), ids(9), ids(5)
    prompts = [head + group_a + ids(rng.randint(1, 15)) for _ in range(6)]
    prompts += [head + group_b + ids(rng.randint(1, 15)) for _ in range(6)]
    prompts += [list(prompts[3]), head + group_a, head, ids(20)]
    rng.shuffle(prompts)
    stops = with_extra_stop(model, prompts, 10)
    expected = [reference_greedy(model, p, max_new_tokens=10, stop_ids=stops) for p in prompts]

    computed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: computed.append(args[0].numel()))
    try:
        got = generate_batched(model, prompts, batch_size=batch_size, max_new_tokens=10, stop_ids=stops)
    finally:
        hook.remove()
    assert got == expected
    # decode steps feed each row's new tokens but its first (from the prefill): at least len(e) - 1 a row
    prefilled_at_most = sum(computed) - sum(len(e) - 1 for e in expected)
    assert prefilled_at_most <= sum(map(len, prompts)) - 10 * len(head), (prefilled_at_most, sum(map(len, prompts)))


def test_every_token_goes_through_the_models_forward(tiny):
    """One layer loop: what generate, generate_batched (prefill and decode) and next_token_logprobs feed the
    network enters through Llama.forward, with the head on each row's last token only."""
    model, tokenizer = tiny
    prompts = fixed_prompts(tokenizer, model.config.vocab_size, n=9)
    through_forward, embedded, head_rows = [], [], []
    hooks = [model.register_forward_pre_hook(lambda m, args, kwargs: through_forward.append(args[0].numel()),
                                             with_kwargs=True),
             model.model.embed_tokens.register_forward_hook(lambda m, args, out: embedded.append(args[0].numel())),
             model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))]
    try:
        generate_batched(model, prompts, batch_size=4, max_new_tokens=6)
        generate(model, prompts[:4], max_new_tokens=6)
        next_token_logprobs(model, prompts, [3, 4], batch_size=4)
    finally:
        for hook in hooks:
            hook.remove()
    assert embedded and through_forward == embedded
    assert sum(head_rows) < sum(embedded) // 2   # prompts' tokens but the last never reach the head


def test_tiny_padding_id_does_not_matter(tiny):
    model, tokenizer = tiny
    prompts = fixed_prompts(tokenizer, model.config.vocab_size, n=8)
    a = generate(model, prompts, max_new_tokens=6, pad_id=0)
    b = generate(model, prompts, max_new_tokens=6, pad_id=model.config.vocab_size - 1)
    assert a == b


@pytest.mark.slow
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


def static_batched(model, prompts, *, batch_size, max_new_tokens, stop_ids=(), pad_id=0):
    """The generator evaluate.py ran before continuous batching: longest first, chunks of batch_size
    through `generate`, each chunk running until its last row stops."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    out = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, o in zip(chunk, generate(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                                        stop_ids=stop_ids, pad_id=pad_id)):
            out[i] = o
    return out


@pytest.fixture(scope="module")
def lively():
    """The tiny architecture with weights of std 0.2: its greedy answers vary token to token (at the tiny
    checkpoint's std 0.02 every answer repeats one token, which would hide a mixed-up cache row)."""
    from model import Llama, ModelConfig
    from tiny import TINY

    torch.manual_seed(0)
    model = Llama(ModelConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, TINY["vocab_size"]) for _ in range(rng.randint(1, 60))] for _ in range(30)]
    return model, prompts


@pytest.mark.parametrize("batch_size", [1, 3, 7, 40])
def test_continuous_batching_matches_the_static_path(lively, batch_size):
    """30 prompts and stops that end rows at many different steps: rows leave, join and move between slots."""
    model, prompts = lively
    free = [reference_greedy(model, p, max_new_tokens=10) for p in prompts[:8]]
    stops = {free[k][k + 1] for k in range(8)}
    expected = static_batched(model, prompts, batch_size=batch_size, max_new_tokens=10, stop_ids=stops)
    assert len({len(e) for e in expected}) >= 4, "rows should stop at many different steps"
    assert generate_batched(model, prompts, batch_size=batch_size, max_new_tokens=10, stop_ids=stops) == expected


def test_continuous_batching_per_row_limits_and_on_batch(lively):
    model, prompts = lively
    prompts = prompts[:12]
    limits = [0, 1, 2, 9, 4, 1, 7, 3, 9, 0, 5, 6]
    expected = [reference_greedy(model, p, max_new_tokens=m) for p, m in zip(prompts, limits)]
    calls = []
    got = generate_batched(model, prompts, batch_size=4, max_new_tokens=limits, pad_id=5,
                           on_batch=lambda idx, outs: calls.append((list(idx), list(outs))))
    assert got == expected
    assert [len(idx) for idx, _ in calls] == [4, 4, 4]          # batch_size rows per call
    assert sorted(i for idx, _ in calls for i in idx) == list(range(12))
    assert all(outs == [expected[i] for i in idx] for idx, outs in calls)
    with pytest.raises(ValueError):
        generate_batched(model, prompts, max_new_tokens=[1, 2])


@pytest.mark.slow
def test_continuous_batching_smollm2_real_prompts(smollm2):
    """Real ECInstruct prompts (the sample), real weights: the same greedy answers as the static path."""
    from data import load_rows, render_prompt

    model, tokenizer = smollm2
    rows = load_rows(SAMPLE, split=None, tasks="all", settings=None)
    rows = sorted(rows, key=lambda r: (r["task"], r["index"]))[::max(1, len(rows) // 10)][:10]
    prompts = [tokenizer.encode(render_prompt(r, "alpaca", tokenizer), bos=True) for r in rows]
    stops = sorted(tokenizer.stop_ids)
    expected = static_batched(model, prompts, batch_size=4, max_new_tokens=12, stop_ids=stops,
                              pad_id=tokenizer.pad_id)
    got = generate_batched(model, prompts, batch_size=4, max_new_tokens=12, stop_ids=stops, pad_id=tokenizer.pad_id)
    assert got == expected
