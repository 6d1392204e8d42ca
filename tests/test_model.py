"""The Llama network against transformers, the presets' sizes, the real SmolLM2-135M, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import PRESETS, Llama, ModelConfig, Packing, count_parameters, load_model
from model.llama import rope_cos_sin, rope_inv_freq
from tiny import TINY, write_tiny_model

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 64, "rope_type": "llama3"}
VARIANTS = {
    "gqa-tied": {},
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "llama3-rope": dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "odd-sizes": dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, intermediate_size=77,
                      num_hidden_layers=3, vocab_size=301),
    "explicit-head-dim": dict(head_dim=24, hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
}


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    folder = write_tiny_model(tmp_path, **VARIANTS[variant])
    ours, _ = load_model(folder)
    theirs = hf_model(folder)
    ids = torch.randint(0, ours.config.vocab_size, (3, 200))  # 200 > original context of the llama3 variant
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert got.shape == (3, 200, ours.config.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4


def test_padded_batch_matches_unpadded_rows(tiny_dir):
    """Left padding handled by position: each row's logits equal the row run alone."""
    model, _ = load_model(tiny_dir)
    rows = [torch.randint(3, 384, (n,)) for n in (5, 11, 8)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, True
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, position_ids=pos, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])
            assert torch.allclose(batched[i, T - len(r):], alone[0], atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa-tied", "llama3-rope", "explicit-head-dim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_table_rows_are_rope_cos_sin_bit_for_bit(variant, dtype):
    """Rows of the cached table, picked by position, equal rope_cos_sin on those positions, for the shapes a
    forward gives (a batch, expanded aranges, packed rows with a past, one decode position per row)."""
    model = Llama(ModelConfig(**{**TINY, **VARIANTS[variant]}))
    inv_freq = rope_inv_freq(model.config)
    positions = [torch.arange(300).expand(3, 300), torch.randint(0, 300, (5, 17)), torch.tensor([[299], [0], [7]]),
                 Packing([5, 40, 1, 24], past=[0, 3, 250, 11]).position[None]]
    for length in (40, 300, 10, 1000):   # grows, then serves shorter asks from the longer table
        cos_table, sin_table = model.rope_table(length, torch.device("cpu"), dtype)
        assert cos_table.shape[0] >= length and cos_table.dtype == dtype
        for pos in positions:
            pos = pos.clamp(max=length - 1)
            cos, sin = rope_cos_sin(inv_freq, pos, dtype)
            assert torch.equal(cos_table[pos], cos) and torch.equal(sin_table[pos], sin)


def test_rope_table_made_once_and_outside_state_dict(tiny_dir):
    model, _ = load_model(tiny_dir)
    keys = set(model.state_dict())
    ids = torch.randint(0, 384, (2, 30))
    with torch.no_grad():
        model(ids)
        table = model.rope_tables[(torch.device("cpu"), torch.float32)]
        model(ids[:, :20])
        model(ids[:1], packing=Packing([10, 20]))
        assert model.rope_tables[(torch.device("cpu"), torch.float32)] is table   # reused, not made again
        assert set(model.state_dict()) == keys and not list(model.buffers())
        model.to(torch.bfloat16)   # .to() casts no table: the bfloat16 forward makes its own
        model(ids)
    assert table[0].dtype == torch.float32 and set(model.state_dict()) == keys
    assert model.rope_tables[(torch.device("cpu"), torch.bfloat16)][0].dtype == torch.bfloat16
    with torch.device("meta"):
        assert Llama(model.config).rope_tables == {}


def test_rope_table_follows_an_edited_config(tiny_dir):
    """Editing the config's RoPE settings after a forward takes effect at the next forward."""
    model, _ = load_model(tiny_dir)
    ids = torch.randint(0, 384, (1, 200))
    with torch.no_grad():
        before = model(ids)
        model.config.rope_scaling = {"rope_type": "linear", "factor": 4.0}
        scaled = model(ids)
        model.config.rope_scaling = None
        assert not torch.equal(scaled, before) and torch.equal(model(ids), before)
        cos, _ = model.rope_table(200, torch.device("cpu"), torch.float32)
        model.config.rope_theta = 500000.0
        assert torch.equal(model.rope_table(200, torch.device("cpu"), torch.float32)[0],
                           rope_cos_sin(rope_inv_freq(model.config), torch.arange(200)[None], torch.float32)[0][0])
        assert not torch.equal(model.rope_table(200, torch.device("cpu"), torch.float32)[0], cos)


def test_rope_table_made_while_generating_serves_training(tiny_dir):
    """A table first made under inference_mode (generation) is a normal tensor: a training step can use it."""
    from model import generate_batched

    model, _ = load_model(tiny_dir)
    generate_batched(model, [[5, 6, 7], [8]], max_new_tokens=40)
    model.train()
    model.gradient_checkpointing = True
    hidden = model(torch.randint(0, 384, (1, 30)), packing=Packing([12, 18]), return_hidden=True)
    hidden.square().mean().backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("past", [None, [0, 5, 70, 3]])
def test_attention_padded_to_a_block_changes_no_output(past, monkeypatch):
    """Packing(block=64) (train.py's on a CPU in bf16): every length attention sees is a multiple of 64, and the
    outputs and gradients are the unpadded rows' up to rounding (the kernel blocks differ with the length): in bf16
    as close to float32's as theirs, in float32 within 1e-5; block 1 (generation's) pads nothing."""
    import torch.nn.functional as F

    import model.llama as llama

    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(llama.F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: seen.append((q.shape[2], k.shape[2])) or sdpa(q, k, *a, **kw))
    torch.manual_seed(0)
    lengths = [37, 64, 100, 1]
    n, keys = sum(lengths), sum(lengths) + sum(past or [])
    q, k, v = torch.randn(1, 6, n, 32), torch.randn(1, 2, keys, 32), torch.randn(1, 2, keys, 32)

    def attend(dtype, block):
        seen.clear()
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = Packing(lengths, past=past, block=block).attention(*leaves, gqa=True)
        return (out, *torch.autograd.grad(out.float().square().sum(), leaves)), list(seen)

    exact, shapes = attend(torch.float32, 1)
    assert [s for _, s in shapes] == Packing(lengths, past=past).key_lengths   # block 1: as they are
    padded32, shapes = attend(torch.float32, 64)
    assert all(a % 64 == 0 and b % 64 == 0 for a, b in shapes), shapes
    for a, ref in zip(padded32, exact):
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    padded, _ = attend(torch.bfloat16, 64)
    unpadded, _ = attend(torch.bfloat16, 1)
    for a, b, ref in zip(padded, unpadded, exact):
        assert torch.isfinite(a).all()
        error, error_unpadded = ((x.float() - ref).abs().max().item() for x in (a, b))
        assert error <= 1.25 * error_unpadded + 1e-3, (error, error_unpadded)


def test_last_only_is_the_head_on_each_rows_last_token(tiny_dir):
    model, _ = load_model(tiny_dir)
    ids = torch.randint(0, 384, (3, 9))
    packed, packing = torch.randint(0, 384, (1, 15)), Packing([4, 1, 10])
    with torch.no_grad():
        assert torch.equal(model(ids, last_only=True), model.lm_head(model(ids, return_hidden=True)[:, -1]))
        last = torch.tensor([3, 4, 14])
        expected = model.lm_head(model(packed, packing=packing, return_hidden=True)[0, last])
        assert torch.equal(model(packed, packing=packing, last_only=True), expected)   # (rows, vocab)
    with pytest.raises(ValueError, match="exclude each other"):
        model(ids, return_hidden=True, last_only=True)


def test_tokenizer_never_imports_gguf():
    """The import goes one way: model.gguf uses model.tokenizer's GGUF readers and names, never the reverse."""
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "model" / "tokenizer.py").read_text()
    imported = [("." * node.level) + (node.module or "") for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom)]
    assert ".gguf" not in imported and "model.gguf" not in imported, imported


