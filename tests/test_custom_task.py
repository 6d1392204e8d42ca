"""Your own task: rows of any task name in .jsonl/.json/.csv/.parquet, trained, evaluated by a task spec and
answered by predict.py, on a tiny random Llama; the task spec's metrics against their formulas and scikit-learn;
every refusal before a weight loads; the Walmart-Amazon rows of experiments/walmart-amazon-135m.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pytest

import evaluate
import predict
import train
from data import DataError, read_rows, select_rows
from data.ecinstruct import hold_out
from metrics.custom import (DEFAULT_SPEC, TaskSpec, check_gold, majority_answer, norm, parse_task_spec,
                            score_custom, token_f1)

ROOT = Path(__file__).resolve().parents[1]
COLORS = ["red", "blue", "green", "black", "white"]
THINGS = ["shirt", "hat", "mug", "lamp", "sock", "bag"]


def extraction_rows(n: int, seed: int = 0, split: str | None = None) -> list[dict]:
    """A second kind of task: extract the colour word from a short product title (exact_match / token_f1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color, thing = rng.choice(COLORS), rng.choice(THINGS)
        row = {"instruction": "Extract the color of the product.", "input": f"{thing} in {color}",
               "output": color, "task": "color_extraction"}
        if split:
            row["split"] = split
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in columns})
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- rows ---------------------------------------------------------------------------------------------

def test_custom_rows_in_every_format(tmp_path):
    rows = extraction_rows(6, split="train")
    rows[1].pop("split")                       # no split: None
    rows[2]["setting"] = "shop_a"              # a setting of one's own
    rows[3]["input"] = ""                      # input may be empty
    del rows[4]["input"]                       # or absent
    columns = ["instruction", "input", "output", "task", "split", "setting"]
    files = [write_jsonl(tmp_path / "r.jsonl", rows), write_csv(tmp_path / "r.csv", rows, columns)]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    files.append(tmp_path / "r.json")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), tmp_path / "r.parquet")
    files.append(tmp_path / "r.parquet")
    for path in files:
        got = read_rows(path)
        assert [r["row"] for r in got] == [1, 2, 3, 4, 5, 6], path
        assert [r["split"] for r in got] == ["train", None, "train", "train", "train", "train"], path
        assert [r["setting"] for r in got] == ["default", "default", "shop_a", "default", "default", "default"], path
        assert got[4]["input"] == "" and got[4]["options"] is None and got[0]["task"] == "color_extraction", path
        assert [r["output"] for r in got] == [r["output"] for r in rows], path


@pytest.mark.parametrize("change, field, problem", [
    (lambda r: r.pop("instruction"), "instruction", "is missing"),
    (lambda r: r.update(instruction=5), "instruction", "must be a string, got int"),
    (lambda r: r.update(input=["a"]), "input", "must be a string, got list"),
    (lambda r: r.pop("output"), "output", "is missing"),
    (lambda r: r.update(output=None), "output", "is missing"),
    (lambda r: r.update(output="  "), "output", "is empty"),
    (lambda r: r.update(split="dev-set"), "split", "unknown split"),
    (lambda r: r.update(task="a,b"), "task", "without commas"),
    (lambda r: r.update(setting=3), "setting", "must be a string"),
])
def test_a_bad_custom_row_is_named_by_file_row_and_field(tmp_path, change, field, problem):
    rows = extraction_rows(4, split="train")
    change(rows[2])
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_rows(path)
    message = str(e.value)
    assert f"{path} row 3: field '{field}'" in message and problem in message


def test_a_row_to_predict_needs_no_output(tmp_path):
    rows = extraction_rows(3)
    rows[1].pop("output")
    path = write_csv(tmp_path / "p.csv", rows, ["instruction", "input", "output", "task"])
    with pytest.raises(DataError, match=r"row 2: field 'output' is missing"):
        read_rows(path)
    got = read_rows(path, need_output=False)
    assert [r["output"] for r in got] == [rows[0]["output"], None, rows[2]["output"]]


