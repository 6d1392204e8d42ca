"""export.py: merged hub-layout folders and llama.cpp GGUF files, with transformers (and llama.cpp) as oracles.

What this file proves, on tiny random Llamas in float32 on the CPU (`export.main(argv)` in-process):
- `--format hf`: transformers loads the folder with no missing, unexpected or mismatched keys and gives
  our logits (the unmerged adapter, fp32) within 1e-4; a tied head with an adapter is exported untied,
  the embedding bit for bit the source's; without a head adapter it stays tied;
- `--format gguf`: the file says architecture llama and carries the tokenizer llama.cpp needs (gpt2 BPE,
  pre-tokenizer, tokens, types, merges, special ids, add_bos_token, chat template); 2-D weights are
  F32/F16/Q8_0 as asked, norms F32; `output` exists exactly when the head is untied; transformers' own
  GGUF reader (which undoes llama.cpp's q/k row permutation independently of ours) gives our logits;
  a GGUF source exports as well as a hub folder; Llama 3's rope scaling travels as `rope_freqs`;
- `--quant nf4` merges into the dequantized NF4 base, as `evaluate.py --quant nf4` runs it;
- `python evaluate.py --model EXPORT` writes the same predictions and scores as `--model SRC --adapter DIR`;
- refusals: an existing --out without --overwrite, a non-finite merge (NaN in the adapter, an f16
  overflow), a folder that is not a model export, mismatched flags; a failure while writing leaves
  --out as it was and no temporary sibling behind;
- our tokenizer metadata for the real SmolLM2 is the packaged file's (written by llama.cpp's converter);
- with llama-cpp-python installed (not in CI): llama.cpp tokenizes as we do and its logits on our tiny
  GGUF files equal ours; on the real SmolLM2 with an adapter its greedy answers to 20 real prompts are ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import evaluate
import export
from data import DEFAULT_SAMPLE
from lora import apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from model import PRESETS, load_model
from tiny import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
# long enough for Llama 3's rope scaling to matter: it changes only frequencies with wavelengths over 2048
LONG = torch.randint(0, VOCAB, (1, 1000), generator=torch.Generator().manual_seed(1))
CASES = [("tied", "paper"), ("untied", "paper"), ("tied", "no-head")]
CASE_IDS = ["tied-paper", "untied-paper", "tied-no-head"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_adapter(base: Path, out: Path, targets: str = "paper", std: float = 0.05, seed: int = 1) -> Path:
    """A LoRA adapter with random B (zero B would make every comparison trivial), saved in PEFT format."""
    model, _ = load_model(base)
    apply_lora(model, r=8, alpha=16, dropout=0.0, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
    save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Llamas: "tied" (GQA, head tied to the embedding), "untied", "llama3" (Llama 3.2's rope
    scaling) and for generation "lively-tied"; the last two have projections scaled to std 0.2, so that
    attention, positions and prompts matter (at std 0.02 every row gets nearly the same answer)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bases")
    llama3_rope = PRESETS["llama3.2-1b"][1]["rope_scaling"]
    out = {"tied": write_tiny_model(root / "tied"), "untied": write_tiny_model(root / "untied", tie_word_embeddings=False),
           "llama3": write_tiny_model(root / "llama3", rope_scaling=llama3_rope),
           "lively-tied": write_tiny_model(root / "lively-tied", seed=1)}
    for name in ("llama3", "lively-tied"):   # attention that depends on positions and tokens
        file = out[name] / "model.safetensors"
        state = load_file(str(file))
        save_file({k: v * 10 if v.dim() == 2 and "embed" not in k else v for k, v in state.items()}, str(file),
                  metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {(b, t): make_adapter(bases[b], root / f"{b}-{t}", t)
            for b in bases for t in ("paper", "no-head")}


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request, bases, adapters):
    base, targets = request.param
    return bases[base], adapters[base, targets], base == "tied" and targets == "no-head"


def ours(base: Path, adapter: Path | None, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Our logits on `ids`: the base with the adapter applied, unmerged, fp32."""
    model, _ = load_model(base)
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.no_grad():
        return model.eval()(ids)


