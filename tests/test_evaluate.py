"""evaluate.py through its command-line entry points (`evaluate.main(argv)` in-process):

- generation end to end on CPU: the real SmolLM2-135M-Instruct GGUF on the in-repo sample (all 10
  tasks, IND and OOD), and a tiny random Llama with a LoRA adapter merged in; both write
  predictions.jsonl (one line per row), metrics.json (every task, both modes, n and n_invalid) and
  results.md (this run's row in the paper's tables);
- scoring mode on the real published SmolLM2-360M-EC outputs reproduces the study's numbers;
- the generator gives the same outputs at batch sizes 1 and 16;
- bad input stops with exit code 2 and a message that names the problem.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import evaluate
from data import DEFAULT_SAMPLE, load_rows, render_prompt
from lora import apply_lora, lora_layers, save_adapter
from metrics import ABBREV, TASKS
from metrics.paper_tables import IND_TASKS, OOD_TASKS
from model import load_model
from tiny import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_QPR_LABELS = DEFAULT_SAMPLE.with_name("qpr_label.json")   # eCeLLM's labels of the sample's QPR test items
IND, OOD, ONE_SHOT = "IND_Diverse_Instruction", "OOD_Diverse_Instruction", "IND_Diverse_Instruction_1-shot"
PRED_FIELDS = {"task", "setting", "index", "prompt_sha256", "output", "parsed", "valid", "gold", "truncated"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: on a busy machine two threads wait on each other (the real-model
    test took 170 s with two threads beside a training job, 15 s with one); the models here are small."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_args(model, out, *extra, settings=f"{IND},{OOD}") -> list[str]:
    """Generate on the in-repo sample's test rows: all tasks, short answers, the offline F_BERT encoder."""
    return ["--model", str(model), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "all", "--settings", settings,
            "--max-new-tokens", "8,AVE=24,AG=16", "--bertscore-model", "minilm",
            "--qpr-labels", str(SAMPLE_QPR_LABELS), "--out", str(out), *extra]