def test_a_csv_row_with_more_cells_than_its_header_is_named(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("instruction,output,task\nsay it,yes,t\nsay it,yes,t,extra\n")
    with pytest.raises(DataError, match=r"r.csv row 2: more cells than the header"):
        read_rows(path)


def test_settings_filter_rows_of_their_own_kind(tmp_path):
    ecinstruct = [r for r in read_rows(ROOT / "data/sample/ecinstruct_sample.jsonl") if r["split"] == "train"]
    custom = read_rows(write_jsonl(tmp_path / "c.jsonl", extraction_rows(4, split="train")
                                   + [dict(extraction_rows(1, split="train")[0], setting="shop_b")]))
    rows = ecinstruct + custom
    # the default IND_Diverse_Instruction filters ECInstruct rows and leaves the custom task's rows whole
    chosen = select_rows(rows, split="train", tasks="all", settings=["IND_Diverse_Instruction"])
    assert {r["setting"] for r in chosen if r["task"] in ("color_extraction",)} == {"default", "shop_b"}
    assert {r["setting"] for r in chosen if r["task"] != "color_extraction"} == {"IND_Diverse_Instruction"}
    # a custom setting named: custom rows filtered by it, ECInstruct rows whole
    chosen = select_rows(rows, split="train", tasks="color_extraction,PM", settings="shop_b")
    assert [r["setting"] for r in chosen if r["task"] == "color_extraction"] == ["shop_b"]
    assert {r["task"] for r in chosen} == {"color_extraction", "Product_Matching"}
    with pytest.raises(DataError, match=r"no rows match .* holds: train: .*color_extraction/default 4"):
        select_rows(rows, split="train", tasks="colour_extraction", settings=None)
    with pytest.raises(DataError, match="unknown setting 'IND_Divers'"):
        select_rows(rows, split="train", tasks="all", settings="IND_Divers")


def test_hold_out_is_seeded_per_task_and_keeps_file_order(tmp_path):
    rows = read_rows(write_jsonl(tmp_path / "u.jsonl", extraction_rows(40) + [
        dict(r, task="tiny_task") for r in extraction_rows(5, seed=1)]))
    train_a, val_a = hold_out(rows, seed=7)
    train_b, val_b = hold_out(rows, seed=7)
    _, val_c = hold_out(rows, seed=8)
    assert [r["row"] for r in val_a] == [r["row"] for r in val_b] != [r["row"] for r in val_c]
    assert sum(r["task"] == "color_extraction" for r in val_a) == 4   # 10% of 40
    assert not any(r["task"] == "tiny_task" for r in val_a)           # fewer than 10 rows: none held out
    assert len(train_a) + len(val_a) == len(rows)
    assert [r["row"] for r in train_a] == sorted(r["row"] for r in train_a)
    assert {r["split"] for r in train_a} == {"train"} and {r["split"] for r in val_a} == {"val"}


# ---- metrics of a task spec ----------------------------------------------------------------------------

def test_spec_metrics_against_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    labels = ["yes", "no", "maybe"]
    gold = [rng.choice(labels) for _ in range(200)]
    pred = [rng.choice(labels + ["Yes ", "  NO", "what?"]) for _ in range(200)]
    spec = TaskSpec("f1", tuple(labels), "yes")
    valid = [norm(p) in labels for p in pred]
    kept_gold = [g for g, v in zip(gold, valid) if v]
    kept_pred = [norm(p) for p, v in zip(pred, valid) if v]
    paper = score_custom(spec, pred, gold, mode="paper")
    assert paper["n_invalid"] == valid.count(False) and paper["n_scored"] == len(kept_gold)
    assert paper["score"] == pytest.approx(f1_score(kept_gold, kept_pred, labels=["yes"], average=None)[0])
    strict = score_custom(spec, pred, gold, mode="strict")
    all_pred = [norm(p) if v else "invalid" for p, v in zip(pred, valid)]
    assert strict["score"] == pytest.approx(f1_score(gold, all_pred, labels=["yes"], average=None)[0])
    macro = score_custom(TaskSpec("macro_f1", tuple(labels)), pred, gold, mode="strict")
    assert macro["score"] == pytest.approx(f1_score(gold, all_pred, labels=labels, average="macro"))
    acc = score_custom(TaskSpec("accuracy", tuple(labels)), pred, gold, mode="paper")
    assert acc["score"] == pytest.approx(accuracy_score(kept_gold, kept_pred))


def test_exact_match_and_token_f1_formulas():
    # a non-text answer (a JSON null in a predictions file) is invalid: left out by paper, wrong by strict
    outputs, gold = ["  Red ", "blue", None], ["red", "Blue", "green"]
    assert score_custom(DEFAULT_SPEC, outputs, gold, mode="strict")["score"] == pytest.approx(2 / 3)
    assert score_custom(DEFAULT_SPEC, outputs, gold, mode="paper")["score"] == 1.0
    # SQuAD token F1: "dark red shirt" vs "red shirt": common 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("dark red shirt", "red shirt") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("", "red") == 0.0 and token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    spec = TaskSpec("token_f1")
    got = score_custom(spec, ["Dark  RED shirt", None], ["red shirt", "blue"])
    assert got["score"] == pytest.approx(0.4) and got["n_invalid"] == 1
    assert got == score_custom(spec, ["Dark  RED shirt", None], ["red shirt", "blue"], mode="strict") | {"mode": "paper"}
    assert majority_answer(["No", "yes", "no ", "YES", "no"]) == "no"


@pytest.mark.parametrize("spec, message", [
    ({"t": {"metric": "bleu"}}, "unknown metric 'bleu'"),
    ({"t": {"metric": "f1", "labels": ["yes", "no"]}}, "needs \"positive\""),
    ({"t": {"metric": "f1", "labels": ["yes", "no"], "positive": "maybe"}}, "not one of the labels"),
    ({"t": {"metric": "accuracy", "labels": ["Yes", "yes"]}}, "the same answer twice"),
    ({"t": {"metric": "accuracy", "label": ["yes"]}}, "unknown field(s) label"),
    ({"t": "f1"}, "expected an object"),
    ([], "a task spec is a JSON object"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError) as e:
        parse_task_spec(spec, "spec.json")
    assert "spec.json" in str(e.value) and message in str(e.value)


def test_gold_outside_the_labels_is_named():
    with pytest.raises(ValueError, match=r"rows.csv row 7: field 'output' is 'perhaps', not one of"):
        check_gold(TaskSpec("f1", ("yes", "no"), "yes"), [("rows.csv row 6", "Yes"), ("rows.csv row 7", "perhaps")])


# ---- the flow: train, evaluate with a spec, predict ------------------------------------------------------

def train_args(model_dir, rows, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--dataset", str(rows), "--quant", "none", "--batch-size", "8", "--cutoff", "256",
            "--micro-batch-tokens", "1024", "--cache-dir", "", "--out", str(out), "--seed", "1", "--no-progress",
            "--lr", "3e-3", *extra]


@pytest.fixture(scope="module")
def color_run(tmp_path_factory, tiny_dir):
    """A few steps of training on the extraction task, rows without a split (train.py holds out val itself)."""
    work = tmp_path_factory.mktemp("color")
    rows = write_jsonl(work / "rows.jsonl", extraction_rows(40))
    test = write_jsonl(work / "test.jsonl", extraction_rows(12, seed=5, split="test"))
    assert train.main(train_args(tiny_dir, rows, work / "run", "--tasks", "color_extraction", "--max-steps", "4")) == 0
    return work, rows, test


def test_train_holds_out_unsplit_rows_and_writes_the_usual_run(color_run):
    work, _, _ = color_run
    run = work / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train_rows"] == 36 and config["val_rows"] == 4
    for name in ("adapter/adapter_model.safetensors", "adapter/base.json", "best", "train_log.jsonl", "train_run.json"):
        assert (run / name).exists(), name


def test_init_adapter_starts_from_the_adapters_weights(color_run, tiny_dir, capsys):
    """--init-adapter: step 0's validation loss is the adapter's own last one (the same rows, the same weights), not the
    fresh init's; other r, another base's adapter and a resume with another initial adapter are refused."""
    from safetensors.torch import load_file
    work, rows, _ = color_run
    run, more = work / "run", work / "more"
    flags = ("--tasks", "color_extraction", "--max-steps", "1", "--eval-every", "1")
    assert train.main(train_args(tiny_dir, rows, more, *flags, "--init-adapter", str(run / "adapter"))) == 0
    first = [json.loads(line) for line in (more / "val_log.jsonl").read_text().splitlines()][0]
    last = [json.loads(line) for line in (run / "val_log.jsonl").read_text().splitlines()][-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(last["val_loss"], rel=1e-4)
    config = json.loads((more / "config.json").read_text())
    assert len(config["init_adapter_sha256"]) == 16
    moved = load_file(str(more / "adapter" / "adapter_model.safetensors"))
    assert moved.keys() == load_file(str(run / "adapter" / "adapter_model.safetensors")).keys()

    with pytest.raises(SystemExit):   # r differs from the adapter's
        train.main(train_args(tiny_dir, rows, work / "r8", *flags, "--init-adapter", str(run / "adapter"),
                              "--lora-r", "8"))
    assert "its r is 16, this run's --lora-r is 8" in capsys.readouterr().err
    other = work / "other-adapter"   # the same adapter, recorded as trained on another base
    other.mkdir()
    for f in (run / "adapter").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    base = json.loads((other / "base.json").read_text())
    (other / "base.json").write_text(json.dumps(base | {"base_fingerprint": "0" * 16}))
    with pytest.raises(SystemExit):
        train.main(train_args(tiny_dir, rows, work / "other", *flags, "--init-adapter", str(other)))
    assert "trained on another base" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # resuming `more` from the other adapter's weights is another run
        train.main(train_args(tiny_dir, rows, more, *flags, "--init-adapter", str(work / "more" / "adapter"),
                              "--resume", "auto"))
    assert "--init-adapter" in capsys.readouterr().err


def test_dry_run_shows_a_rendered_custom_row(color_run, tiny_dir, capsys):
    work, rows, _ = color_run
    assert train.main(train_args(tiny_dir, rows, work / "dry", "--tasks", "color_extraction", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "color_extraction" in out and "Extract the color of the product." in out and "### Response:" in out


def test_evaluate_with_a_spec_scores_both_modes_and_the_majority(color_run, tmp_path):
    work, _, test = color_run
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"color_extraction": {"metric": "token_f1"}}))
    out = tmp_path / "eval"
    assert evaluate.main(["--adapter", str(work / "run/adapter"), "--dataset", str(test), "--tasks", "color_extraction",
                          "--task-spec", str(spec), "--max-new-tokens", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    block = metrics["results"]["color_extraction"]["default"]
    assert block["paper"]["metric"] == "token_f1" and block["paper"]["n"] == 12
    assert block["majority"]["from"] == "the scored rows"   # the test file has no train rows
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    expected = sum(token_f1(norm(p["output"]), norm(p["gold"])) for p in preds) / 12
    assert block["paper"]["score"] == pytest.approx(expected)
    md = (out / "results.md").read_text()
    assert "## Your tasks" in md and "token_f1" in md and "Compared with the published results" not in md
    assert (out / "results.png").is_file()
    # without a spec: exact match after trimming and case folding, said in the table
    out2 = tmp_path / "eval2"
    assert evaluate.main(["--adapter", str(work / "run/adapter"), "--dataset", str(test), "--max-new-tokens", "4",
                          "--out", str(out2)]) == 0
    assert "exact_match, after trimming and case folding (no task spec)" in (out2 / "results.md").read_text()


def test_predict_from_csv_to_csv_resumes_and_keeps_every_column(color_run, tmp_path, monkeypatch):
    work, _, _ = color_run
    rows = extraction_rows(7, seed=9)
    for r in rows:
        r.pop("output")
    rows[3]["sku"] = "A-17"
    src = write_csv(tmp_path / "new.csv", rows, ["sku", "instruction", "input", "task", "output"])
    out = tmp_path / "answers.csv"
    argv = ["--adapter", str(work / "run/adapter"), "--dataset", str(src), "--max-new-tokens", "3", "--batch-size", "2",
            "--out", str(out)]
    # a run killed after its first batches leaves a partial file and no answers; the rerun generates only the rest
    import model as gen   # evaluate.generate_records takes generate_batched from the package when it runs
    real = gen.generate_batched

    def dies_after_first_batch(*a, on_batch=None, **k):
        def once(positions, outputs):
            on_batch(positions, outputs)
            raise KeyboardInterrupt
        return real(*a, on_batch=once, **k)

    monkeypatch.setattr(gen, "generate_batched", dies_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        predict.main(argv)
    assert not out.exists() and (tmp_path / "answers.csv.partial.jsonl").is_file()
    monkeypatch.setattr(gen, "generate_batched", real)
    assert predict.main(argv) == 0
    with open(out, newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["sku", "instruction", "input", "task", "output", "prediction"]
    assert [g["input"] for g in got] == [r["input"] for r in rows] and got[3]["sku"] == "A-17"
    assert not (tmp_path / "answers.csv.partial.jsonl").exists()
    # the same answers as evaluate.py's generator gives the same rows, and OUT is not replaced without --overwrite
    with pytest.raises(SystemExit):
        predict.main(argv)
    assert predict.main(argv + ["--overwrite"]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        assert [g["prediction"] for g in csv.DictReader(f)] == [g["prediction"] for g in got]


def test_predict_refuses_to_write_over_its_input(color_run, tmp_path, capsys):
    work, rows, _ = color_run
    with pytest.raises(SystemExit) as e:
        predict.main(["--adapter", str(work / "run/adapter"), "--dataset", str(rows), "--out", str(rows), "--overwrite"])
    assert e.value.code == 2 and "must not be overwritten" in capsys.readouterr().err


# ---- refusals before any weight loads ------------------------------------------------------------------------

@pytest.fixture()
def no_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(evaluate, "load_for_generation", refuse)


@pytest.mark.parametrize("spec, message", [
    ({"color_extraction": {"metric": "bleu"}}, "unknown metric 'bleu'"),
    ({"color_extraction": {"metric": "accuracy", "labels": ["red", "blue"]}}, "row 3: field 'output' is 'green'"),
    ({"colour_extraction": {"metric": "accuracy"}}, "task 'colour_extraction' is not in"),
    ({"PM": {"metric": "accuracy"}}, "one of ECInstruct's"),
])
def test_evaluate_refuses_a_bad_spec_before_loading_weights(tiny_dir, tmp_path, no_weights, spec, message, capsys):
    rows = [dict(r, output=c) for r, c in zip(extraction_rows(4, split="test"), ["red", "blue", "green", "red"])]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError) as e:
        evaluate.main(["--model", str(tiny_dir), "--dataset", str(data), "--task-spec", str(tmp_path / "spec.json"),
                       "--out", str(tmp_path / "e")])
    assert message in str(e.value)


def test_decode_threshold_needs_val_rows_and_a_binary_spec(tiny_dir, tmp_path, no_weights):
    rows = [dict(r, output="yes" if i % 3 else "no") for i, r in enumerate(extraction_rows(6, split="test"))]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "spec.json").write_text(json.dumps({"color_extraction": {"metric": "f1", "labels": ["yes", "no"],
                                                                         "positive": "yes"}}))
    with pytest.raises(ValueError, match="has none of task 'color_extraction'"):
        evaluate.main(["--model", str(tiny_dir), "--dataset", str(data), "--task-spec", str(tmp_path / "spec.json"),
                       "--decode", "threshold", "--out", str(tmp_path / "e")])
    (tmp_path / "spec2.json").write_text(json.dumps({"color_extraction": {"metric": "exact_match"}}))
    with pytest.raises(ValueError, match="needs a task whose --task-spec entry has two labels"):
        evaluate.main(["--model", str(tiny_dir), "--dataset", str(data), "--task-spec", str(tmp_path / "spec2.json"),
                       "--decode", "threshold", "--out", str(tmp_path / "e")])


def test_decode_threshold_answers_from_the_positive_probability(tiny_dir, tmp_path):
    """A yes/no task: the threshold chosen on val rows, each answer p(yes) >= t, and the probabilities recorded."""
    rng = random.Random(3)
    rows = [{"instruction": "Same product? Answer yes or no.", "input": f"{rng.choice(THINGS)} {rng.choice(COLORS)}",
             "output": rng.choice(["yes", "no"]), "task": "pair", "split": split}
            for split in ["val"] * 10 + ["test"] * 8]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"pair": {"metric": "f1", "labels": ["yes", "no"], "positive": "yes"}}))
    out = tmp_path / "e"
    assert evaluate.main(["--model", str(tiny_dir), "--dataset", str(data), "--task-spec", str(spec),
                          "--decode", "threshold", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    decided = metrics["generation"]["label_decoding"]["pair"]
    assert decided["val_rows"] == 10 and 0 <= decided["threshold"] <= 1
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8
    for p in preds:
        assert p["output"] == ("yes" if p["label_probs"]["yes"] >= decided["threshold"] - 1e-6 else "no")
        assert p["label_probs"]["yes"] + p["label_probs"]["no"] == pytest.approx(1, abs=1e-5)
    assert "threshold" in (out / "results.md").read_text()


# ---- the Walmart-Amazon experiment's rows ----------------------------------------------------------------------

def test_walmart_amazon_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments" / "walmart-amazon-135m"))
    import make_rows

    src = tmp_path / "src"
    src.mkdir()
    left = "COL title VAL sony 16gb sd card COL category VAL usb drives COL brand VAL sony COL modelno VAL sf16n4 COL price VAL 9.5"
    right = "COL title VAL sony sf16n4 16 gb sdhc COL category VAL memory COL brand VAL COL modelno VAL COL price VAL "
    for name, labels in (("train.txt", [1, 0, 0, 0, 0]), ("valid.txt", [0, 1]), ("test.txt", [1])):
        (src / name).write_text("".join(f"{left}\t{right}\t{label}\n" for label in labels))
    assert make_rows.main([str(src), str(tmp_path / "out"), "--train-negatives-per-match", "2"]) == 0
    rows = read_rows(tmp_path / "out" / "rows.jsonl")
    assert [r["split"] for r in rows].count("train") == 3 and [r["output"] for r in rows[:3]].count("yes") == 1
    assert rows[0]["input"] == ("Walmart: sony 16gb sd card | brand: sony | model: sf16n4 | price: 9.5\n"
                                "Amazon: sony sf16n4 16 gb sdhc | brand: - | model: - | price: -")
    specs = evaluate.read_task_spec(str(tmp_path / "out" / "task_spec.json"))
    assert specs["walmart_amazon"].positive == "yes"
    (src / "test.txt").write_text("COL title VAL x\tCOL title VAL y\t1\n")
    assert make_rows.main([str(src), str(tmp_path / "bad")]) == 2


def test_f_bert_goes_through_the_answer_generation_scorer():
    """f_bert scores every row (an invalid answer as the empty text) with the same scorer as ECInstruct's AG."""
    seen = []

    def scorer(candidates, references):
        seen.append(list(candidates))
        return [1.0 if c == r else 0.25 for c, r in zip(candidates, references)]
    got = score_custom(TaskSpec("f_bert"), ["red shirt", None, "hat"], ["red shirt", "mug", "lamp"], bertscorer=scorer)
    assert seen == [["red shirt", "", "hat"]]
    assert got["score"] == pytest.approx(0.5) and got["n_scored"] == 3 and got["n_invalid"] == 1
    with pytest.raises(ValueError, match="f_bert needs an F_BERT encoder"):
        score_custom(TaskSpec("f_bert"), ["a"], ["a"])