def hf_logits(path: Path, **kw) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def run(*argv) -> int:
    return export.main([str(a) for a in argv])


def siblings(path: Path) -> list[str]:
    """What the export left in --out's folder besides --out itself (temporary files must not stay)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# ---- hub-layout folder ----------------------------------------------------------------------------

def test_hf_export_loads_in_transformers(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, adapter, stays_tied = case
    out = tmp_path / "merged"
    assert run("--model", base, "--adapter", adapter, "--format", "hf", "--dtype", "f32", "--out", out) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert siblings(out) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is stays_tied and theirs.config.tie_word_embeddings is stays_tied
    state, source = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert ("lm_head.weight" in state) is not stays_tied
    assert torch.equal(state["model.embed_tokens.weight"], source["model.embed_tokens.weight"])  # never changed
    with torch.no_grad():
        assert max_diff(theirs(input_ids=IDS).logits, ours(base, adapter)) <= 1e-4


def test_hf_export_dtypes(bases, adapters, tmp_path):
    """f32 by default (the merged weights exactly: the export scores as base + adapter); bf16 on request."""
    argv = ["--model", bases["tied"], "--adapter", adapters["tied", "paper"], "--format", "hf"]
    assert run(*argv, "--out", tmp_path / "f32") == 0 and run(*argv, "--dtype", "bf16", "--out", tmp_path / "bf16") == 0
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        assert json.loads((tmp_path / name / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
        assert all(t.dtype == dtype for t in load_file(str(tmp_path / name / "model.safetensors")).values())


# ---- GGUF file ------------------------------------------------------------------------------------

def read_fields(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("quant, tol", [("f32", 1e-4), ("f16", 5e-3), ("q8_0", 5e-2)])
def test_gguf_export(case, quant, tol, tmp_path):
    """Metadata, tensor types, tie rule; read back by our loader and (f32, f16) by transformers' GGUF reader."""
    base, adapter, stays_tied = case
    out = tmp_path / "model.gguf"
    assert run("--model", base, "--adapter", adapter, "--format", "gguf", "--gguf-quant", quant, "--out", out) == 0
    assert siblings(out) == []
    reader, fields = read_fields(out)
    _, tok = load_model(base)
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[quant]
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == VOCAB
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # control tokens
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (1, 2, 2, True)
    assert fields["tokenizer.chat_template"] == tok.chat_template

    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert ("output.weight" in types) is not stays_tied
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == types["blk.1.attn_q.weight"] == types["blk.0.ffn_down.weight"] == quant.upper()

    back, back_tok = load_model(out)
    assert back_tok.fingerprint == tok.fingerprint
    assert back.config.tie_word_embeddings is stays_tied
    expected = ours(base, adapter)
    with torch.no_grad():
        got = back(IDS)
    assert max_diff(got, expected) <= tol
    if quant == "f32":
        embedding = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]
        assert torch.equal(back.model.embed_tokens.weight, embedding)
    if quant != "q8_0":   # transformers reads F32/F16 GGUF files (its own unpermute of q and k)
        assert max_diff(hf_logits(out.parent, gguf_file=out.name), got) <= 1e-4


def test_gguf_source_exports_to_both_formats(bases, adapters, tmp_path):
    """A .gguf base (as the offline SmolLM2 is) with an adapter: both formats give the adapted logits."""
    src = tmp_path / "base.gguf"
    assert run("--model", bases["tied"], "--format", "gguf", "--gguf-quant", "f32", "--out", src) == 0
    assert "output.weight" not in {t.name for t in read_fields(src)[0].tensors}  # no adapter: still tied
    adapter = adapters["tied", "paper"]
    expected = ours(src, adapter)
    assert max_diff(expected, ours(bases["tied"], adapter)) <= 1e-5
    assert run("--model", src, "--adapter", adapter, "--format", "hf", "--dtype", "f32", "--out", tmp_path / "hf") == 0
    assert max_diff(hf_logits(tmp_path / "hf"), expected) <= 1e-4
    assert run("--model", src, "--adapter", adapter, "--format", "gguf", "--gguf-quant", "f32",
               "--out", tmp_path / "out.gguf") == 0
    with torch.no_grad():
        assert max_diff(load_model(tmp_path / "out.gguf")[0](IDS), expected) <= 1e-4


