"""ModelConfig: the hub `config.json` of a Llama-family checkpoint, as a dataclass.

Field names are the hub's keys, so `ModelConfig.from_dict(json.load(f))` is the whole parser.
`PRESETS` maps the short names of the study's models to hub ids and to their released
`config.json` values: the values are the offline fallback and the test oracle; a run that can
reach the hub always reads the downloaded `config.json` instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

_SMOLLM_COMMON = dict(
    vocab_size=49152, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=0,
)
_LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA32_COMMON = dict(
    vocab_size=128256, rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
    rope_scaling=_LLAMA32_ROPE, max_position_embeddings=131072,
    bos_token_id=128000, eos_token_id=128001, head_dim=None,
)

# alias -> (hub id, released config.json values). Sources: the hub config.json of each repo.
PRESETS: dict[str, tuple[str, dict]] = {
    "smollm-135m": ("HuggingFaceTB/SmolLM-135M", dict(
        _SMOLLM_COMMON, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, intermediate_size=1536, rope_theta=10000.0, max_position_embeddings=2048)),
    "smollm-360m": ("HuggingFaceTB/SmolLM-360M", dict(
        _SMOLLM_COMMON, hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, intermediate_size=2560, rope_theta=10000.0, max_position_embeddings=2048)),
    "smollm-1.7b": ("HuggingFaceTB/SmolLM-1.7B", dict(
        _SMOLLM_COMMON, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=8192, rope_theta=10000.0, max_position_embeddings=2048)),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", dict(
        _SMOLLM_COMMON, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=8192)),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M", dict(
        _SMOLLM_COMMON, hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, intermediate_size=2560, rope_theta=100000.0, max_position_embeddings=8192)),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B", dict(
        _SMOLLM_COMMON, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, intermediate_size=8192, rope_theta=130000.0, max_position_embeddings=8192)),
    "llama3.2-1b": ("meta-llama/Llama-3.2-1B", dict(
        _LLAMA32_COMMON, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=8192)),
    "llama3.2-3b": ("meta-llama/Llama-3.2-3B", dict(
        _LLAMA32_COMMON, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, intermediate_size=8192)),
}


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0



def read_json(path: Path):
    """The JSON value in file `path`; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None


def read_json_object(path: Path) -> dict:
    """The JSON object in file `path`; ValueError naming the file when it is not valid JSON or not an object."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data

@dataclass
class ModelConfig:
    """A Llama `config.json`. Unknown hub keys are ignored; the required ones must be present."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    head_dim: int | None = None          # None: hidden_size // num_attention_heads
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    model_type: str = "llama"
    name: str = field(default="", compare=False)  # hub id or path it came from (not a hub key)

    _REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    _INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "max_position_embeddings")

    def __post_init__(self):
        for key in self._INTS + (("head_dim",) if self.head_dim is not None else ()):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config: {key} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for key in ("rms_norm_eps", "rope_theta"):
            if not _positive_number(getattr(self, key)):
                raise ValueError(f"config: {key} must be a positive number, got {getattr(self, key)!r}")
        for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"config: {key} must be true or false, got {getattr(self, key)!r}")
        for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, key)
            ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"config: {key} must be a token id (an integer 0 or more)"
                                 f"{' or a list of them' if key == 'eos_token_id' else ''} or null, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act != "silu":
            raise ValueError(f"config: hidden_act {self.hidden_act!r} is not supported (Llama uses 'silu')")
        if self.model_type != "llama":
            raise ValueError(f"config: model_type {self.model_type!r} is not supported; this project runs Llama "
                             "checkpoints (SmolLM, SmolLM2 and Llama 3.x are Llamas)")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"config: rope_scaling must be an object such as {{\"rope_type\": \"llama3\", "
                                 f"\"factor\": 32.0, ...}} or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"config: rope_scaling type {kind!r} is not supported (llama3, linear or null)")
            needed = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                      "linear": ("factor",), "default": ()}[kind]
            for key in needed:
                if not _positive_number(self.rope_scaling.get(key)):
                    raise ValueError(f"config: rope_scaling.{key} must be a positive number for rope_type {kind}, "
                                     f"got {self.rope_scaling.get(key)!r}")
            if kind == "llama3" and self.rope_scaling["low_freq_factor"] >= self.rope_scaling["high_freq_factor"]:
                raise ValueError("config: rope_scaling.low_freq_factor must be below high_freq_factor")

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config.json") -> "ModelConfig":
        """Build from a config.json dict; a missing or mistyped key is named in the error."""
        missing = [k for k in cls._REQUIRED if k not in values]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in known and k != "name"}
        kwargs.setdefault("num_key_value_heads", values["num_attention_heads"])
        try:
            return cls(**kwargs, name=values.get("_name_or_path", ""))
        except (ValueError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def from_name(cls, alias: str) -> "ModelConfig":
        """The released config of one of the study's models, by short name (`smollm2-360m`, ...)."""
        if alias not in PRESETS:
            raise ValueError(f"unknown model alias {alias!r}; valid aliases: {', '.join(PRESETS)}")
        hub_id, values = PRESETS[alias]
        return cls(**values, name=hub_id)

    def to_dict(self) -> dict:
        """The config.json dict (hub keys only) that transformers and `from_dict` both read."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}
        out["architectures"] = ["LlamaForCausalLM"]
        return out
