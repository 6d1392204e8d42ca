"""Adapter files and merged exports (lora/io.py), checked against transformers and peft as oracles.

What this file proves, on tiny random Llamas in float32 on the CPU:
- an adapter written by `save_adapter` is in PEFT's format: peft loads it onto the transformers model
  and gives our logits (tied head, untied head, and without a head adapter); peft's own adapter files
  load into our model with peft's logits;
- `save_adapter` -> `load_adapter` onto a fresh base gives the same logits, and loading keeps eval mode;
- `export_merged` writes a hub-layout folder that transformers and `load_model` both read, with the
  unmerged model's logits; a tied model with a head adapter is exported untied and its embedding is
  written unchanged; an NF4 base exports to bf16;
- bad adapter folders (another base, a missing, malformed or truncated file, unknown targets) give
  errors that name the file and the field or tensor, before the model is changed where possible.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora import (DEFAULT_TARGETS, NO_HEAD_TARGETS, LoRALinear, apply_lora, export_merged, load_adapter, lora_disabled,
                  lora_layers, merge_lora, save_adapter)
from model import load_model
from tiny import write_tiny_model

VOCAB = 384  # the tiny model's vocabulary (tests/tiny.py)
IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
PEFT_KEYS = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 16, "lora_dropout": 0.1,
             "bias": "none"}
# (base folder fixture, LoRA targets): the paper's targets on a tied and an untied head, and no head adapter.
CASES = [("tiny_dir", "paper"), ("untied_dir", "paper"), ("tiny_dir", "no-head")]
CASE_IDS = ["tied-paper", "untied-paper", "tied-no-head"]


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("untied"), tie_word_embeddings=False)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Another base: hidden size 32 (head_dim 8) and intermediate size 64, so every LoRA shape differs."""
    return write_tiny_model(tmp_path_factory.mktemp("other"), hidden_size=32, intermediate_size=64)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    folder_fixture, targets = request.param
    return request.getfixturevalue(folder_fixture), targets


def randomize_b(model, std: float = 0.05, seed: int = 1) -> None:
    """B is zero at init, which would make every comparison trivial: give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def lora_model(folder, targets="paper", quantize=None):
    """(model with a non-trivial LoRA adapter in eval mode, tokenizer)."""
    model, tok = load_model(folder)
    apply_lora(model, r=16, alpha=16, dropout=0.1, targets=targets, quantize=quantize)
    randomize_b(model)
    return model.eval(), tok


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).float()


def hf_model(folder, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def saved_adapter(tmp_path, folder, targets="paper"):
    """(model, adapter folder) for a LoRA model on `folder`, saved with save_adapter."""
    model, _ = lora_model(folder, targets)
    out = tmp_path / "adapter"
    save_adapter(model, out, base_model_name_or_path=str(folder))
    return model, out


# ---- 1. PEFT's format, with peft as the oracle ------------------------------------------------------

def test_adapter_files_follow_peft_format(tiny_dir, tmp_path):
    """The config keys and tensor names/shapes/dtypes peft reads; a local path is never written as the base name."""
    model, out = saved_adapter(tmp_path, tiny_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in PEFT_KEYS} == PEFT_KEYS
    assert cfg["target_modules"] == list(DEFAULT_TARGETS)
    assert cfg["base_model_name_or_path"] == str(tiny_dir)
    assert cfg["modules_to_save"] is None and cfg["use_dora"] is False and cfg["use_rslora"] is False

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    layers = lora_layers(model)
    assert len(names) == 2 * len(layers) == 2 * (7 * 2 + 1)
    assert {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
            "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"} <= names
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (16, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 16)  # 2 kv heads
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (VOCAB, 16)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["base_model.model.lm_head.lora_B.weight"], model.lm_head.lora_B.weight)

    save_adapter(model, tmp_path / "default_name")  # the model came from a local folder: no base name
    assert json.loads((tmp_path / "default_name" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_peft_reads_our_adapter(case, tmp_path):
    """peft.PeftModel.from_pretrained on our files gives our logits (tied head, untied head, no head adapter)."""
    peft = pytest.importorskip("peft")
    folder, targets = case
    model, out = saved_adapter(tmp_path, folder, targets)
    base = hf_model(folder)
    embedding = base.model.embed_tokens.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that a tied layer is adapted (see the next test)
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
    expected = logits(model)
    with lora_disabled(model):
        assert max_diff(expected, logits(model)) > 1e-2  # the adapter changes the outputs
    assert max_diff(hf_logits(theirs), expected) <= 1e-4

    modules = dict(theirs.named_modules())
    assert ("base_model.model.lm_head.lora_A" in modules) == (targets == "paper")
    assert sum(n.endswith(".lora_A") for n in modules) == len(lora_layers(model))
    assert torch.equal(theirs.base_model.model.model.embed_tokens.weight, embedding)  # the embedding is not adapted


def test_we_read_peft_adapter(tiny_dir, tmp_path):
    """An adapter saved by peft (lm_head targeted on a tied model) loads with peft's logits.

    peft writes a full copy of the head's weight beside a head adapter (`lm_head.base_layer.weight`,
    save_embedding_layers="auto"); it is accepted because it equals the model's head weight.
    """
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "lm_head"],
                             task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf_model(tiny_dir), config)
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
        theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))

    model, _ = load_model(tiny_dir)
    load_adapter(model, tmp_path / "peft")
    assert model.lora_config["r"] == 8 and model.lora_config["alpha"] == 32
    assert sorted(model.lora_config["targets"]) == ["lm_head", "q_proj", "v_proj"]
    assert model.lm_head.base.weight is model.model.embed_tokens.weight  # still tied, embedding untouched
    assert max_diff(logits(model), hf_logits(theirs.eval())) <= 1e-4


# ---- 2. our own round trip ------------------------------------------------------------------------

def test_round_trip_gives_identical_logits(case, tmp_path):
    """load_adapter on a fresh base applies LoRA with the file's settings and copies A and B exactly."""
    folder, targets = case
    model, out = saved_adapter(tmp_path, folder, targets)
    fresh, _ = load_model(folder)
    load_adapter(fresh, out)
    assert fresh.lora_config == model.lora_config
    assert set(lora_layers(fresh)) == set(lora_layers(model))
    assert torch.equal(logits(fresh.eval()), logits(model))


