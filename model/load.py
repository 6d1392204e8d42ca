"""load_model(source) -> (Llama, Tokenizer), from an alias, a hub id, a hub-layout folder or a .gguf file;
load_tokenizer(source) -> Tokenizer, from the same sources without the weights; source_kind(source): which of
those a source names (the one answer to "a local path or a hub id?").

Only safetensors and GGUF are read: never pickle, never remote code. The network is built on the
meta device and the checkpoint's tensors are assigned into it, so weights are never held twice;
every key and shape is checked both ways before anything is assigned.

`load_model(..., quantize_linear=f)` builds a quantized base (QLoRA) without ever holding the dense
one: the tensors of a hub-layout folder are read one at a time, and each linear layer but lm_head
goes through f (e.g. lora.quantize_nf4) as soon as its weight is in, its dense weight then dropped.
Peak memory: the quantized model plus one dense tensor (a GGUF file is dequantized whole first).
`model/` knows nothing of the quantization: f is any nn.Linear -> nn.Module.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable

import torch
import torch.nn as nn

from .config import PRESETS, ModelConfig, read_json_object
from .hub import fetch
from .llama import Llama
from .tokenizer import Tokenizer

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                   "generation_config.json"]   # config.json and generation_config.json name the special tokens too
HUB_FILES = TOKENIZER_FILES + ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
# Tensors some checkpoints carry that the network computes itself.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


LOCAL_KINDS = ("gguf", "folder", "path")   # the source_kind()s that name something on this machine


def source_kind(source: str | Path) -> str:
    """What a model source names: the one answer to "a local path or a hub id?" (first rule that holds):
        gguf     a name ending in .gguf: a GGUF file (which may not exist)
        folder   an existing folder (a folder spelled like an alias or a hub id is the folder)
        alias    one of PRESETS
        path     any other local path: an existing file, or a name spelled as a path (starting with '.', '/'
                 or '~', or holding more than one '/': a hub id has exactly one) where nothing is
        hub      org/name: a hub id
        unknown  anything else (a name without '/' that is no alias)"""
    text = str(source)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        return "gguf"
    if path.is_dir():
        return "folder"
    if text in PRESETS:
        return "alias"
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return "path"
    if text.count("/") == 1 and all(text.split("/")):
        return "hub"
    return "unknown"


def source_name(source: str | Path) -> str:
    """A model source's own name: an alias as it is; a local file or folder's name, of the resolved path (so
    `..` names the folder it points to), without .gguf; a hub id's name part (org/NAME)."""
    text = str(source)
    if source_kind(text) == "alias":
        return text
    path = Path(text).expanduser()
    name = path.resolve().name if path.exists() else Path(text.rstrip("/")).name
    return name.removesuffix(".gguf")


def resolve_source(source: str | Path, files: list[str] = HUB_FILES) -> tuple[str, Path]:
    """('gguf' | 'dir', local path): a .gguf file or folder as given, else the `files` of an alias or hub id
    downloaded (HubError, one sentence, when the hub cannot provide them). Which it is: source_kind."""
    text = str(source)
    path = Path(text).expanduser()
    kind = source_kind(text)
    if kind == "gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text} does not exist")
        return "gguf", path
    if kind == "folder":
        return "dir", path
    if kind in ("alias", "hub"):
        return "dir", download(PRESETS[text][0] if kind == "alias" else text, files)
    raise ValueError(f"model {text!r} is not a local folder, a .gguf file, a hub id (org/name) or a known alias; "
                     f"valid aliases: {', '.join(PRESETS)}")


def download(repo_id: str, files: list[str] = HUB_FILES) -> Path:
    """The local folder of the `files` of a hub model (by default those a Llama checkpoint needs), through
    model.hub.fetch: the cache first, and no retries when the hub cannot be reached."""
    return fetch(repo_id, allow_patterns=files, instead="pass a local folder or .gguf file")


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of a model source load_model accepts, without the weights: only the tokenizer files of
    an alias or hub id are downloaded. Raises ValueError (not a source, or an unreadable tokenizer),
    FileNotFoundError (no such .gguf file, no tokenizer.json) or HubError (the hub cannot provide it)."""
    kind, path = resolve_source(source, TOKENIZER_FILES)
    return Tokenizer.from_gguf(path) if kind == "gguf" else Tokenizer.from_dir(path)


def shard_files(index: Path) -> list[str]:
    """The shard file names of a model.safetensors.index.json, each checked to be a file in the index's
    own folder (a name such as ../../elsewhere.safetensors or /abs/path is refused, never read)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file name, got "
                         f"{type(weight_map).__name__ if weight_map is not None else 'none'}")
    files = set()
    for tensor, name in weight_map.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if (not parts or len(parts) != 1 or name != parts[0] or parts[0] in (".", "..") or "\\" in name
                or not name.endswith(".safetensors")):
            raise ValueError(f"{index}: weight_map[{tensor!r}] = {name!r} is not the name of a .safetensors file in "
                             "the model folder (only files inside it are read)")
        if not (index.parent / name).is_file():
            raise FileNotFoundError(f"{index}: weight_map[{tensor!r}] names {name}, which is not in {index.parent}")
        files.add(name)
    return sorted(files)