def expected_rows(settings: list[str], limit: int | None) -> list[dict]:
    """The sample's test rows evaluate.py selects: sorted by task, setting, index; the first `limit` of each block."""
    rows = load_rows(str(DEFAULT_SAMPLE), split="test", tasks="all", settings=settings)
    return evaluate.limit_rows(sorted(rows, key=lambda r: (r["task"], r["setting"], r["index"])), limit)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_run(out: Path, rows: list[dict], label: str) -> tuple[list[dict], dict]:
    """The three files of a generation run over `rows`, checked against each other; returns (predictions, metrics)."""
    for name in ("predictions.jsonl", "metrics.json", "results.md"):
        assert (out / name).is_file(), name
    preds = read_jsonl(out / "predictions.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    md = (out / "results.md").read_text()

    # predictions.jsonl: one line per row, with the prompt's hash, the raw output and its parse
    assert len(preds) == len(rows)
    assert Counter((p["task"], p["setting"], p["index"]) for p in preds) == \
        Counter((r["task"], r["setting"], r["index"]) for r in rows)
    by_key = {(r["task"], r["setting"], r["index"]): r for r in rows}
    for p in preds:
        assert set(p) == PRED_FIELDS
        row = by_key[p["task"], p["setting"], p["index"]]
        assert p["prompt_sha256"] == hashlib.sha256(render_prompt(row, "alpaca").encode("utf-8")).hexdigest()
        assert p["gold"] == row["output"]
        assert isinstance(p["output"], str) and isinstance(p["valid"], bool)

    # metrics.json: every (task, setting) block of the rows, both modes, n and n_invalid as in predictions.jsonl
    blocks = Counter((p["task"], p["setting"]) for p in preds)
    invalid = Counter((p["task"], p["setting"]) for p in preds if not p["valid"])
    results = metrics["results"]
    assert set(results) == {t for t, _ in blocks}
    for (task, setting), n in blocks.items():
        by_mode = results[task][setting]
        assert set(by_mode) == {"paper", "strict"}
        for mode in ("paper", "strict"):
            m = by_mode[mode]
            assert m["n"] == n and m["n_invalid"] == invalid[task, setting], (task, setting, mode)
            assert "score" in m and m["metric"]
    assert sum(len(s) for s in results.values()) == len(blocks)
    assert metrics["label"] == label and metrics["generation"]["greedy"] is True

    # results.md: this run's row (paper rules, then strict) under the paper's IND and OOD table headers
    for columns in (IND_TASKS, OOD_TASKS):
        assert "| model | source | " + " | ".join(columns) + " |" in md
    assert "### In-domain (IND_Diverse_Instruction)" in md and "### Out-of-domain (OOD_Diverse_Instruction)" in md
    assert md.count(f"| {label} | this run |") == 2 and md.count(f"| {label}, strict | this run, strict mode |") == 2
    for task in results:
        assert f"| {ABBREV[task]} | " in md
    return preds, metrics


def run_error(argv, capsys) -> tuple[int, str]:
    """(exit code, message) of a failing `python evaluate.py argv`: argparse exits 2 itself; the errors
    main() raises are the ones the script's `__main__` block prints and turns into exit code 2."""
    try:
        evaluate.main(argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return 2, str(e)
    pytest.fail(f"evaluate.main({argv}) did not fail")


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory) -> Path:
    """A tiny random Llama whose answers depend on the prompt: untied head, projections scaled to std 0.2.
    (At the usual std 0.02 with a tied head it echoes the prompt's last token, the same for every row.)"""
    from safetensors.torch import load_file, save_file

    folder = write_tiny_model(tmp_path_factory.mktemp("lively"), tie_word_embeddings=False)
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v * 10 if v.dim() == 2 and "embed" not in k else v for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def lively_adapter(lively_dir, tmp_path_factory) -> Path:
    """A LoRA adapter for the lively model, untrained but with random B (so merging it changes the outputs)."""
    model, _ = load_model(lively_dir)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(model, folder)
    return folder


# ---- generation end to end -------------------------------------------------------------------------

@pytest.mark.slow
def test_sample_end_to_end_with_the_real_smollm2(smollm2_gguf, tmp_path):
    """The real SmolLM2-135M GGUF on the sample's first test row of every task and setting: all three files, all 10 tasks."""
    out = tmp_path / "eval"
    label = "SmolLM2-135M sample"
    # batch 1: the sample's prompts are 120-700 tokens, and padding them together costs more CPU than it saves
    assert evaluate.main(sample_args(smollm2_gguf, out, "--limit", "1", "--batch-size", "1",
                                     "--model-name", label)) == 0
    rows = expected_rows([IND, OOD], 1)
    preds, metrics = check_run(out, rows, label)
    assert set(metrics["results"]) == set(TASKS)
    assert set(metrics["results"]["Product_Relation_Prediction"]) == {IND, OOD}
    assert metrics["bertscore"] == {"model": "sentence-transformers/all-MiniLM-L6-v2", "layer": 6}
    assert metrics["generation"]["max_new_tokens"] == 8
    assert metrics["generation"]["new_tokens"] > 0 and metrics["generation"]["truncated_prompts"] == 0
    assert any(p["output"].strip() for p in preds)   # a real model writes something


@pytest.mark.slow
def test_tiny_model_with_an_adapter(lively_dir, lively_adapter, tmp_path):
    """--model tiny --adapter DIR merges the adapter and writes the three files; random outputs are counted invalid."""
    settings = [IND, OOD, ONE_SHOT]
    common = ["--limit", "2", "--max-new-tokens", "12"]
    assert evaluate.main(sample_args(lively_dir, tmp_path / "adapted", "--adapter", str(lively_adapter), *common,
                                     settings=",".join(settings))) == 0
    rows = expected_rows(settings, 2)
    label = f"{lively_dir.name} + {'/'.join(lively_adapter.parts[-2:])}"
    preds, metrics = check_run(tmp_path / "adapted", rows, label)
    assert metrics["adapter"] == str(lively_adapter)
    assert f"adapter: `{lively_adapter}` (merged)" in (tmp_path / "adapted" / "results.md").read_text()
    assert set(metrics["results"]) == set(TASKS)
    n_invalid = sum(m[s]["paper"]["n_invalid"] for m in metrics["results"].values() for s in m)
    assert n_invalid == sum(not p["valid"] for p in preds) > 0

    # the adapter is really applied: the base model alone answers differently
    assert evaluate.main(sample_args(lively_dir, tmp_path / "base", *common, settings=",".join(settings))) == 0
    base = read_jsonl(tmp_path / "base" / "predictions.jsonl")
    assert [p["prompt_sha256"] for p in base] == [p["prompt_sha256"] for p in preds]
    assert [p["output"] for p in base] != [p["output"] for p in preds]


@pytest.mark.slow
def test_batch_size_1_and_16_give_the_same_outputs(lively_dir, tmp_path):
    """--batch-size 1 and 16 (left padding, KV cache) write identical outputs for every row."""
    outputs = {}
    for bs in (1, 16):
        out = tmp_path / f"bs{bs}"
        assert evaluate.main(sample_args(lively_dir, out, "--limit", "3", "--max-new-tokens", "10",
                                         "--batch-size", str(bs), settings=f"{IND},{OOD},{ONE_SHOT}")) == 0
        outputs[bs] = [(p["task"], p["setting"], p["index"], p["prompt_sha256"], p["output"])
                       for p in read_jsonl(out / "predictions.jsonl")]
    assert len(outputs[1]) > 16   # several batches at size 16, of prompts of very different lengths
    assert len({o[-1] for o in outputs[1]}) > len(outputs[1]) // 2   # the answers differ from row to row
    assert outputs[1] == outputs[16]


# ---- scoring a predictions file --------------------------------------------------------------------

@pytest.mark.slow
def test_published_predictions_reproduce_the_paper(shared_dir, tmp_path):
    """--predictions of the published SmolLM2-360M-EC outputs, gold from --gold, reproduces the study's Table 2/3 numbers."""
    out = tmp_path / "score"
    assert evaluate.main(["--predictions", str(shared_dir / "predictions_smollm2_360m.jsonl"),
                          "--gold", str(shared_dir / "gold_outputs.jsonl"),
                          "--qpr-labels", str(shared_dir / "qpr_label.json"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    results = metrics["results"]
    paper = {(ABBREV[t], s): by_mode["paper"]["score"] for t, by_setting in results.items()
             for s, by_mode in by_setting.items()}
    expected = {("PRP", IND): 0.302, ("PM", IND): 0.720, ("MPC", IND): 0.633, ("PSI", IND): 0.000,
                ("QPR", IND): 0.809, ("PRP", OOD): 0.200}
    assert {k: round(paper[k], 3) for k in expected} == expected
    # the gold file covers only five tasks: the others' predictions are skipped and counted, not scored
    skipped = metrics["skipped"]["no_gold_for_task_setting"]
    assert {key.split("/")[0] for key in skipped} == {"Attribute_Value_Extraction", "Sentiment_Analysis",
                                                      "Sequential_Recommendation", "Answerability_Prediction",
                                                      "Answer_Generation"}
    # predictions of settings not selected (defaults: IND_Diverse, OOD_Diverse) are counted too
    outside = metrics["skipped"]["outside_selected_tasks_settings"]
    assert outside and all(key.split("/")[1] not in (IND, OOD) for key in outside)
    assert metrics["gold"] == str(shared_dir / "gold_outputs.jsonl") and metrics["generation"] is None
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == sum(by_mode["paper"]["n"] for s in results.values() for by_mode in s.values())
    md = (out / "results.md").read_text()
    ind_row = next(line for line in md.splitlines() if line.startswith("| predictions_smollm2_360m | this run |"))
    cells = dict(zip(IND_TASKS, (c.strip() for c in ind_row.split("|")[3:-1])))
    assert cells["PRP"] == "**0.302**" and cells["QPR"] == "**0.809**" and cells["AVE"] == "–"


def test_sample_qpr_labels_are_ecellm_items_0_to_5(shared_dir):
    """The sample's qpr_label.json is eCeLLM's label list of QPR test items 0-5, the sample's QPR test rows."""
    shared = json.loads((shared_dir / "qpr_label.json").read_text())
    assert json.loads(SAMPLE_QPR_LABELS.read_text()) == shared[:6]


# ---- errors ----------------------------------------------------------------------------------------

@pytest.fixture()
def preds_file(tmp_path) -> Path:
    """Three predictions: PM items 0-1 and PRP item 0, IND_Diverse."""
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"task": "Product_Matching", "setting": IND, "index": 0, "prediction": "no"},
        {"task": "Product_Matching", "setting": IND, "index": 1, "prediction": "yes"},
        {"task": "Product_Relation_Prediction", "setting": IND, "index": 0, "prediction": "B"})))
    return path