def test_gguf_llama3_rope_scaling(bases, adapters, tmp_path):
    """Llama 3.x rope scaling travels as llama.cpp's rope_freqs tensor (unscaled / scaled frequencies) and
    is read back as the same rope_scaling."""
    out = tmp_path / "m.gguf"
    base, adapter = bases["llama3"], adapters["llama3", "paper"]
    assert run("--model", base, "--adapter", adapter, "--format", "gguf", "--gguf-quant", "f32", "--out", out) == 0
    reader, _ = read_fields(out)
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert factors.tensor_type.name == "F32" and 1.0 < float(np.max(factors.data)) <= 32.0
    back, _ = load_model(out)
    assert back.config.rope_scaling == load_model(base)[0].config.rope_scaling
    expected = ours(base, adapter, LONG)
    with torch.no_grad():
        assert max_diff(back(LONG), expected) <= 1e-4
        back.config.rope_scaling = None
        assert max_diff(back(LONG), expected) > 1e-2   # the scaling matters at these positions


def test_every_stop_token_is_kept(tmp_path):
    """A checkpoint that stops at two tokens (Llama 3 Instruct stops at <|eot_id|> too): both exports keep
    both, as generation_config.json's eos_token_id list and as GGUF's eos and eot ids."""
    base = write_tiny_model(tmp_path / "base")
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_model(base)[1].stop_ids == {0, 2}
    assert run("--model", base, "--format", "hf", "--out", tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert run("--model", base, "--format", "gguf", "--out", tmp_path / "m.gguf") == 0
    fields = read_fields(tmp_path / "m.gguf")[1]
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eot_token_id"]) == (2, 0)
    for export_path in (tmp_path / "hf", tmp_path / "m.gguf"):
        assert load_model(export_path)[1].stop_ids == {0, 2}


def test_nf4_base_merge_is_what_evaluate_runs(bases, adapters, tmp_path):
    """--quant nf4: the adapter merged into the dequantized NF4 base, as `evaluate.py --quant nf4` runs it."""
    pytest.importorskip("bitsandbytes")
    base, adapter = bases["tied"], adapters["tied", "paper"]
    assert run("--model", base, "--adapter", adapter, "--quant", "nf4", "--format", "hf", "--dtype", "f32",
               "--out", tmp_path / "m") == 0
    model, _ = load_model(base)
    merge_lora(load_adapter(model, adapter, quantize="nf4"))
    with torch.no_grad():
        expected = model.eval()(IDS)
        assert max_diff(load_model(tmp_path / "m")[0](IDS), expected) <= 1e-5
        assert max_diff(expected, ours(base, adapter)) > 1e-3   # the NF4 base is not the dense one


# ---- the round trip through evaluate.py -----------------------------------------------------------

def test_evaluate_scores_the_export_as_model_plus_adapter(bases, adapters, tmp_path, monkeypatch):
    """Same predictions, same paper and strict scores, for a tied model whose head adapter unties it in the
    export: every task of the sample but AG (its F_BERT needs an encoder), IND and OOD."""
    base, adapter = bases["lively-tied"], adapters["lively-tied", "paper"]
    assert run("--model", base, "--adapter", adapter, "--format", "hf", "--dtype", "f32", "--out", tmp_path / "hf") == 0
    assert run("--model", base, "--adapter", adapter, "--format", "gguf", "--gguf-quant", "f32",
               "--out", tmp_path / "m.gguf") == 0
    common = ["--dataset", str(DEFAULT_SAMPLE), "--tasks", "AVE,PRP,PM,SA,SR,MPC,PSI,QPR,AP",
              "--settings", "IND_Diverse_Instruction,OOD_Diverse_Instruction", "--limit", "1",
              "--max-new-tokens", "10", "--qpr-labels", str(DEFAULT_SAMPLE.with_name("qpr_label.json")),
              "--dtype", "fp32"]   # the fp32 exports against the fp32 model (auto is bf16 on a CPU with native bf16)
    runs = {"adapter": ["--model", str(base), "--adapter", str(adapter)], "hf": ["--model", str(tmp_path / "hf")],
            "gguf": ["--model", str(tmp_path / "m.gguf")]}
    monkeypatch.setattr(evaluate, "plot_results", lambda *args, **kwargs: False)   # no bar charts: seconds of matplotlib
    results = {}
    for name, model_args in runs.items():
        assert evaluate.main([*model_args, *common, "--out", str(tmp_path / f"eval-{name}")]) == 0
        preds = [json.loads(l) for l in (tmp_path / f"eval-{name}" / "predictions.jsonl").read_text().splitlines()]
        metrics = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())["results"]
        results[name] = ([(p["task"], p["setting"], p["index"], p["output"]) for p in preds], metrics)
    outputs = [o for *_, o in results["adapter"][0]]
    assert len(set(outputs)) > len(outputs) // 2   # the answers depend on the prompt: a real comparison
    assert len(results["adapter"][1]) == 9
    assert results["hf"] == results["adapter"] and results["gguf"] == results["adapter"]


