"""LoRALinear: a frozen base linear layer plus a trainable low-rank update (LoRA, Hu et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .nf4 import dequantize_nf4, is_nf4


class LoRALinear(nn.Module):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r

    - `base`: the frozen layer, an `nn.Linear` or a bitsandbytes NF4 `Linear4bit` (QLoRA); its
      weight W has shape (out, in), as in `nn.Linear`.
    - `lora_A`: `nn.Linear(in, r, bias=False)`, weight A of shape (r, in), Kaiming-uniform (a=sqrt(5),
      the `nn.Linear` default, as in PEFT and loralib).
    - `lora_B`: `nn.Linear(r, out, bias=False)`, weight B of shape (out, r), zero-initialised, so the
      layer equals its base at step 0.
    - `scaling = alpha / r` (LoRA paper, section 4.1: with alpha fixed, retuning the learning rate for a
      new r is rarely needed); computed once.
    - dropout acts on the LoRA branch's input only, and only in training mode.

    Precision (PEFT's policy): A and B are float32 master weights (`lora_dtype`); the branch runs on x
    cast to that dtype and its output is cast back to the base output's dtype before the sum.

    Merged form: W' = W + (B @ A) * scaling, computed in float32. `merge()` and `unmerge()` are explicit
    and idempotent (never triggered by `.train()`/`.eval()`):
    - dense base: W is updated in place and restored by subtraction (exact up to rounding in W's dtype);
    - NF4 base: the base becomes a dense `nn.Linear` holding dequant(W) + delta in the dtype the weight
      was quantized from; the NF4 layer is kept aside and put back as it was by `unmerge()`;
    - shared base weight (`tied=True`, an lm_head tied to the embedding): the merged weight is a new,
      separate Parameter; `unmerge()` re-attaches the shared one, so the embedding is never written.
    `disabled=True` gives the base layer's output (the adapter is skipped); a merged layer refuses it.

    `weight` reads (and, for `Llama.tie_weights()`, assigns) the base layer's weight, so code that
    looks at `model.lm_head.weight` keeps working on a wrapped head.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 lora_dtype: torch.dtype = torch.float32, tied: bool = False):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.tied = tied
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # ---- the base layer's weight, seen through the wrapper --------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def __setattr__(self, name, value):
        # `Llama.tie_weights()` does `lm_head.weight = embed_tokens.weight`: hand it to the base layer.
        if name == "weight" and "base" in self._modules:
            if self.merged:
                raise RuntimeError("cannot replace the base weight of a merged LoRA layer; unmerge it first")
            self.base.weight = value
            return
        super().__setattr__(name, value)

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            if self.disabled:
                raise RuntimeError("this LoRA layer is merged into its base weight, so it cannot be disabled; "
                                   "unmerge it first")
            return result
        if self.disabled:
            return result
        lora_x = self.dropout(x.to(self.lora_A.weight.dtype))
        return result + (self.lora_B(self.lora_A(lora_x)) * self.scaling).to(result.dtype)

    # ---- merge ------------------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(B @ A) * scaling, float32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """The base layer's dense weight (dequantized if NF4), in its own dtype."""
        return dequantize_nf4(self.base) if is_nf4(self.base) else self.base.weight.detach()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (B @ A) * scaling in float32, whether or not the layer is merged; the layer is not changed."""
        w = self.base_weight().float()
        return w if self.merged else w + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta = self.delta_weight()
        if is_nf4(self.base):
            nf4 = self.base
            w = dequantize_nf4(nf4)
            dense = nn.Linear(self.in_features, self.out_features, bias=nf4.bias is not None, device="meta")
            dense.weight = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=False)
            if nf4.bias is not None:
                dense.bias = nn.Parameter(nf4.bias.detach().clone(), requires_grad=False)
            dense.train(nf4.training)
            self.__dict__["_nf4_base"] = nf4  # not a submodule: out of state_dict() and parameters()
            self.base = dense
        elif self.tied:
            w = self.base.weight
            self.__dict__["_shared_weight"] = w
            self.base.weight = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=False)
        else:
            w = self.base.weight
            w.copy_((w.float() + delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if "_nf4_base" in self.__dict__:
            nf4 = self.__dict__.pop("_nf4_base")
            device = self.base.weight.device
            if nf4.weight.device != device:  # the model was moved while merged
                nf4 = nf4.to(device)
            self.base = nf4
        elif "_shared_weight" in self.__dict__:
            self.base.weight = self.__dict__.pop("_shared_weight")
        else:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, dropout={p}, tied={self.tied}, merged={self.merged}")


def lora_delta(A: torch.Tensor, B: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
    """(B @ A) * alpha / r in float32: the pure form of the merge (A: (r, in), B: (out, r))."""
    return (B.float() @ A.float()) * (alpha / r)


__all__ = ["LoRALinear", "lora_delta"]