def test_load_adapter_keeps_eval_mode(tiny_dir, tmp_path):
    """load_model returns an eval-mode model; the LoRA layers load_adapter adds must not bring dropout back."""
    _, out = saved_adapter(tmp_path, tiny_dir)
    fresh, _ = load_model(tiny_dir)
    load_adapter(fresh, out)
    assert not any(m.training for m in fresh.modules())
    assert torch.equal(logits(fresh), logits(fresh))  # dropout (p=0.1) would make two passes differ
    trained, _ = load_model(tiny_dir)
    apply_lora(trained.train())
    assert all(m.training for m in trained.modules())


def test_load_adapter_into_model_with_lora(tiny_dir, tmp_path):
    """A model that already has LoRA with the same r and alpha gets the file's values."""
    model, out = saved_adapter(tmp_path, tiny_dir)
    other, _ = load_model(tiny_dir)
    apply_lora(other, r=16, alpha=16, dropout=0.0)
    load_adapter(other, out)
    assert torch.equal(logits(other), logits(model))


# ---- 3. merged export -----------------------------------------------------------------------------

def test_export_merged_fp32(case, tmp_path):
    """A hub folder that transformers and load_model read, with the unmerged model's logits.

    Tied head with an adapter: exported untied, its own lm_head.weight, the embedding bit for bit the
    original. Tied head without an adapter: stays tied and lm_head.weight is omitted, as on the hub.
    """
    transformers = pytest.importorskip("transformers")
    folder, targets = case
    model, tok = lora_model(folder, targets)
    expected = logits(model)
    export_merged(model, tok, tmp_path / "merged", dtype=torch.float32)
    out = tmp_path / "merged"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    tied_in = json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is (tied_in and targets == "no-head")
    assert config["torch_dtype"] == "float32"
    state = load_file(str(out / "model.safetensors"))
    original = load_file(str(folder / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())
    assert ("lm_head.weight" in state) is (not config["tie_word_embeddings"])
    assert torch.equal(state["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    if targets == "paper":
        head = original.get("lm_head.weight", original["model.embed_tokens.weight"])
        assert max_diff(state["lm_head.weight"], head) > 1e-3  # the head's delta went into lm_head only
    assert not any(l.merged for l in lora_layers(model).values())  # exporting does not change the model
    assert torch.equal(logits(model), expected)

    ours, ours_tok = load_model(out)
    assert max_diff(logits(ours), expected) <= 1e-4
    assert ours_tok.fingerprint == tok.fingerprint
    assert max_diff(hf_logits(hf_model(out)), expected) <= 1e-4
    text = "### Instruction: is the product relevant to the query? yes"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_export_after_merge_lora_is_the_same(tiny_dir, tmp_path):
    """Exporting a model merged with merge_lora writes the same tensors as exporting it unmerged."""
    model, tok = lora_model(tiny_dir)
    export_merged(model, tok, tmp_path / "unmerged", dtype=torch.float32)
    merge_lora(model)
    export_merged(model, None, tmp_path / "merged", dtype=torch.float32)
    a = load_file(str(tmp_path / "unmerged" / "model.safetensors"))
    b = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "merged" / "tokenizer.json").exists()  # tokenizer=None writes no tokenizer files


def test_export_merged_from_nf4_base_bf16(tiny_dir, tmp_path):
    """QLoRA model -> dense bf16 export: dequant(W) + delta rounded once to bf16, read by transformers.

    Tolerance: the NF4 model multiplies bf16(x) by bf16(dequant(W)) and adds the fp32 LoRA branch, the
    export multiplies by bf16(dequant(W) + delta); both round to bf16 (8-bit mantissa, relative error
    <= 2^-9 per value) in different places, so the logits agree to a fraction of a percent of their scale
    (about 0.4% here), not to 1e-4. 2% of max |logit| still fails an export that drops the adapter or
    uses the unquantized weights (both move the logits by tens of percent).
    """
    pytest.importorskip("bitsandbytes")
    model, tok = lora_model(tiny_dir, quantize="nf4")
    expected = logits(model)
    export_merged(model, tok, tmp_path / "merged")  # bf16 is the default
    out = tmp_path / "merged"
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    state = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], q_proj.merged_weight().to(torch.bfloat16))

    theirs = hf_model(out, dtype="auto")
    assert theirs.dtype == torch.bfloat16  # the config's dtype is honoured
    got = hf_logits(theirs.float())  # bf16 -> fp32 is exact: compare the weights, not bf16 activations
    scale = expected.abs().max().item()
    assert max_diff(got, expected) <= 2e-2 * scale
    ours, _ = load_model(out)
    assert max_diff(logits(ours), got) <= 1e-4


