"""apply_lora: quantize the base linears (optional), wrap the targets in LoRALinear, freeze the rest.

Injection happens after the base weights are loaded, by replacing modules in place (a walk over
`named_modules` plus `setattr` on the parent), so no state-dict key remapping is ever needed and
`model/` knows nothing about LoRA. Targets are matched by module name like PEFT's `target_modules`
list: a target matches a linear layer whose name is the target or ends in "." + target.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .layer import LoRALinear
from .nf4 import check_quantizable, is_nf4, quantize_nf4

# The paper's (eCeLLM's) targets: every projection of every layer, and the output head.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# The seven projections only: the adapter shape serving engines (vLLM, llama.cpp) accept.
NO_HEAD_TARGETS = DEFAULT_TARGETS[:-1]
TARGET_PRESETS = {"paper": DEFAULT_TARGETS, "no-head": NO_HEAD_TARGETS}
HEAD = "lm_head"  # never quantized, and the one layer that may share its weight with the embedding


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers, in model order (q_proj, ..., lm_head)."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, LoRALinear)) or is_nf4(module):
            names[_leaf(name)] = None
    return list(names)


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """A TARGET_PRESETS key, one name or a list of names -> the list of names, each checked against the model."""
    if isinstance(targets, str):
        targets = TARGET_PRESETS.get(targets, (targets,))
    targets = list(dict.fromkeys(targets))
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA targets must be non-empty module names or one of {list(TARGET_PRESETS)}, got {targets!r}")
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_nf4(m)]
    unknown = [t for t in targets if not any(_matches(n, t) for n in linear_names)]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}: this model's linear layers are "
                         f"{', '.join(linear_layer_names(model))} (presets: {', '.join(TARGET_PRESETS)})")
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.1, targets=DEFAULT_TARGETS,
               quantize: str | None = None, compute_dtype: torch.dtype = torch.bfloat16,
               lora_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Add LoRA adapters to `model` in place and return it; call after the base weights are loaded.

    - targets: a TARGET_PRESETS key ("paper": the seven projections and lm_head, "no-head": the seven
      projections) or a list of module names; an unknown name is an error that lists the model's
      linear layer names.
    - quantize="nf4": every linear layer except lm_head becomes a bitsandbytes NF4 `Linear4bit`
      (double quantization, `compute_dtype` compute), targeted or not, as in QLoRA where the whole base
      is 4-bit. Embeddings, norms and lm_head's base weight stay in full precision. Each dense weight is
      released as soon as its layer is quantized. Layers already NF4 (a model loaded with
      `load_model(..., quantize_linear=...)`) are wrapped as they are.
    - Every check (targets, ranks, NF4 shapes) is made before the first layer changes: a refusal
      leaves the model as it was.
    - Every existing parameter is frozen; the trainable ones are exactly the LoRA A and B matrices
      (float32 by default, `lora_dtype`), on the device of the layer they adapt.
    - A head whose weight is shared with the embedding (tied) keeps sharing it: the adapter is a delta on
      the output projection only, and the embedding is never written (see LoRALinear).
    Works on meta-device models with quantize=None (for counting parameters).
    Records `model.lora_config = dict(r, alpha, dropout, targets, quantize)`.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if not (isinstance(lora_dtype, torch.dtype) and lora_dtype.is_floating_point):
        raise ValueError(f"lora_dtype must be a floating-point torch dtype, got {lora_dtype!r}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters (apply_lora was called before)")
    targets = resolve_targets(model, targets)
    if quantize is not None and any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(f"quantize={quantize!r} needs real weights, but the model is on the meta device: load the "
                         "weights first (on meta, apply_lora works with quantize=None, e.g. to count parameters)")

    # Parameters seen under more than one name are shared (a tied head and the embedding).
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1

    # Every layer to change, and every check, before the first change: a refusal leaves the model as it was.
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_nf4(m)]
    names = [n for n in names if any(_matches(n, t) for t in targets) or (quantize is not None and _leaf(n) != HEAD)]
    to_quantize = [n for n in names if quantize == "nf4" and _leaf(n) != HEAD and not is_nf4(model.get_submodule(n))]
    if to_quantize:
        check_quantizable([model.get_submodule(n) for n in to_quantize])

    model.requires_grad_(False)
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0])
        layer = parent._modules[_leaf(name)]
        targeted = any(_matches(name, t) for t in targets)
        tied = seen.get(id(layer.weight), 0) > 1
        base = quantize_nf4(layer, compute_dtype) if name in to_quantize else layer
        new = LoRALinear(base, r, alpha, dropout, lora_dtype, tied=tied) if targeted else base
        new.train(layer.training)  # a new module starts in training mode: keep the replaced layer's mode
        setattr(parent, _leaf(name), new)
        if base is not layer:
            layer.weight = None   # the dense weight is released now: peak = the NF4 model plus one dense layer
        del layer, base, new
    quantized = any(is_nf4(m) for m in model.modules())
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=targets, quantize="nf4" if quantized else None)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B @ A * alpha/r); idempotent. NF4 bases are dequantized."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: NF4 bases and tied heads are restored exactly, dense bases by subtraction."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """Base-model outputs inside the block (adapters skipped); refused while adapters are merged."""
    layers = list(lora_layers(model).values())
    merged = [name for name, layer in lora_layers(model).items() if layer.merged]
    if merged:
        raise RuntimeError(f"adapters are merged ({merged[0]}, ...): call unmerge_lora(model) before disabling them")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disabled = flag
