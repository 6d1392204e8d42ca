"""The base an adapter was trained on, and the runs that must not mix bases.

What this file proves, on a tiny random Llama on the CPU:
- train.py writes base.json beside every adapter it saves (adapter/, best/, each checkpoint): the base's
  source, its quantization, the dtype it was quantized from, the compute dtype and a fingerprint;
- evaluate.py and export.py take --quant (and --model) from it: an adapter trained on an NF4 base is
  evaluated on an NF4 base unless told otherwise, and told otherwise they say so in one line; told the
  same, they say nothing;
- a resumed run refuses another dtype, another quantization and another validation set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import evaluate
import export
import train
from model import load_model
from test_train import base_args, run_error, write_rows

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "ecinstruct_sample.jsonl"
EVAL = ["--dataset", str(SAMPLE), "--tasks", "PM", "--settings", "IND_Diverse_Instruction", "--limit", "2",
        "--max-new-tokens", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "rows.jsonl")


@pytest.fixture(scope="module")
def nf4_run(tiny_dir, rows_file, tmp_path_factory) -> Path:
    """Two steps of QLoRA (NF4 base, fp32 on the CPU) with validation: adapter/, best/, checkpoints."""
    out = tmp_path_factory.mktemp("nf4") / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--quant", "nf4", "--dtype", "fp32", "--max-steps", "2")) == 0
    return out


def test_every_adapter_records_its_base(nf4_run, tiny_dir):
    from lora import base_fingerprint, read_base_record

    folders = [nf4_run / "adapter", nf4_run / "best", *(nf4_run / "checkpoints").glob("step-*/adapter")]
    assert len(folders) >= 3
    model, _ = load_model(tiny_dir)
    for folder in folders:
        record = read_base_record(folder)
        assert record["base_checkpoint"] == str(tiny_dir) and record["base_model"] is None   # a local folder
        assert record["quantization"] == {"method": "nf4", "double_quantization": True, "blocksize": 64,
                                          "quantized_from": "float32"}
        assert record["compute_dtype"] == "float32"
        assert record["base_fingerprint"] == base_fingerprint(model)
    # the fingerprint is the checkpoint's, whatever the dtype it is loaded in
    assert base_fingerprint(load_model(tiny_dir, dtype=torch.bfloat16)[0]) == base_fingerprint(model)


def evaluated_quant(out: Path) -> str:
    return json.loads((out / "metrics.json").read_text())["generation"]["quant"]


def test_evaluate_takes_the_quantization_from_the_adapter(nf4_run, tiny_dir, tmp_path, capsys):
    """No --quant: the NF4 base the adapter was trained on (today's default was the dense base, silently)."""
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(tiny_dir), "--adapter", str(nf4_run / "adapter"), *EVAL, "--out", str(out)]) == 0
    assert evaluated_quant(out) == "nf4"
    assert "warning" not in capsys.readouterr().err


def test_evaluate_without_model_uses_the_recorded_base(nf4_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--adapter", str(nf4_run / "adapter"), *EVAL, "--out", str(out)]) == 0
    assert evaluated_quant(out) == "nf4"
    assert "warning" not in capsys.readouterr().err


def test_evaluate_says_so_when_told_another_quantization(nf4_run, tiny_dir, tmp_path, capsys):
    """--quant none on an NF4-trained adapter: done as asked, with one warning line naming both."""
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(tiny_dir), "--adapter", str(nf4_run / "adapter"), "--quant", "none", *EVAL,
                          "--out", str(out)]) == 0
    assert evaluated_quant(out) == "none"
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "was trained on an NF4 base (quantized from float32" in warnings[0] and "--quant none" in warnings[0]