# ---- 4. bad input ---------------------------------------------------------------------------------

def test_adapter_for_another_base_names_tensor_and_shapes(tiny_dir, other_dir, tmp_path):
    """An adapter trained on a base with another hidden size: the error names the tensor and both shapes."""
    _, out = saved_adapter(tmp_path, other_dir)
    model, _ = load_model(tiny_dir)
    with pytest.raises(ValueError) as e:
        load_adapter(model, out)
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg and "another base model" in msg
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "(16, 32)" in msg and "(16, 64)" in msg


def model_snapshot(model) -> tuple:
    """Everything a failed load must leave alone: module names and types, tensors, requires_grad."""
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    return modules, tensors, grads


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("damage", ["another-base", "missing-tensor", "nan"])
def test_failed_load_leaves_the_model_as_it_was(tiny_dir, other_dir, tmp_path, quantize, damage):
    """A refused adapter adds no LoRA layer and quantizes nothing: the model is exactly as before."""
    _, out = saved_adapter(tmp_path, other_dir if damage == "another-base" else tiny_dir)
    file = out / "adapter_model.safetensors"
    tensors = load_file(str(file))
    last = sorted(tensors)[-1]   # the last layer checked: every other tensor fits
    if damage == "missing-tensor":
        del tensors[last]
    elif damage == "nan":
        tensors[last][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    model, _ = load_model(tiny_dir)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors"):
        load_adapter(model, out, quantize=quantize)
    after = model_snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])


def test_head_copy_from_another_base_is_an_error(tiny_dir, tmp_path):
    """A peft-style copy of the head weight that is not this model's head is refused, not ignored."""
    _, out = saved_adapter(tmp_path, tiny_dir)
    file = out / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.lm_head.base_layer.weight"] = torch.randn(VOCAB, 64)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor base_model\.model\.lm_head\.base_layer"
                                         r"\.weight .* differs from this model's lm_head weight"):
        load_adapter(load_model(tiny_dir)[0], out)


