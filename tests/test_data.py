"""data/: loading, validation and prompt rendering (no tokenizer needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data import (DEFAULT_SAMPLE, SETTINGS, DataError, load_rows, parse_settings, parse_tasks, read_rows,
                  render_prompt)
from tasks import TASKS

# eCeLLM templates/alpaca.json (github.com/ninglab/eCeLLM @ 5923d50), verbatim: the oracle of the
# byte-for-byte tests. Parsed from its JSON text so every escape is exactly the file's.
ECELLM_ALPACA_JSON = r'''{
    "description": "Template used by Alpaca-LoRA.",
    "prompt_input": "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Options:\n{options}\n\n### Response:\n",
    "prompt_no_options": "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "response_split": "### Response:"    
}
'''
ECELLM = json.loads(ECELLM_ALPACA_JSON)


def ecellm_prompt(row: dict) -> str:
    """eCeLLM utils/prompter.py generate_prompt(instruction, input, options) without a label."""
    if row["options"]:
        return ECELLM["prompt_input"].format(instruction=row["instruction"], input=row["input"], options=row["options"])
    return ECELLM["prompt_no_options"].format(instruction=row["instruction"], input=row["input"])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sample_rows() -> list[dict]:
    return read_rows(DEFAULT_SAMPLE)


def good_row(**changes) -> dict:
    row = {"output": "yes", "input": '{"query": "red shoes", "product": "Red running shoes"}', "options": None,
           "task": "Product_Substitute_Identification", "setting": "IND_Diverse_Instruction", "split": "train",
           "few_shot_example": None, "instruction": "Answer yes or no."}
    row.update(changes)
    return row


# ---- the sample and the selection -----------------------------------------------------------------

def test_sample_defaults_are_the_papers_training_data():
    rows = load_rows(DEFAULT_SAMPLE)
    assert {r["task"] for r in rows} == set(TASKS)
    assert {(r["split"], r["setting"]) for r in rows} == {("train", "IND_Diverse_Instruction")}
    assert 200 <= len(rows) <= 400
    assert list(rows[0]) == ["output", "input", "options", "task", "setting", "split", "few_shot_example",
                             "instruction", "index", "row"]


def test_sample_has_every_task_in_every_split(sample_rows):
    for split in ("train", "val", "test"):
        assert {r["task"] for r in sample_rows if r["split"] == split} == set(TASKS), split
    assert DEFAULT_SAMPLE.stat().st_size < 1_000_000
    assert (DEFAULT_SAMPLE.parent / "README.md").read_text().count("CC-BY-4.0") >= 1


def test_index_counts_within_task_setting_split_blocks(sample_rows):
    seen = Counter()
    for r in sample_rows:
        key = (r["task"], r["setting"], r["split"])
        assert r["index"] == seen[key]
        seen[key] += 1


def test_filters_by_split_task_and_setting():
    rows = load_rows(DEFAULT_SAMPLE, split="test", tasks="PRP", settings=None)
    assert {r["setting"] for r in rows} == {"IND_Diverse_Instruction", "OOD_Diverse_Instruction"}
    rows = load_rows(DEFAULT_SAMPLE, split=None, tasks=["Product_Relation_Predicition"], settings="OOD_Diverse_Instruction")
    assert len(rows) == 10 and {r["task"] for r in rows} == {"Product_Relation_Prediction"}
    rows = load_rows(DEFAULT_SAMPLE, split="validation", tasks="AVE,SA")
    assert {r["task"] for r in rows} == {"Attribute_Value_Extraction", "Sentiment_Analysis"}
    assert {r["split"] for r in rows} == {"val"}


def test_parse_tasks_accepts_hub_names_old_spellings_and_abbreviations():
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks(" AVE , qpr,Product_Substitue_Identification") == [
        "Attribute_Value_Extraction", "Product_Substitute_Identification", "Query_Product_Rank"]
    assert parse_tasks("Query_Product_Ranking,Product_Relation_Predicition") == [
        "Product_Relation_Prediction", "Query_Product_Rank"]
    # any other name is a task of one's own, kept as written; custom names come after ECInstruct's, sorted
    assert parse_tasks("my_task, AVE,Foo") == ["Attribute_Value_Extraction", "Foo", "my_task"]
    with pytest.raises(DataError, match=r"task name 'a=b' is not usable"):
        parse_tasks("AVE,a=b")


def test_parse_settings():
    assert parse_settings(None) is None and parse_settings("all") is None
    assert parse_settings("ind_single_instruction,OOD_Diverse_Instruction") == [
        "IND_Single_Instruction", "OOD_Diverse_Instruction"]
    with pytest.raises(DataError, match="unknown setting 'IND'.*IND_Diverse_Instruction_1-shot"):
        parse_settings("IND")
    assert len(SETTINGS) == 8


def test_empty_selection_lists_what_the_file_holds():
    with pytest.raises(DataError) as e:
        load_rows(DEFAULT_SAMPLE, split="val", tasks="PRP", settings="OOD_Diverse_Instruction")
    message = str(e.value)
    assert "no rows match split=val tasks=PRP settings=OOD_Diverse_Instruction" in message
    assert "test: " in message and "PRP/OOD_Diverse_Instruction 10" in message


# ---- the shared real rows ---------------------------------------------------------------------------

def test_index_joins_the_gold_files(shared_dir, sample_rows):
    gold = {}
    for line in (shared_dir / "gold_outputs.jsonl").read_text().splitlines():
        g = json.loads(line)
        gold[g["task"], g["setting"], g["index"]] = g["output"]
    real = load_rows(shared_dir / "test_rows_dev.jsonl", split="test", settings=None)
    assert len(real) == 8931
    assert all(gold[r["task"], r["setting"], r["index"]] == r["output"] for r in real)
    # the sample's test rows keep their hub index, including the hand-written QPR rows
    checked = [r for r in sample_rows if r["split"] == "test" and (r["task"], r["setting"], r["index"]) in gold]
    assert {r["task"] for r in checked} == {"Multiclass_Product_Classification", "Product_Matching",
                                            "Product_Substitute_Identification", "Product_Relation_Prediction",
                                            "Query_Product_Rank"}
    assert all(gold[r["task"], r["setting"], r["index"]] == r["output"] for r in checked)


def test_prompt_equals_ecellm_template_byte_for_byte(shared_dir):
    rows = load_rows(shared_dir / "test_rows_dev.jsonl", split="test", settings=None)
    rows += load_rows(shared_dir / "ave_train_100.jsonl", settings=None)
    with_options = [r for r in rows if r["options"]]
    without = [r for r in rows if not r["options"]]
    assert len(with_options) > 1000 and len(without) > 1000
    for r in rows:
        assert render_prompt(r) == ecellm_prompt(r)
    assert all("### Options:\n" + r["options"] + "\n\n### Response:\n" in render_prompt(r) for r in with_options)
    assert all("### Options:" not in render_prompt(r) for r in without)


def test_prompt_of_one_real_row_spelled_out(shared_dir):
    row = load_rows(shared_dir / "test_rows_dev.jsonl", split="test", tasks="PSI")[0]
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n" + row["instruction"] + "\n\n"
        "### Input:\n" + row["input"] + "\n\n"
        "### Response:\n")
    assert render_prompt(row) == expected
    assert row["input"].startswith('{"query": ')


# ---- prompt details -----------------------------------------------------------------------------------

def test_empty_options_and_braces_follow_ecellm():
    row = good_row(options="", input='{"q": "{instruction} {0}"}')
    assert render_prompt(row) == ecellm_prompt(row)            # "" is falsy in eCeLLM: no Options block
    assert '{"q": "{instruction} {0}"}' in render_prompt(row)   # inserted as is, never re-formatted
    row = good_row(options='["A: x", "B: {y}"]')
    assert render_prompt(row) == ecellm_prompt(row)


def test_one_shot_example_format():
    example = {"input": "EX IN", "options": '["A: a", "B: b"]', "output": "A: a"}
    row = good_row(options='["A: a", "B: b"]', few_shot_example=json.dumps(example),
                   setting="IND_Diverse_Instruction_1-shot")
    assert render_prompt(row) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAnswer yes or no.\n\n"
        "### Example input:\nEX IN\n\n### Example options:\n[\"A: a\", \"B: b\"]\n\n### Example response:\nA: a\n\n"
        "### Input:\n" + row["input"] + "\n\n### Options:\n[\"A: a\", \"B: b\"]\n\n### Response:\n")
    no_options = good_row(few_shot_example=json.dumps({"input": "EX {IN}", "output": "no"}))
    assert "### Example input:\nEX {IN}\n\n### Example response:\nno\n\n### Input:\n" in render_prompt(no_options)
    assert "Example options" not in render_prompt(no_options)
    raw = good_row(few_shot_example="not json")
    assert "### Instruction:\nAnswer yes or no.\n\n### Example:\nnot json\n\n### Input:\n" in render_prompt(raw)


def test_chat_template_wraps_the_alpaca_text():
    class ChatTok:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt=True):
            assert add_generation_prompt and len(messages) == 1 and messages[0]["role"] == "user"
            return "<user>" + messages[0]["content"] + "</user><assistant>"

    row = good_row()
    text = render_prompt(row, "chat", ChatTok())
    assert text == "<user>" + ecellm_prompt(row)[: -len("\n\n### Response:\n")] + "</user><assistant>"
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(row, "chat", None)
    with pytest.raises(ValueError, match="unknown template"):
        render_prompt(row, "vicuna")


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"options": 3}, "field 'options' must be a string or null, got int"),
    ({"input": None}, "field 'input' must be a string, got null"),
    ({"output": ["yes"]}, "field 'output' must be a string, got list"),
    ({"task": " "}, "field 'task' has unknown task ' '; valid: Attribute_Value_Extraction"),
    ({"setting": "IND_Diverse"}, "field 'setting' has unknown setting 'IND_Diverse'; valid: IND_Diverse_Instruction"),
    ({"split": "dev"}, "field 'split' has unknown split 'dev'"),
])
def test_invalid_row_is_reported_with_file_row_and_field(tmp_path, change, message, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [good_row(), good_row(**change), good_row()])
    with pytest.raises(DataError) as e:
        load_rows(path)
    assert f"{path} row 2: {message}" in str(e.value)
    assert "skip_invalid" in str(e.value)
    rows = load_rows(path, skip_invalid=True)
    assert len(rows) == 2 and [r["index"] for r in rows] == [0, 1]
    assert f"skipped 1 invalid rows (first: {path} row 2: {message}" in capsys.readouterr().err


def test_missing_field(tmp_path):
    row = good_row()
    del row["few_shot_example"]
    path = write_jsonl(tmp_path / "missing.jsonl", [good_row(), good_row(), row])
    with pytest.raises(DataError, match=r"missing.jsonl row 3: field 'few_shot_example' is missing"):
        load_rows(path)


def test_old_task_spellings_in_files_are_normalised(tmp_path):
    path = write_jsonl(tmp_path / "old.jsonl", [good_row(task="Product_Substitue_Identification"),
                                                good_row(task="Query_Product_Ranking")])
    assert [r["task"] for r in load_rows(path)] == ["Product_Substitute_Identification", "Query_Product_Rank"]


def test_not_json(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text("this is not json\nat all\n")
    with pytest.raises(DataError, match="notes.json: not valid JSON"):
        load_rows(bad)
    bad_lines = tmp_path / "notes.jsonl"
    bad_lines.write_text("this is not json\nat all\nreally\nnot\n")
    with pytest.raises(DataError, match="notes.jsonl: not a JSON or JSON Lines file"):
        load_rows(bad_lines)
    binary = tmp_path / "blob.json"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="blob.json: not a UTF-8 text file"):
        load_rows(binary)
    one_bad_line = tmp_path / "one.jsonl"
    one_bad_line.write_text(json.dumps(good_row()) + "\n{oops\n")
    with pytest.raises(DataError, match=r"one.jsonl row 2: not valid JSON"):
        load_rows(one_bad_line)
    assert len(load_rows(one_bad_line, skip_invalid=True)) == 1


def test_json_array_object_and_lines_read_alike(tmp_path):
    rows = [good_row(), good_row(output="no")]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows))
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"data": rows}))
    lines = write_jsonl(tmp_path / "c.json", rows)      # JSON Lines content in a .json file
    expected = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    assert load_rows(array) == load_rows(wrapped) == load_rows(lines) == expected


def test_parquet_reads_and_unreadable_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = read_rows(DEFAULT_SAMPLE)
    path = tmp_path / "sample.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "index"} for r in rows]), path)
    assert read_rows(path) == rows
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1" + b"\x00garbage" * 100)
    with pytest.raises(DataError, match="broken.parquet: cannot read it as Parquet"):
        load_rows(broken)
    wrong_type = tmp_path / "wrong.parquet"
    table = pa.Table.from_pylist([good_row(options=None)]).set_column(2, "options", pa.array([7]))
    pq.write_table(table, wrong_type)
    with pytest.raises(DataError, match="wrong.parquet row 1: field 'options' must be a string or null, got int"):
        load_rows(wrong_type)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "absent.jsonl")
    other = tmp_path / "rows.txt"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(other)


def test_hub_id_downloads_through_huggingface_hub(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, filename, repo_type=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        return str(DEFAULT_SAMPLE)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    rows = load_rows("NingLab/ECInstruct", tasks="AVE")
    assert calls == [("NingLab/ECInstruct", "dataset.json", "dataset")] and len(rows) == 35


def test_unreachable_hub_reads_the_cache_only_and_names_the_sample(monkeypatch):
    """No network: the cache alone is asked (no 25 s of retries), and the error points at the in-repo sample."""
    hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.errors as errors

    import model.hub

    asked = []

    def cache_only(repo_id, filename, repo_type=None, local_files_only=False, **kwargs):
        asked.append(local_files_only)
        raise errors.LocalEntryNotFoundError("not cached")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model.hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(hub, "hf_hub_download", cache_only)
    with pytest.raises(DataError) as e:
        load_rows("NingLab/ECInstruct")
    assert asked == [True]
    assert "the hub cannot be reached" in str(e.value) and "data/sample/ecinstruct_sample.jsonl" in str(e.value)


def imported_by(modules: str) -> set[str]:
    """The top-level names in sys.modules of a fresh interpreter after `import <modules>`."""
    code = f"import sys, {modules}; print(' '.join(sorted({{k.split('.')[0] for k in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


@pytest.mark.slow
def test_data_and_metrics_do_not_import_each_other():
    """The task names are shared through the top-level tasks.py: data/ imports no metrics module, and
    metrics/ (torch-free but for metrics.bertscore) imports neither data/ nor torch."""
    assert "metrics" not in imported_by("data, data.inspect")
    assert not {"data", "torch"} & imported_by("metrics, metrics.paper_tables")


# ---- the inspect command (no tokenizer) ---------------------------------------------------------------

def test_inspect_without_tokenizer(capsys):
    from data.inspect import main

    assert main(["--dataset", str(DEFAULT_SAMPLE), "--tasks", "SA,SR", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "Sentiment_Analysis" in out and "Sequential_Recommendation" in out and "characters" in out
    assert "### Response:\n[[" in out and "<EOS>]]" in out
    assert main(["--dataset", str(DEFAULT_SAMPLE), "--tasks", "nope"]) == 2
    assert "no rows match split=train tasks=nope" in capsys.readouterr().err