# ---- refusals -------------------------------------------------------------------------------------

def run_error(argv, capsys) -> tuple[int, str]:
    """(exit code, message) of a failing export: argparse exits 2; raised errors are what __main__ prints."""
    try:
        run(*argv)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    except (ValueError, OSError, RuntimeError) as e:
        return 2, str(e)
    pytest.fail(f"export.main({argv}) did not fail")


@pytest.mark.parametrize("fmt, name", [("hf", "merged"), ("gguf", "model.gguf")])
def test_existing_out_needs_overwrite(bases, adapters, fmt, name, tmp_path, capsys):
    out = tmp_path / name
    argv = ["--model", bases["tied"], "--adapter", adapters["tied", "paper"], "--format", fmt, "--out", out]
    assert run(*argv) == 0
    before = sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir()))
    code, msg = run_error(argv, capsys)
    assert code == 2 and f"--out {out} already exists: pass --overwrite" in msg
    assert sorted((p.name, p.read_bytes()) for p in ([out] if out.is_file() else out.iterdir())) == before
    assert run(*argv, "--adapter", adapters["tied", "no-head"], "--overwrite") == 0   # replaced
    if fmt == "gguf":   # the no-head adapter keeps the head tied: no output tensor any more
        assert "output.weight" not in {t.name for t in read_fields(out)[0].tensors}
    else:
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert siblings(out) == []


def test_overwrite_refuses_what_is_not_an_export(bases, tmp_path, capsys):
    """--overwrite replaces a model export only: not a folder of other files, not a folder for a GGUF file."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, msg = run_error(["--model", bases["tied"], "--format", "hf", "--out", other, "--overwrite"], capsys)
    assert code == 2 and "holds no slm_ec_export.json of export.py" in msg
    folder = tmp_path / "x.gguf"
    folder.mkdir()
    code, msg = run_error(["--model", bases["tied"], "--format", "gguf", "--out", folder, "--overwrite"], capsys)
    assert code == 2 and "is a folder: a GGUF export is one file" in msg
    assert (other / "keep.txt").read_text() == "mine"


def nan_adapter(base: Path, folder: Path, value: float) -> Path:
    from safetensors.torch import save_file

    make_adapter(base, folder)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][3, 0] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("fmt, name", [("hf", "merged"), ("gguf", "model.gguf")])
def test_non_finite_adapter_is_refused(bases, fmt, name, tmp_path, capsys):
    adapter = nan_adapter(bases["tied"], tmp_path / "adapter", float("nan"))
    out = tmp_path / "out" / name
    code, msg = run_error(["--model", bases["tied"], "--adapter", adapter, "--format", fmt, "--out", out], capsys)
    assert code == 2 and ("adapter_model.safetensors: tensor base_model.model.model.layers.1.mlp.up_proj.lora_B.weight holds 1 "
                                     "non-finite value(s)") in msg
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("fmt, flags", [("hf", ["--dtype", "f16"]), ("gguf", ["--gguf-quant", "f16"])])
def test_f16_overflow_is_refused(bases, fmt, flags, tmp_path, capsys):
    """A finite adapter whose merged weight exceeds f16's range (65504): refused in f16, written in f32."""
    adapter = nan_adapter(bases["tied"], tmp_path / "adapter", 1e7)
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    code, msg = run_error(["--model", bases["tied"], "--adapter", adapter, "--format", fmt, *flags, "--out", out], capsys)
    assert code == 2 and "refusing to export: " in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "nothing was written" in msg and not out.exists() and siblings(out) == ["adapter"]
    wide = ["--dtype", "f32"] if fmt == "hf" else ["--gguf-quant", "f32"]
    assert run("--model", bases["tied"], "--adapter", adapter, "--format", fmt, *wide, "--out", out) == 0


