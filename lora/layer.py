"""LoRALinear: a frozen base linear layer plus a trainable low-rank update (LoRA, Hu et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    - dropout acts on the LoRA branch's input only, and only in training mode. The branch then runs as
      `LoRADropoutBranch`: its mask is one bool per element, drawn by `keep_mask` and kept for backward
      with x itself; the dropped copy of x is recomputed in backward, never stored (see that class).

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
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        if self.training and p > 0:
            keep = keep_mask(x.shape, p, x.device)
            branch = LoRADropoutBranch.apply(x, self.lora_A.weight, self.lora_B.weight, keep, 1.0 / (1.0 - p),
                                             self.scaling)
        else:
            branch = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling
        return result + branch.to(result.dtype)

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


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device) -> torch.Tensor:
    """A bool dropout mask of `shape`: True (keep) with probability 1 - p, independently per element.

    Each element takes one 16-bit lane of uniform random int64 words from torch's generator (so
    `torch.manual_seed` reproduces it) and is kept when the lane, read as a signed integer u, has
    u >= -32768 + round(p * 65536): P(keep) = 1 - round(p * 65536) / 65536, within 2^-17 of 1 - p.
    Four elements per random word: on a CPU this draws a mask 3-4x faster than `bernoulli_`, which
    spends one generator call per element (`torch.nn.Dropout`'s cost in a LoRA training step).
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    lanes = words.view(torch.int16)[:n].view(shape)        # (words,) int64 -> (4 * words,) int16 -> shape
    return lanes >= -32768 + round(p * 65536)


class LoRADropoutBranch(torch.autograd.Function):
    """The LoRA branch with dropout, given its mask: out = ((x * keep * s) @ A^T @ B^T) * scaling, s = 1 / (1 - p).

    The same operations, in the same order and dtypes, as `lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling`
    with that mask (so output and gradients are bitwise those of the plain form), but what autograd keeps
    for backward is x (which the model holds anyway), the bool mask (1 byte an element), A, B and the
    rank-r h = x_dropped @ A^T; the float32 copy of x and its dropped copy are recomputed in backward.
    x: (..., in) in the base's dtype; A: (r, in), B: (out, r) float32; keep: bool, x's shape.
    Backward, with g the gradient of out (float32, (..., out)) and gs = g * scaling:
      dB = gs^T h,   dh = gs B,   dA = dh^T x_dropped,   dx = (dh A) * keep * s  (cast to x's dtype).
    """

    @staticmethod
    def forward(ctx, x, a, b, keep, keep_scale: float, scaling: float):
        dropped = x.to(a.dtype, copy=True).mul_(keep).mul_(keep_scale)  # (..., in); copy: never x itself
        h = F.linear(dropped, a)                                     # (..., r)
        ctx.save_for_backward(x, a, b, keep, h)
        ctx.keep_scale, ctx.scaling = keep_scale, scaling
        return F.linear(h, b) * scaling                             # (..., out)

    @staticmethod
    def backward(ctx, g):
        x, a, b, keep, h = ctx.saved_tensors
        gs = (g * ctx.scaling).reshape(-1, b.shape[0])              # (N, out)
        h2 = h.reshape(-1, a.shape[0])                              # (N, r)
        grad_b = gs.t().mm(h2) if ctx.needs_input_grad[2] else None  # (out, r)
        dh = gs.mm(b)                                               # (N, r)
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            dropped = x.to(a.dtype, copy=True).mul_(keep).mul_(ctx.keep_scale).reshape(-1, a.shape[1])  # (N, in)
            grad_a = dh.t().mm(dropped)                             # (r, in)
        if ctx.needs_input_grad[0]:
            grad_x = dh.mm(a).view(x.shape).mul_(keep).mul_(ctx.keep_scale).to(x.dtype)     # (..., in)
        return grad_x, grad_a, grad_b, None, None, None


def lora_delta(A: torch.Tensor, B: torch.Tensor, alpha: float, r: int) -> torch.Tensor:
    """(B @ A) * alpha / r in float32: the pure form of the merge (A: (r, in), B: (out, r))."""
    return (B.float() @ A.float()) * (alpha / r)


__all__ = ["LoRADropoutBranch", "LoRALinear", "keep_mask", "lora_delta"]