def test_tied_head_is_one_parameter(tiny_dir):
    model, _ = load_model(tiny_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once


@pytest.mark.parametrize("alias,expected", [
    ("smollm-135m", 134_515_008), ("smollm2-135m", 134_515_008), ("smollm-360m", 361_821_120),
    ("smollm2-360m", 361_821_120), ("smollm-1.7b", 1_711_376_384), ("smollm2-1.7b", 1_711_376_384),
    ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
])
def test_preset_parameter_counts_on_meta(alias, expected):
    with torch.device("meta"):
        model = Llama(ModelConfig.from_name(alias))
    assert count_parameters(model) == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_every_study_model_has_a_preset():
    assert set(PRESETS) == {"smollm-135m", "smollm-360m", "smollm-1.7b", "smollm2-135m", "smollm2-360m",
                            "smollm2-1.7b", "llama3.2-1b", "llama3.2-3b"}
    assert PRESETS["llama3.2-1b"][0] == "meta-llama/Llama-3.2-1B"


def test_sharded_checkpoint_loads(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, _ = load_model(folder)
    whole, _ = load_model(tiny_dir)
    ids = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        assert torch.equal(sharded(ids), whole(ids))


# ---- the real SmolLM2-135M-Instruct (GGUF) ------------------------------------------------------

@pytest.mark.slow
def test_gguf_logits_match_transformers(smollm2, smollm2_gguf):
    model, tokenizer = smollm2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Below is an instruction that describes a task. Classify the product: "
                                         "Apple iPhone 15 Pro, 256 GB, titanium.")])
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(smollm2, smollm2_gguf):
    _, tokenizer = smollm2
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = 'Product 1: "Sony WH-1000XM5" costs $348.00\n\n### Response:\n<|im_start|>assistant'
    assert tokenizer.encode(text) == theirs(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    from model import generate

    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, [tokenizer.encode(prompt, bos=True)], max_new_tokens=12,
                   stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    assert "Paris" in tokenizer.decode(out[0])


# ---- bad input ----------------------------------------------------------------------------------

def test_unknown_alias_lists_valid_ones():
    with pytest.raises(ValueError, match="smollm2-360m.*llama3.2-3b"):
        ModelConfig.from_name("smollm3-9b")
    with pytest.raises(ValueError, match="valid aliases: smollm-135m"):
        load_model("no-such-model")


def test_missing_config_key_is_named(tmp_path, tiny_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: missing required key.*num_hidden_layers"):
        load_model(folder)


def test_mistyped_config_key_is_named(tmp_path, tiny_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_wrong_shape_is_named(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(64, 64\).*\(32, 64\)"):
        load_model(folder)


def test_unexpected_tensor_is_named(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor.*model.layers.7.mlp.up_proj.weight"):
        load_model(folder)


def test_truncated_safetensors(tmp_path, tiny_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file.*truncated"):
        load_model(folder)


def test_pickle_checkpoints_are_never_read(tmp_path, tiny_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_model(folder)


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    """With HF_HUB_OFFLINE and an empty cache, the real huggingface_hub path gives the offline sentence."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        load_model("smollm2-360m")