@pytest.mark.parametrize("fmt, name", [("hf", "merged"), ("gguf", "model.gguf")])
def test_a_failed_write_leaves_out_as_it_was(bases, adapters, fmt, name, tmp_path, monkeypatch, capsys):
    """A write that fails half-way (disk full, a crash) leaves no --out, or the old export intact."""
    import model.gguf
    from model import Tokenizer

    out = tmp_path / name
    argv = ["--model", bases["tied"], "--adapter", adapters["tied", "paper"], "--format", fmt, "--out", out]

    def fail(*args, **kwargs):
        if fmt == "gguf":
            Path(args[0]).write_bytes(b"GGUF half")
        raise OSError("No space left on device")

    target, attr = (model.gguf, "write_gguf") if fmt == "gguf" else (Tokenizer, "save")  # the last step of a write
    with monkeypatch.context() as m:
        m.setattr(target, attr, fail)
        assert run_error(argv, capsys)[0] == 2
        assert not out.exists() and siblings(out) == []
    assert run(*argv) == 0
    before = out.read_bytes() if out.is_file() else (out / "model.safetensors").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(target, attr, fail)
        assert run_error([*argv, "--overwrite"], capsys)[0] == 2
    assert (out.read_bytes() if out.is_file() else (out / "model.safetensors").read_bytes()) == before
    assert siblings(out) == []


