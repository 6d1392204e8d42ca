"""Adapter files in PEFT's format, and merged exports in hub layout.

Adapter folder (what `peft.PeftModel.from_pretrained`, vLLM and llama.cpp's convert_lora_to_gguf read):
- `adapter_config.json`: PEFT's LoraConfig keys only (r, lora_alpha, lora_dropout, target_modules, ...);
- `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
  (out, r), float32, metadata {"format": "pt"}.
A head adapter on a tied model is saved like any other (`base_model.model.lm_head.lora_A.weight`);
peft applies it to the output projection only, as we do (it warns that the layer is tied).

Merged export (what transformers and `model.load_model` read): config.json, generation_config.json,
model.safetensors, tokenizer files; every adapter folded in (W + B @ A * alpha/r, in float32, then cast),
NF4 bases dequantized first. A tied model whose head has an adapter is exported untied
(`tie_word_embeddings: false` and its own `lm_head.weight`): the embedding is written unchanged.
The same merged weights also go to a llama.cpp GGUF file (export_gguf, model/gguf.py's writer).
The base an adapter was trained on is recorded beside it in `base.json` (a file of its own: peft
refuses unknown keys in adapter_config.json):
    base_model        the base's hub id, or null for a local checkpoint
    base_checkpoint   what was loaded: an alias, a hub id, a file or folder as given, or a description
    quantization      null (a dense base) or {"method": "nf4", "double_quantization": true,
                      "blocksize": 64, "quantized_from": <dtype the dense weights had>}
    compute_dtype     the dtype the base computed in ("float32", "bfloat16")
    base_fingerprint  sha256 of the shape and of 256 embedding rows in bfloat16 (base_fingerprint()):
                      the same checkpoint gives the same value in any dtype, another one does not
and any other keys a writer adds (train.py: nothing else; publish.py: the data and the recipe).
Adapter files are written to a temporary name and renamed into place; an export is written to a
temporary sibling of its path, fsynced and renamed, so a crash never leaves a torn file or a
half-written export under the path. A merged weight that is not finite is refused.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from model.config import read_json_object
from outdir import (DiskFull, NonFiniteError, disk_full, fsync_path, fsync_tree, is_disk_full, read_marker,
                    remove_path, swap_in, write_atomic)

from .apply import HEAD, apply_lora, lora_layers, resolve_targets
from .layer import LoRALinear
from .nf4 import dequantize_nf4, is_nf4

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME, BASE_NAME = "adapter_config.json", "adapter_model.safetensors", "base.json"
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors: `base_model.model.<module path>.lora_A.weight` and `.lora_B.weight`."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def _adapter_config(model: nn.Module, base_model_name_or_path: str | None) -> dict:
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    if any((l.r, l.alpha) != (first.r, first.alpha) for l in layers.values()):
        raise ValueError("all LoRA layers must share one r and alpha to be saved in PEFT's format")
    cfg = getattr(model, "lora_config", {})
    targets = cfg.get("targets") or list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
    p = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    if base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "name", "") or ""
        base_model_name_or_path = name if _HUB_ID.match(name) and not Path(name).exists() else None
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": p,
        "target_modules": list(targets),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def base_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the model's layer shapes and of 256 evenly spaced rows of its token
    embedding cast to bfloat16: equal for one checkpoint loaded in any dtype, different for another."""
    import hashlib

    c = model.config
    shape = [c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
             c.intermediate_size, c.vocab_size, bool(c.tie_word_embeddings)]
    embedding = model.model.embed_tokens.weight
    rows = torch.linspace(0, embedding.shape[0] - 1, min(256, embedding.shape[0])).long()
    sample = embedding.detach()[rows.to(embedding.device)].to(torch.bfloat16).cpu().contiguous()
    digest = hashlib.sha256(json.dumps(shape).encode())
    digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_record(*, base_model: str | None, base_checkpoint: str, quantization: str | None, dtype: torch.dtype | str,
                compute_dtype: torch.dtype | str, fingerprint: str | None = None, **extra) -> dict:
    """The base.json record (see the module docstring): `dtype` is the one the base weights were loaded
    in (and quantized from), `quantization` None or "nf4"."""
    if quantization not in (None, "nf4"):
        raise ValueError(f"quantization must be None or 'nf4', got {quantization!r}")
    quant = {"method": "nf4", "double_quantization": True, "blocksize": 64,
             "quantized_from": dtype_name(dtype)} if quantization == "nf4" else None
    record = {"base_model": base_model, "base_checkpoint": base_checkpoint, "quantization": quant,
              "compute_dtype": dtype_name(compute_dtype)}
    if fingerprint is not None:
        record["base_fingerprint"] = fingerprint
    return {**record, **extra}