def test_default_out_is_named(tmp_path):
    """No --out, as in train.py: a default folder, said on stderr; beside an adapter: runs/x/eval."""
    args = evaluate.parse_args(["--predictions", "preds.jsonl"])
    assert args.out == str(Path("runs") / "score" / "preds")
    args = evaluate.parse_args(["--adapter", str(tmp_path / "x" / "adapter")])
    assert args.out == str(tmp_path / "x" / "eval")
    args = evaluate.parse_args(["--model", "smollm2-360m", "--adapter", str(tmp_path / "x" / "best")])
    assert args.out == str(tmp_path / "x" / "eval-best")
    assert evaluate.parse_args(["--model", "smollm2-360m"]).out == str(Path("runs") / "eval" / "smollm2-360m")


def test_batch_size_0_is_a_usage_error_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "no-such-model-folder", "--batch-size", "0", "--out", "unused"])
    assert e.value.code == 2
    assert "--batch-size must be at least 1 (got 0)" in capsys.readouterr().err


def test_predictions_without_gold_are_refused(preds_file, tmp_path, capsys):
    """A --gold file lacking a predicted row, or a dataset with no gold at all for the predictions: exit 2, named."""
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"task": "PM", "setting": IND, "index": 0, "output": "no"}) + "\n"
                    + json.dumps({"task": "PRP", "setting": IND, "index": 0, "output": "B"}) + "\n")
    code, msg = run_error(["--predictions", str(preds_file), "--gold", str(gold), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and str(gold) in msg and "Product_Matching" in msg and "index 1" in msg

    code, msg = run_error(["--predictions", str(preds_file), "--dataset", str(DEFAULT_SAMPLE),
                           "--settings", OOD, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no prediction" in msg and "gold output" in msg and str(DEFAULT_SAMPLE) in msg
    assert not (tmp_path / "o").exists()   # nothing written by a refused run


def test_predictions_file_that_is_not_json(tmp_path, capsys):
    """A predictions line that is not JSON: exit 2, the message names the file and the line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "PM", "setting": IND, "index": 0, "prediction": "no"}) + "\n"
                   "{task: PM, oops\n")
    code, msg = run_error(["--predictions", str(bad), "--dataset", str(DEFAULT_SAMPLE), "--out", str(tmp_path / "o")],
                          capsys)
    assert code == 2 and f"{bad} line 2" in msg and "not valid JSON" in msg


def test_predictions_record_without_an_index(tmp_path, capsys):
    """A predictions record whose index is null: exit 2 (not a traceback), the message names the file and record."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "PM", "setting": IND, "index": 0, "prediction": "no"}) + "\n"
                   + json.dumps({"task": "PM", "setting": IND, "index": None, "prediction": "no"}) + "\n")
    code, msg = run_error(["--predictions", str(bad), "--dataset", str(DEFAULT_SAMPLE), "--out", str(tmp_path / "o")],
                          capsys)
    assert code == 2 and f"{bad} record 2:" in msg


@pytest.mark.slow
def test_the_script_exits_2_with_one_error_line(tmp_path):
    """`python evaluate.py` itself (a real process): a bad predictions file gives exit code 2 and 'evaluate.py: error:'."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--predictions", str(bad),
                           "--dataset", str(DEFAULT_SAMPLE), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"evaluate.py: error: {bad} line 1: not valid JSON")
    assert "Traceback" not in proc.stderr


def test_unknown_and_mismatched_task_names(preds_file, tmp_path, capsys):
    """--tasks with an unknown name, a predictions row with an unknown task, --tasks naming a task with no
    predictions: exit 2, the message names the task."""
    out = str(tmp_path / "o")
    code, err = run_error(["--predictions", str(preds_file), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "PM,XYZ",
                           "--out", out], capsys)
    assert code == 2 and "for task(s) XYZ" in err

    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"task": "Product_Maching", "setting": IND, "index": 0, "prediction": "no"}) + "\n")
    code, msg = run_error(["--predictions", str(odd), "--dataset", str(DEFAULT_SAMPLE), "--out", out], capsys)
    # an unknown task name is a task of one's own: here one with no gold output, which the message names
    assert code == 2 and f"{odd} has a gold output" in msg and "Product_Maching/IND_Diverse_Instruction 1" in msg

    code, msg = run_error(["--predictions", str(preds_file), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "PM,SA",
                           "--out", out], capsys)
    assert code == 2 and "Sentiment_Analysis" in msg and "Product_Matching" not in msg


def test_adapter_folder_without_adapter_files(tiny_dir, tmp_path, capsys):
    """--adapter naming a folder with no adapter_config.json: exit 2, the message names the missing file."""
    empty = tmp_path / "not_an_adapter"
    empty.mkdir()
    code, msg = run_error(["--model", str(tiny_dir), "--adapter", str(empty), "--dataset", str(DEFAULT_SAMPLE),
                           "--tasks", "PM", "--settings", IND, "--limit", "1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and str(empty / "adapter_config.json") in msg
    assert not (tmp_path / "o").exists()


def test_unknown_setting_in_predictions_is_refused(preds_file, tmp_path, capsys):
    """A misspelt setting would otherwise match no selection and vanish from the scores."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(preds_file.read_text() + json.dumps(
        {"task": "Product_Matching", "setting": "ind_diverse_instruction", "index": 2, "prediction": "no"}) + "\n")
    code, err = run_error(["--predictions", str(bad), "--dataset", str(DEFAULT_SAMPLE), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown ECInstruct setting(s) 'ind_diverse_instruction'" in err and str(bad) in err


@pytest.mark.parametrize("proxy", [None, "sentence-transformers/all-MiniLM-L6-v2"])
def test_chart_marks_a_stand_in_f_bert(tmp_path, monkeypatch, proxy):
    """results.png: AG scored with another encoder than the paper's is cross-hatched and its tick reads AG†."""
    import matplotlib.figure

    seen = {}

    def capture(fig, path, **kwargs):
        ax = fig.axes[0]
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        mine = [b for b in ax.patches if b.get_facecolor()[:3] == (0.0, 0.0, 0.0)]   # this run's bars: black
        seen.update(ticks=ticks, hatch=mine[ticks.index("AG†" if proxy else "AG")].get_hatch(), title=" ".join(t.get_text() for t in fig.texts))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    results = {"Answer_Generation": {"IND_Diverse_Instruction": {"paper": {"score": 0.8}, "strict": {"score": 0.8}}}}
    assert evaluate.plot_results(results, "mine", tmp_path / "results.png", ag_proxy=proxy)
    assert ("AG†" in seen["ticks"]) == bool(proxy) and ("AG" in seen["ticks"]) == (not proxy)
    assert seen["hatch"] == ("xx" if proxy else None)
    assert ("a proxy not comparable" in seen["title"]) == bool(proxy)