@pytest.mark.parametrize("argv, match", [
    (["--format", "gguf", "--out", "model.bin"], "must end in .gguf"),
    (["--format", "gguf", "--dtype", "f16", "--out", "m.gguf"], "--dtype is for --format hf"),
    (["--format", "hf", "--gguf-quant", "q8_0", "--out", "m"], "--gguf-quant is for --format gguf"),
    (["--format", "hf", "--quant", "nf4", "--out", "m"], "--quant nf4 is for merging a QLoRA adapter"),
], ids=["gguf-name", "dtype-for-gguf", "quant-for-hf", "nf4-without-adapter"])
def test_usage_errors(bases, argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, msg = run_error(["--model", bases["tied"], *argv], capsys)
    assert code == 2 and match in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_script_exits_2_with_one_error_line(bases, tmp_path):
    """`python export.py` itself: a missing adapter folder is one line on stderr, exit code 2, nothing written."""
    proc = subprocess.run([sys.executable, str(ROOT / "export.py"), "--model", str(bases["tied"]), "--adapter",
                           str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"export.py: error: {tmp_path / 'nope' / 'adapter_config.json'}: "
                                                "no such file (an adapter folder holds adapter_config.json and "
                                                "adapter_model.safetensors)"]
    assert not (tmp_path / "m").exists()


# ---- llama.cpp itself (runs only where llama-cpp-python is installed) -----------------------------

@pytest.mark.parametrize("base_name, targets", [("tied", "paper"), ("tied", "no-head"), ("untied", "paper"),
                                              ("llama3", "paper")])
def test_llama_cpp_logits_equal_ours(bases, adapters, base_name, targets, tmp_path):
    """llama.cpp loads the f32 export (tied and untied heads, Llama 3 rope scaling), tokenizes text as we do
    (its own BPE from the file's tokens, merges and pre-tokenizer name) and computes our logits, token by token."""
    llama_cpp = pytest.importorskip("llama_cpp")
    base, adapter = bases[base_name], adapters[base_name, targets]
    out = tmp_path / "m.gguf"
    assert run("--model", base, "--adapter", adapter, "--format", "gguf", "--gguf-quant", "f32", "--out", out) == 0
    # an f32 KV cache (llama.cpp's default is f16, which alone moves these logits by ~3e-3)
    llm = llama_cpp.Llama(str(out), n_ctx=1024, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
    _, tok = load_model(base)
    text = "### Instruction:\nIs product 1 (red, 42 cm) a substitute?  Answer yes or no.<|im_end|>\n### Response:\n"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text, bos=True)
    tokens = LONG[0].tolist()
    llm.eval(tokens)
    theirs = torch.from_numpy(np.asarray(llm.scores[:len(tokens)], dtype=np.float32))
    assert max_diff(theirs, ours(base, adapter, LONG)[0]) <= 1e-4


# ---- the real SmolLM2-135M-Instruct ---------------------------------------------------------------

@pytest.mark.slow
def test_tokenizer_metadata_is_the_packaged_files(smollm2, smollm2_gguf):
    """Our tokenizer.ggml.* for SmolLM2 (rebuilt from the packaged GGUF) are that file's, value for value:
    the file was written by llama.cpp's own converter."""
    import gguf

    from model.gguf import _tokenizer_fields

    reader = gguf.GGUFReader(str(smollm2_gguf))
    field = lambda key: reader.fields[key].contents()
    ours = _tokenizer_fields(smollm2[1], 49152)
    assert ours["pre"] == field("tokenizer.ggml.pre") == "smollm"
    assert ours["tokens"] == field("tokenizer.ggml.tokens")
    assert ours["types"] == field("tokenizer.ggml.token_type")
    assert ours["merges"] == field("tokenizer.ggml.merges")


def real_prompts(shared_dir, tok, n: int = 20) -> list[list[int]]:
    """Prompt ids of n real test rows: the first of each task's IND_Diverse_Instruction block, in turn."""
    from data import load_rows
    from data.encode import encode_prompt

    rows = load_rows(str(shared_dir / "test_rows_dev.jsonl"), split="test", tasks="all",
                     settings=["IND_Diverse_Instruction"])
    by_task: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["task"], r["index"])):
        by_task.setdefault(row["task"], []).append(row)
    order = [by_task[t][i] for i in range(n) for t in sorted(by_task)][:n]
    return [encode_prompt(row, tok)[0] for row in order]


@pytest.mark.slow
def test_llama_cpp_greedy_equals_ours_on_smollm2(smollm2_gguf, shared_dir, tmp_path):
    """llama.cpp runs the f16 export of the real SmolLM2 with an adapter on every target (lm_head too):
    its greedy answers on 20 real prompts are ours (fp32, adapter merged as evaluate.py runs it). A
    prompt may part only at a near-tie that f16 weights can flip: our logit margin there under 0.1
    (f16 rounding moves this model's logits by up to about 0.06)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from model import generate_batched

    adapter = make_adapter(smollm2_gguf, tmp_path / "adapter", std=0.02)
    out = tmp_path / "m.gguf"
    assert run("--model", smollm2_gguf, "--adapter", adapter, "--format", "gguf", "--gguf-quant", "f16",
               "--out", out) == 0
    model, tok = load_model(smollm2_gguf)
    merge_lora(load_adapter(model, adapter))
    prompts = real_prompts(shared_dir, tok)
    stops = sorted(tok.stop_ids)
    ours = generate_batched(model.eval(), prompts, batch_size=4, max_new_tokens=16, stop_ids=stops)
    llm = llama_cpp.Llama(str(out), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False)
    same = 0
    for ids, mine in zip(prompts, ours):
        llm.reset()
        theirs = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if token in stops or len(theirs) == 16:
                break
            theirs.append(token)
        if theirs == mine:
            same += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip(mine + [-1], theirs + [-1])) if a != b)
        at = lambda seq: seq[step] if step < len(seq) else tok.eos_id   # a shorter answer stopped at EOS there
        with torch.no_grad():
            logits = model(torch.tensor([ids + mine[:step]]))[0, -1]
        assert abs(logits[at(mine)] - logits[at(theirs)]).item() < 0.1, (tok.decode(mine), tok.decode(theirs))
    assert same >= 18