def write_base_record(path, record: dict) -> None:
    """base.json in adapter folder `path`, written atomically."""
    write_atomic(Path(path) / BASE_NAME, json.dumps(record, indent=2) + "\n")


def read_base_record(path) -> dict | None:
    """base.json of adapter folder `path`, checked (one line naming the field when malformed), or None
    when the adapter has none (saved before records existed, or by another tool)."""
    file = Path(path) / BASE_NAME
    if not file.is_file():
        return None
    record = read_json_object(file)
    quant = record.get("quantization")
    if quant is not None and (not isinstance(quant, dict) or quant.get("method") != "nf4"
                              or quant.get("quantized_from") not in DTYPE_NAMES):
        raise ValueError(f"{file}: quantization must be null or {{\"method\": \"nf4\", \"quantized_from\": "
                         f"one of {', '.join(DTYPE_NAMES)}, ...}}, got {quant!r}")
    if record.get("compute_dtype") not in DTYPE_NAMES:
        raise ValueError(f"{file}: compute_dtype must be one of {', '.join(DTYPE_NAMES)}, got "
                         f"{record.get('compute_dtype')!r}")
    for key in ("base_model", "base_checkpoint", "base_fingerprint"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"{file}: {key} must be a string or null, got {record[key]!r}")
    return record


def save_adapter(model: nn.Module, path, *, base_model_name_or_path: str | None = None,
                 base: dict | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format) into folder `path`,
    and base.json when `base` (a base_record) is given.

    `base_model_name_or_path` defaults to the model's hub id when it has one (never a local path).
    Other files in the folder (e.g. training_args.json) are left alone. An adapter holding nan or inf
    is refused (ValueError) before anything is written.
    """
    from safetensors.torch import save_file

    if not lora_layers(model):
        raise ValueError("the model has no LoRA adapters to save (call apply_lora first)")
    path = Path(path)
    config = _adapter_config(model, base_model_name_or_path)
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    for key, tensor in tensors.items():   # an adapter that cannot be used is never written
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"refusing to write the adapter to {path}: tensor {key} holds "
                             f"{int((~torch.isfinite(tensor)).sum())} non-finite value(s) (nan or inf)")
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_atomic(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if base is not None:
        write_base_record(path, base)


def read_adapter_config(path) -> dict:
    """adapter_config.json of folder `path`, checked for the LoRA features this code implements."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = read_json_object(file)
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise ValueError(f"{file}: missing key(s) {', '.join(missing)}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {cfg['peft_type']!r} is not supported (LORA is)")
    unsupported = [k for k, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False))
                   if cfg.get(k, ok) != ok]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
                    if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{file}: unsupported LoRA option(s) {', '.join(unsupported)} (plain LoRA with one r and alpha is)")
    targets = cfg["target_modules"]
    if isinstance(targets, str):  # PEFT reads a string as a regex; a bare name means that one module
        if not re.fullmatch(r"[\w.]+", targets):
            raise ValueError(f"{file}: target_modules {targets!r} is a regex; a list of module names is expected")
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{file}: target_modules must be a non-empty list of module names, got {targets!r}")
    cfg["target_modules"] = targets
    r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{file}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"{file}: lora_alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{file}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    return cfg


def read_adapter_weights(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        hint = " (adapter_model.bin is a pickle file and is not read)" if (Path(path) / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{file}: no such file{hint}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: unreadable safetensors file ({e})") from None


def _adapter_shapes(model: nn.Module, targets: list[str], r: int) -> dict[str, tuple[int, int]]:
    """PEFT tensor name -> shape of the adapter apply_lora(targets, r) would give `model` (not changed)."""
    shapes = {}
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) or is_nf4(m)) and any(n == name or name.endswith("." + n) for n in targets):
            shapes[f"{PREFIX}{name}.lora_A.weight"] = (r, m.in_features)
            shapes[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, r)
    return shapes