def test_evaluate_agreeing_flags_print_nothing_extra(nf4_run, tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(tiny_dir), "--adapter", str(nf4_run / "adapter"), "--quant", "nf4",
                          "--dtype", "float32", *EVAL, "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_evaluate_warns_on_another_base(nf4_run, tmp_path, capsys):
    """A base with the same shapes but other weights: the fingerprint differs, one warning line."""
    from tiny import write_tiny_model

    other = write_tiny_model(tmp_path / "other", seed=7)
    assert evaluate.main(["--model", str(other), "--adapter", str(nf4_run / "adapter"), *EVAL,
                          "--out", str(tmp_path / "eval")]) == 0
    err = capsys.readouterr().err
    assert f"warning: --model {other} is not the base" in err


def test_export_takes_the_quantization_from_the_adapter(nf4_run, tiny_dir, tmp_path):
    """export.py without --quant merges into the NF4 base, as export.py --quant nf4 does."""
    from safetensors.torch import load_file

    adapter = str(nf4_run / "adapter")
    assert export.main(["--model", str(tiny_dir), "--adapter", adapter, "--format", "hf", "--out",
                        str(tmp_path / "default")]) == 0
    assert export.main(["--model", str(tiny_dir), "--adapter", adapter, "--quant", "nf4", "--format", "hf", "--out",
                        str(tmp_path / "nf4")]) == 0
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("default", "nf4"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- resume: what a checkpoint means must not change ----------------------------------------------------

@pytest.fixture()
def one_step_run(tiny_dir, rows_file, tmp_path) -> Path:
    out = tmp_path / "run"
    assert train.main(base_args(tiny_dir, rows_file, out, "--max-steps", "2", "--save-every", "1",
                                "--dtype", "fp32")) == 0
    return out


def test_resume_refuses_another_dtype(tiny_dir, rows_file, one_step_run, capsys):
    code, err = run_error(base_args(tiny_dir, rows_file, one_step_run, "--max-steps", "3", "--dtype", "bf16",
                                    "--resume", "auto"), capsys)
    assert code == 2 and "holds a different run" in err and "float32 there, bfloat16 now" in err


def test_resume_refuses_another_quantization(tiny_dir, rows_file, one_step_run, capsys):
    code, err = run_error(base_args(tiny_dir, rows_file, one_step_run, "--max-steps", "3", "--quant", "nf4",
                                    "--resume", "auto"), capsys)
    assert code == 2 and "--quant 'none' there, 'nf4' now" in err


def test_resume_refuses_another_validation_size(tiny_dir, rows_file, one_step_run, capsys):
    code, err = run_error(base_args(tiny_dir, rows_file, one_step_run, "--max-steps", "3", "--val-size", "4",
                                    "--resume", "auto"), capsys)
    assert code == 2 and "--val-size 8 there, 4 now" in err


def test_resume_refuses_other_validation_rows(tiny_dir, rows_file, one_step_run, tmp_path, capsys):
    """The same flags over a file whose val rows were edited (the training rows unchanged): refused."""
    edited = tmp_path / "rows.jsonl"
    shutil.copy(rows_file, edited)
    rows = [json.loads(line) for line in edited.read_text().splitlines()]
    for row in rows:
        if row["split"] == "val":
            row["output"] = "yes"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = json.loads((one_step_run / "config.json").read_text())
    config["args"]["dataset"] = str(edited)   # the same path, as if the file had been edited in place
    (one_step_run / "config.json").write_text(json.dumps(config))
    code, err = run_error(base_args(tiny_dir, edited, one_step_run, "--max-steps", "3", "--dtype", "fp32",
                                    "--resume", "auto"), capsys)
    assert code == 2 and "validation set" in err


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_record_gives_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, capsys, native):
    """An adapter trained in bf16, evaluated with --dtype left at auto on a CPU: bf16 where the CPU multiplies
    bf16 natively; elsewhere fp32, the choice's one line saying why (emulated bf16 is several times slower)."""
    import model.cpu
    from lora.base import choose_base

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    (tmp_path / "base.json").write_text(json.dumps({
        "base_model": None, "base_checkpoint": None, "base_fingerprint": None, "compute_dtype": "bfloat16",
        "quantization": {"method": "nf4", "double_quantization": True, "blocksize": 64, "quantized_from": "bfloat16"}}))
    monkeypatch.setattr(model.cpu, "cpu_native_bf16", lambda flags=None: native)
    base = choose_base("some-model", None, "auto", "cpu", str(tmp_path))
    assert base.quant == "nf4" and capsys.readouterr().err == ""
    if native:
        assert base.dtype == torch.bfloat16 and base.line().count("as trained") == 2
    else:
        assert base.dtype == torch.float32 and base.dtype_name == "float32"
        assert "float32 compute (trained in bfloat16; this CPU has no native bf16" in base.line()