def test_missing_weights_file(tiny_dir, tmp_path):
    """No adapter_model.safetensors: the path is named; a pickle adapter_model.bin is pointed out, not read."""
    _, out = saved_adapter(tmp_path, tiny_dir)
    (out / "adapter_model.safetensors").unlink()
    model, _ = load_model(tiny_dir)
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors: no such file$"):
        load_adapter(model, out)
    (out / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.bin is a pickle file and is not read"):
        load_adapter(model, out)
    assert not lora_layers(model)  # nothing was applied


def test_missing_config_file(tiny_dir, tmp_path):
    _, out = saved_adapter(tmp_path, tiny_dir)
    (out / "adapter_config.json").unlink()
    model, _ = load_model(tiny_dir)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json: no such file"):
        load_adapter(model, out)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json: no such file"):
        load_adapter(model, tmp_path / "does-not-exist")
    assert not lora_layers(model)


@pytest.mark.parametrize("edit, match", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: "[1, 2]", "expected a JSON object"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "r"}), "missing key.* r"),
    (lambda text: json.dumps({**json.loads(text), "r": 0}), "r must be a positive integer, got 0"),
    (lambda text: json.dumps({**json.loads(text), "r": -4}), "r must be a positive integer, got -4"),
    (lambda text: json.dumps({**json.loads(text), "r": 16.0}), "r must be a positive integer, got 16.0"),
    (lambda text: json.dumps({**json.loads(text), "lora_alpha": 0}), "lora_alpha must be a positive number"),
    (lambda text: json.dumps({**json.loads(text), "lora_dropout": 1.0}), r"lora_dropout must be a number in \[0, 1\)"),
    (lambda text: json.dumps({**json.loads(text), "target_modules": []}), "target_modules must be a non-empty list"),
    (lambda text: json.dumps({**json.loads(text), "use_dora": True}), "unsupported LoRA option.* use_dora"),
], ids=["not-json", "not-object", "r-missing", "r-zero", "r-negative", "r-float", "alpha-zero", "dropout-one",
        "no-targets", "dora"])
def test_malformed_config(tiny_dir, tmp_path, edit, match):
    """A malformed adapter_config.json names the file and the field, and the model is left as it was."""
    _, out = saved_adapter(tmp_path, tiny_dir)
    file = out / "adapter_config.json"
    file.write_text(edit(file.read_text()))
    model, _ = load_model(tiny_dir)
    with pytest.raises(ValueError, match=f"adapter_config\\.json: .*{match}"):
        load_adapter(model, out)
    assert not lora_layers(model)


@pytest.mark.parametrize("keep", [lambda n: 20, lambda n: n - 100], ids=["in-header", "in-data"])
def test_truncated_weights_file(tiny_dir, tmp_path, keep):
    """A truncated adapter_model.safetensors is an error naming the file, before the model is changed."""
    _, out = saved_adapter(tmp_path, tiny_dir)
    file = out / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: keep(len(data))])
    model, _ = load_model(tiny_dir)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: unreadable safetensors file"):
        load_adapter(model, out)
    assert not lora_layers(model)


def test_unknown_target_modules(tiny_dir, tmp_path):
    """target_modules naming layers this model lacks: the error names the file, the field and the real layers."""
    _, out = saved_adapter(tmp_path, tiny_dir)
    file = out / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "target_modules": ["qkv_proj", "o_proj"]}))
    model, _ = load_model(tiny_dir)
    with pytest.raises(ValueError) as e:
        load_adapter(model, out)
    msg = str(e.value)
    assert "adapter_config.json: target_modules" in msg and "qkv_proj" in msg
    assert ", ".join(DEFAULT_TARGETS) in msg  # the model's linear layers are listed
    assert not lora_layers(model)


def test_rank_mismatch_with_existing_lora(tiny_dir, tmp_path):
    """A model that already has LoRA with another r: the error gives both ranks."""
    _, out = saved_adapter(tmp_path, tiny_dir)
    model, _ = load_model(tiny_dir)
    apply_lora(model, r=8, alpha=16, targets=list(NO_HEAD_TARGETS))
    with pytest.raises(ValueError, match=r"adapter_config\.json: r=16, lora_alpha=16, but the model's LoRA layers "
                                         r"have r=8"):
        load_adapter(model, out)
    assert all(isinstance(l, LoRALinear) and l.r == 8 for l in lora_layers(model).values())