@torch.no_grad()
def load_adapter(model: nn.Module, path, *, quantize: str | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Load a PEFT-format LoRA adapter from folder `path` into `model` (in place; returns it).

    Every check comes before any change, so a refused adapter leaves the model exactly as it was
    (no LoRA layer added, no layer quantized): the config, then every tensor name and shape both ways
    against the layers the model has (or would have, with the file's r and target_modules), then
    dtypes and finiteness. The copy of the head's weight that peft saves beside a head adapter
    (`lm_head.base_layer.weight`) must equal the model's. Only then does a model without LoRA get it
    (apply_lora with the file's r, lora_alpha, lora_dropout, target_modules, and `quantize`,
    `compute_dtype`), and the tensors are copied in.
    """
    cfg = read_adapter_config(path)
    tensors = read_adapter_weights(path)
    file = Path(path) / WEIGHTS_NAME
    layers = lora_layers(model)
    if not layers:
        try:
            targets = resolve_targets(model, cfg["target_modules"])
        except ValueError as e:
            raise ValueError(f"{Path(path) / CONFIG_NAME}: target_modules: {e}") from None
        expected = _adapter_shapes(model, targets, cfg["r"])
        head = model.get_submodule(HEAD) if HEAD in targets and hasattr(model, HEAD) else None
        head_weight = None if head is None else head.weight.detach()
    else:
        first = next(iter(layers.values()))
        if (first.r, first.alpha) != (cfg["r"], cfg["lora_alpha"]):
            raise ValueError(f"{Path(path) / CONFIG_NAME}: r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, but the model's "
                             f"LoRA layers have r={first.r}, alpha={first.alpha}")
        if any(layer.merged for layer in layers.values()):
            raise RuntimeError("the model's adapters are merged: call unmerge_lora(model) before loading an adapter")
        expected = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
        head_weight = layers[HEAD].base_weight() if HEAD in layers else None
    head_copy = f"{PREFIX}{HEAD}.base_layer.weight"
    if head_copy in tensors and head_weight is not None:
        # peft saves the head's whole weight beside a head adapter (save_embedding_layers="auto"):
        # accepted only when it is this model's head weight (compared in the lower of the two precisions)
        saved, w = tensors.pop(head_copy), head_weight
        low = saved.dtype if saved.element_size() < w.element_size() else w.dtype
        if saved.shape != w.shape or not torch.equal(saved.to(low), w.to(low)):
            raise ValueError(f"{file}: tensor {head_copy} (shape {tuple(saved.shape)}) is a copy of the output head's "
                             f"weight that differs from this model's lm_head weight (shape {tuple(w.shape)}): the "
                             "adapter was saved for another base model")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the model has, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) the model has no layer for, e.g. {', '.join(unexpected[:3])}")
        raise ValueError(f"{file} does not fit this model: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{file}: tensor {key} has shape {tuple(tensors[key].shape)}, but this model's layer "
                             f"expects {shape}: the adapter was saved for another base model")
        if not tensors[key].is_floating_point():
            raise ValueError(f"{file}: tensor {key} has dtype {tensors[key].dtype}; a floating-point tensor is expected")
        bad = int((~torch.isfinite(tensors[key])).sum())
        if bad:   # one nan in B makes every logit nan
            raise ValueError(f"{file}: tensor {key} holds {bad} non-finite value(s) (nan or inf): the adapter is "
                             "damaged (saved from a diverged run?)")
    if not layers:   # everything checked: only now does the model change
        apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                   targets=cfg["target_modules"], quantize=quantize, compute_dtype=compute_dtype)
    for key, param in lora_state_dict(model).items():
        param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
    return model


# ---- merged export --------------------------------------------------------------------------------

@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Hub-named dense tensors of the model with every adapter folded in; the model is not changed.

    Contains `lm_head.weight` whenever the head is untied or carries an adapter (see export_merged).
    """
    state: dict[str, torch.Tensor] = {}
    done: list[str] = []  # prefixes of modules already written as a whole
    join = lambda prefix, name: f"{prefix}.{name}" if prefix else name
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in done):
            continue
        if isinstance(module, LoRALinear) or is_nf4(module):
            if isinstance(module, LoRALinear):
                weight, bias = module.merged_weight(), getattr(module.base, "bias", None)
            else:
                weight, bias = dequantize_nf4(module), module.bias
            state[join(name, "weight")] = weight.to(dtype).cpu()
            if bias is not None:
                state[join(name, "bias")] = bias.detach().to(dtype).cpu()
            done.append(name + ".")
            continue
        for pname, p in module.named_parameters(recurse=False):
            state[join(name, pname)] = p.detach().to(dtype).cpu()
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                state[join(name, bname)] = b.detach().to(dtype).cpu()
    return state


def check_finite(state: dict[str, torch.Tensor], what: str = "float32") -> None:
    """Raise NonFiniteError naming the first tensor of `state` with a NaN or inf, and how many it holds."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(f"merged tensor {name} has {bad} value(s) that are not finite in {what} "
                                 "(NaN, inf, or beyond the dtype's range)")


@torch.no_grad()
def merged_export_state(model: nn.Module):
    """(config, state) of the merged model as exported: float32 hub-named tensors, checked finite.

    Tie rule: a tied model whose head has an adapter is exported untied (its own `lm_head.weight` =
    embedding + delta, `tie_word_embeddings: false`), the embedding unchanged; a tied model without a
    head adapter stays tied and `lm_head.weight` is left out, as in hub checkpoints.
    """
    config = model.config
    tied = bool(config.tie_word_embeddings)
    untie = tied and isinstance(getattr(model, HEAD, None), LoRALinear)
    state = merged_state_dict(model, torch.float32)
    if tied and not untie:
        state.pop(f"{HEAD}.weight", None)
    check_finite(state)
    return dataclasses.replace(config, tie_word_embeddings=tied and not untie), state


EXPORT_MARKER = "slm_ec_export.json"   # in every hub-layout export: what export.py wrote there
GGUF_MAGIC = b"GGUF"


def check_export_path(path, *, folder: bool, overwrite: bool, clean: bool = True) -> Path:
    """The export target, refused when it exists (unless overwrite), is a link, is of the other kind (a file for
    a folder export or the reverse), or is not an export of ours: a folder is replaced only when its
    EXPORT_MARKER, read by content, says export.py wrote it and it holds nothing else than the files the marker
    lists (a training run, a model download or a folder with the user's files is never replaced); a file only
    when it is a GGUF file. With `clean`, stale temporary siblings of a killed export of `path` are removed first."""
    path = Path(path)
    if clean:
        remove_stale_exports(path)
    if not path.exists() and not path.is_symlink():
        return path
    if not overwrite:
        raise FileExistsError(f"{path} already exists")
    if path.is_symlink():
        raise FileExistsError(f"{path} is a link: not replacing it (or what it points to)")
    if folder and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder: a hub-layout export is a folder")
    if not folder and path.is_dir():
        raise FileExistsError(f"{path} is a folder: a GGUF export is one file")
    if folder:
        marker = read_marker(path / EXPORT_MARKER, "export.py")
        if marker is None:
            raise FileExistsError(f"{path} holds no {EXPORT_MARKER} of export.py, so export.py did not write it "
                                  "(a training run, a model or your files?): not replacing it; name another --out")
        listed = set(marker.get("files") or ()) | {EXPORT_MARKER}
        other = sorted(p.name for p in path.iterdir() if p.name not in listed)
        if other:
            raise FileExistsError(f"{path} also holds {', '.join(other[:5])}, which export.py did not write: not "
                                  "replacing it; move them out or name another --out")
    else:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise FileExistsError(f"{path} is not a GGUF file: not replacing it; name another --out")
    return path


def remove_stale_exports(path: Path) -> None:
    """Remove what a killed export of `path` left beside it: .NAME.*.tmp (an unfinished export) and .NAME.*.old
    (the previous export, moved aside just before the rename), the latter only when it is an export of ours."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        remove_path(stale)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.old"):
        if stale.is_symlink() or not stale.is_dir() or read_marker(stale / EXPORT_MARKER, "export.py") is not None \
                or not any(stale.iterdir()):
            remove_path(stale)


def _publish(path, write, *, folder: bool, overwrite: bool, needed: int | None = None) -> None:
    """write(tmp) into a temporary sibling of `path`, fsync it, rename it to `path`, fsync the parent.

    `path` only ever holds a complete export: a failure or a crash leaves it as it was (the temporary
    sibling is removed on failure). An existing `path` is replaced only with overwrite=True. A full disk is
    DiskFull naming `path` and `needed`, the bytes the export needs.
    """
    path = check_export_path(path, folder=folder, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)  # mkdtemp/mkstemp make them private
        fsync_tree(tmp) if folder else fsync_path(tmp)
        check_export_path(path, folder=folder, overwrite=overwrite, clean=False)  # it may have appeared meanwhile
        if folder:   # a folder is renamed only over an empty one: the old one goes aside first (.NAME.*.old)
            swap_in(tmp, path, tmp.with_suffix(".old"))
        else:
            os.replace(tmp, path)
            fsync_path(path.parent)
    except BaseException as e:
        remove_path(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(path, needed) from None
        raise


def dtype_name(dtype: torch.dtype | str) -> str:
    """The one spelling of a dtype in JSON files (config.json, base.json, metrics.json): "bfloat16", "float32"."""
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def export_merged(model: nn.Module, tokenizer, path, *, dtype: torch.dtype = torch.bfloat16,
                  overwrite: bool = False) -> None:
    """Write the merged model in hub layout to folder `path`: bf16, f16 or fp32.

    Files: config.json, generation_config.json, model.safetensors and (unless tokenizer is None) the
    tokenizer files. The tie rule is `merged_export_state`'s. The merged weights are checked finite in
    float32 and again in `dtype` (an f16 overflow is refused); nothing is written then.
    Written to a temporary sibling folder, fsynced and renamed (see _publish); an existing `path` is
    replaced only with overwrite=True.
    """
    from safetensors.torch import save_file

    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"export dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
    check_export_path(path, folder=True, overwrite=overwrite)  # before the work of merging
    config, state = merged_export_state(model)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    check_finite(state, dtype_name(dtype))
    out_config = dataclasses.replace(config, torch_dtype=dtype_name(dtype))
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(config, k, None) is not None}
    if tokenizer is not None and len(tokenizer.stop_ids) > 1:  # stop at the same tokens as the source
        generation["eos_token_id"] = [tokenizer.eos_id, *sorted(tokenizer.stop_ids - {tokenizer.eos_id})]

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(out_config.to_dict(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / EXPORT_MARKER).write_text(json.dumps({
            "written_by": "slm-ec export.py", "files": files,
            "note": "export.py --overwrite replaces this folder only while it holds these files and no others"},
            indent=2) + "\n")

    _publish(path, write, folder=True, overwrite=overwrite, needed=tensor_bytes(state))


@torch.no_grad()
def export_gguf(model: nn.Module, tokenizer, path, *, quant: str = "f16", name: str = "",
                overwrite: bool = False) -> None:
    """Write the merged model as a llama.cpp GGUF file at `path` (f32, f16 or q8_0; see model.gguf.write_gguf).

    Same merge, tie rule and finite checks as export_merged (a tied head with an adapter becomes an
    `output` tensor, token_embd unchanged); the same temporary sibling, fsync and rename.
    """
    from model.gguf import GGUF_QUANTS, write_gguf

    if quant not in GGUF_QUANTS:
        raise ValueError(f"GGUF quantization must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer: pass the model's tokenizer")
    check_export_path(path, folder=False, overwrite=overwrite)
    config, state = merged_export_state(model)
    scale = {"f32": 1.0, "f16": 0.5, "q8_0": 34 / 128}[quant]   # bytes per float32 byte (Q8_0: 34 bytes a block of 32)
    _publish(path, lambda tmp: write_gguf(tmp, config, state, tokenizer, quant=quant, name=name),
             folder=False, overwrite=overwrite, needed=int(tensor_bytes(state) * scale))


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