def checkpoint_files(folder: Path) -> list[str]:
    """The safetensors files of a hub-layout folder: the shards its index lists, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return shard_files(index)
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are read, never pickle files)")


def read_safetensors(folder: Path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    files = checkpoint_files(folder)
    for name in files:
        try:
            state.update(load_file(str(folder / name), device=str(device)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{folder / name}: unreadable safetensors file ({e}); it may be truncated, download it again") from None
    return state


class SafetensorsFolder:
    """The tensors of a hub-layout folder read one at a time: names and shapes come from the file
    headers, `pop(name)` reads one tensor (a file is opened for that tensor only, so the pages read
    are let go with it)."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        files = checkpoint_files(folder)
        self.file: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        for name in files:
            try:
                with safe_open(str(folder / name), framework="pt") as f:
                    for key in f.keys():
                        self.file[key] = folder / name
                        self.shape[key] = tuple(f.get_slice(key).get_shape())
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{folder / name}: unreadable safetensors file ({e}); it may be truncated, "
                                 "download it again") from None

    def keys(self):
        return self.shape.keys()

    def pop(self, key: str, default=None):
        from safetensors import SafetensorError, safe_open

        if key not in self.file:
            return default
        file = self.file.pop(key)
        self.shape.pop(key)
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(key).clone()   # its own memory, not the file's pages
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable tensor {key} ({e}); the file may be truncated, download it "
                             "again") from None


def build_model(config: ModelConfig, state, *, dtype: torch.dtype, device,
                quantize_linear: Callable[[nn.Linear], nn.Module] | None = None) -> Llama:
    """Build on the meta device, check keys and shapes both ways, then assign the tensors.

    `state`: a dict of tensors or a SafetensorsFolder (read one tensor at a time). With
    `quantize_linear`, every linear layer but lm_head is replaced by quantize_linear(layer) as soon
    as its weight is assigned, and the dense weight is dropped before the next tensor is read.
    """
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    shapes = state.shape if isinstance(state, SafetensorsFolder) else {k: v.shape for k, v in state.items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # a tied checkpoint may carry a copy of the embedding
        shapes.pop("lm_head.weight", None)
    for key in [k for k in shapes if k.endswith(_IGNORED_SUFFIXES)]:
        state.pop(key, None)
        shapes.pop(key, None)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        raise ValueError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensor(s): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    for key, shape in expected.items():
        if tuple(shapes[key]) != tuple(shape):
            raise ValueError(f"tensor {key} has shape {tuple(shapes[key])}, the config implies {tuple(shape)}")
    if quantize_linear is None and isinstance(state, dict):
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
        model.tie_weights()
        return model
    for key in expected:   # one tensor at a time: read, cast, assign, and quantize a finished linear layer
        module_name, _, param_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, param_name)
        tensor = state.pop(key).to(device=device, dtype=dtype)
        setattr(module, param_name, nn.Parameter(tensor, requires_grad=old.requires_grad))
        del tensor
        done = all(p.device.type != "meta" for p in module.parameters())
        if quantize_linear is not None and isinstance(module, nn.Linear) and module_name != "lm_head" and done:
            parent_name, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, quantize_linear(module))
            module.weight = None   # the dense weight goes now, not when the loop moves on
    model.tie_weights()
    return model


def load_model(source: str | Path, dtype: torch.dtype = torch.float32, device="cpu", *,
               quantize_linear: Callable[[nn.Linear], nn.Module] | None = None,
               tokenizer: Tokenizer | None = None) -> tuple[Llama, Tokenizer]:
    """(model, tokenizer) from an alias (`smollm2-360m`), a hub id, a hub-layout folder or a .gguf file.

    quantize_linear: applied to every linear layer but lm_head while the weights load (see the
    module docstring); a hub-layout folder is then read one tensor at a time. tokenizer: the source's,
    when the caller has read it already (load_tokenizer(source)): returned as it is, not read again.
    """
    kind, path = resolve_source(source)
    if kind == "gguf":
        from .gguf import read_gguf

        config, state, tokenizer = read_gguf(path, tokenizer)
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json")
        config = ModelConfig.from_json(path / "config.json")
        state = SafetensorsFolder(path) if quantize_linear is not None else read_safetensors(path, device="cpu")
        if tokenizer is None:
            tokenizer = Tokenizer.from_dir(path)
    config.name = PRESETS[str(source)][0] if str(source) in PRESETS else config.name or str(source)
    model = build_model(config, state, dtype=dtype, device=device, quantize_linear=quantize_linear)
    return model.eval(), tokenizer
