"""lora/base.py, the one base loader, and model/load.py's source_kind, the one answer to "a local path or a hub id?".

What this file proves, on a tiny random Llama on the CPU:
- source_kind sorts every spelling of a model source the scripts accept (and source_name names it);
- choose_base fills what is not given from the adapter's base.json (source, quantization, dtype), lets a given
  value win with one warning line, takes a torch dtype as it is, and refuses in one line what it cannot load;
- load_base(..., merge=True) gives exactly the model the hand-written path gave (load_model quantizing each linear
  as read, load_adapter, merge_lora), and warns when the base is not the one base.json fingerprinted.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from lora import (apply_lora, base_fingerprint, base_record, load_adapter, lora_layers, merge_lora, quantize_nf4,
                  save_adapter, write_base_record)
from lora.base import choose_base, load_base
from model import load_model
from model.load import source_kind, source_name


def test_source_kind_sorts_every_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()   # a folder spelled like a hub id is the folder
    kinds = {"x.gguf": "gguf", "missing/x.gguf": "gguf", "folder": "folder", str(tmp_path / "folder"): "folder",
             "org/name": "folder", "smollm2-360m": "alias", "file.txt": "path", "./missing": "path",
             "~/surely-missing": "path", "/no/such": "path", "a/b/c": "path", "HuggingFaceTB/SmolLM2-135M": "hub",
             "no-such-model": "unknown", "nobody/": "unknown"}
    assert {text: source_kind(text) for text in kinds} == kinds


def test_source_name_is_the_model_s_own_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")
    assert source_name("smollm2-360m") == "smollm2-360m"
    assert source_name("HuggingFaceTB/SmolLM2-135M/") == "SmolLM2-135M"
    assert source_name("models/x.gguf") == "x"
    assert source_name(".") == Path.cwd().name   # the resolved folder's name, never "."


@pytest.fixture(scope="module")
def nf4_adapter(tiny_dir, tmp_path_factory) -> Path:
    """An adapter with random B on every default target, recorded as trained on the tiny base in NF4, fp32."""
    model, _ = load_model(tiny_dir)
    apply_lora(model, r=4, alpha=8, dropout=0.0, quantize="nf4", compute_dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.data.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, folder)
    write_base_record(folder, base_record(base_model=None, base_checkpoint=str(tiny_dir), quantization="nf4",
                                          dtype=torch.float32, compute_dtype=torch.float32,
                                          fingerprint=base_fingerprint(load_model(tiny_dir)[0])))
    return folder


def test_the_record_fills_what_is_not_given(nf4_adapter, tiny_dir, capsys):
    base = choose_base(None, None, "auto", "cpu", str(nf4_adapter))
    assert (base.source, base.quant, base.dtype, base.device.type) == (str(tiny_dir), "nf4", torch.float32, "cpu")
    assert base.line() == (f"base: {tiny_dir} (from {nf4_adapter / 'base.json'}), NF4 as trained, float32 compute "
                           f"as trained, on cpu; adapter {nf4_adapter}")
    assert capsys.readouterr().err == ""


def test_a_given_value_wins_with_one_warning_each(nf4_adapter, tiny_dir, capsys):
    base = choose_base(str(tiny_dir), "none", "bfloat16", "cpu", str(nf4_adapter))
    assert (base.quant, base.dtype) == ("none", torch.bfloat16)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "--quant none puts it on the dense base instead" in warnings[0]
    assert "--dtype bf16 loads the base in another dtype" in warnings[1]


def test_a_torch_dtype_is_the_caller_s_rule(nf4_adapter, capsys):
    """export.py merges in float32 and train.py passes its resolved dtype: no comparison with base.json."""
    base = choose_base(None, None, torch.bfloat16, "cpu", str(nf4_adapter))
    assert base.dtype == torch.bfloat16 and base.quant == "nf4" and capsys.readouterr().err == ""


def test_what_cannot_be_loaded_is_one_line(nf4_adapter, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text((nf4_adapter / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="has no base.json .*: give --model"):
        choose_base(None, None, "auto", "cpu", str(bare))
    record = json.loads((nf4_adapter / "base.json").read_text()) | {"base_checkpoint": str(tmp_path / "gone")}
    (bare / "base.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="names base .*gone', which is not here: give --model"):
        choose_base(None, None, "auto", "cpu", str(bare))
    with pytest.raises(FileNotFoundError, match="adapter_config.json: no such file"):
        choose_base(None, None, "auto", "cpu", str(tmp_path))
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        choose_base(None, None, "auto", "tpu", str(nf4_adapter))


def test_load_base_is_the_hand_written_path(nf4_adapter, tiny_dir):
    """The NF4 base quantized as read, the adapter applied and merged: the same tensors as before the loader."""
    ours, tokenizer, base = load_base(None, None, "auto", "cpu", str(nf4_adapter), merge=True, say=lambda line: None)
    by_hand, _ = load_model(tiny_dir, dtype=torch.float32, quantize_linear=partial(quantize_nf4,
                                                                                    compute_dtype=torch.float32))
    load_adapter(by_hand, nf4_adapter, quantize="nf4", compute_dtype=torch.float32)
    merge_lora(by_hand)
    a, b = ours.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ours.training and tokenizer.encode("hello") and base.quant == "nf4"


def test_another_base_is_named_in_one_warning(nf4_adapter, tmp_path, capsys):
    from tiny import write_tiny_model

    other = write_tiny_model(tmp_path / "other", seed=7)
    lines = []
    load_base(str(other), None, "auto", "cpu", str(nf4_adapter), say=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"base: {other}, NF4 as trained")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"warning: --model {other} is not the base {nf4_adapter} was trained on" in err
