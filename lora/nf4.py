"""NF4 base layers for QLoRA: quantize an `nn.Linear` into a bitsandbytes `Linear4bit`, and dequantize it back.

The settings are QLoRA's (Dettmers et al. 2023, section 3), each passed explicitly because the
bitsandbytes defaults differ (`quant_type="fp4"`, `compute_dtype=None`):
- 4-bit NormalFloat (`quant_type="nf4"`), one absmax per block of 64 weights;
- double quantization (`compress_statistics=True`): the absmax values are themselves quantized to
  8 bits in blocks of 256, with one float32 scale per such block and one float32 offset per layer;
- compute dtype bfloat16: `Linear4bit.forward` casts its input to bf16, dequantizes the weight to bf16,
  multiplies, and casts the result back to the input's dtype.

Quantization happens when a not-yet-quantized `Params4bit` is moved to a device (`.to(device)`),
on CUDA and, since bitsandbytes 0.49, on the CPU too (pure-torch and AVX-512 kernels). The weight
is quantized from the dtype it has (bf16 on a GPU run, fp32 in CPU tests); `dequantize_nf4` returns
that dtype.

bitsandbytes gotcha handled here: on a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode
without grad repacks the weight *in place* into a kernel-specific layout (`packing_format_for_cpu`),
which needs in_features divisible by 64 and makes eval-mode numerics depend on the CPU model. We turn
that path off (`support_avx512bf16_for_cpu = False`), so an NF4 layer computes the same thing in
training and evaluation, on every CPU, and its weight keeps the standard NF4 layout.

bitsandbytes is imported lazily: `is_nf4` never imports it (no module can be a `Linear4bit` before
bitsandbytes has been imported), so `import lora` stays light. It is imported through `import_bitsandbytes`,
which keeps bitsandbytes from loading code from the hub (see there).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

BLOCKSIZE = 64  # weights per absmax (bitsandbytes' default for 4-bit; QLoRA's value)


KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"   # bitsandbytes' line when it gets no hub kernel


def import_bitsandbytes():
    """The bitsandbytes module, imported so that it loads no code from the hub and says nothing about it.

    On a CPU with AVX512-BF16, bitsandbytes' CPU backend calls, at import, the `kernels` package's
    get_kernel("kernels-community/quantization-bitsandbytes"): code downloaded from the hub (stopped today
    only by that package's trust check), and logs a warning line when it fails, as it does without `kernels`.
    slm-ec loads no remote code: during the import `kernels` is hidden (a None entry in sys.modules makes
    `from kernels import ...` an ImportError), and the warning is dropped. Nothing is lost: that kernel serves
    only the eval-mode repacking path that quantize_nf4 turns off, bitsandbytes' own kernels do the rest.
    """
    import logging

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(KERNEL_WARNING))
    missing = object()
    saved = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None
    try:
        import bitsandbytes
    finally:
        if saved is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved
    return bitsandbytes


def is_nf4(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` (without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def check_quantizable(linears: list[nn.Linear]) -> None:
    """Raise ValueError (or ImportError without bitsandbytes) unless every layer can be quantized to NF4
    here; apply_lora calls it for all its layers before it changes any."""
    import_bitsandbytes()  # a missing package is found before any layer changes

    for linear in linears:
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError("quantize='nf4' needs real weights, but the model is on the meta device: load the "
                             "weights first (apply_lora works on meta models only with quantize=None)")
        if not weight.is_floating_point():
            raise ValueError(f"cannot quantize a {weight.dtype} weight to NF4 (float32, bfloat16 or float16 expected)")
        if weight.device.type == "cpu" and linear.in_features % BLOCKSIZE:
            # bitsandbytes' CPU kernels quantize row by row: a block that would straddle two rows comes back
            # with about 25% error instead of NF4's 9% (every real preset has in_features divisible by 64).
            raise ValueError(f"cannot quantize a Linear with in_features={linear.in_features} to NF4 on the CPU: "
                             f"bitsandbytes' CPU kernels need in_features divisible by {BLOCKSIZE}; use quantize=None "
                             f"or a CUDA device")


def quantize_nf4(linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A frozen `bnb.nn.Linear4bit` holding `linear`'s weight in NF4 with double quantization.

    The weight is quantized on the device it lives on; the dense weight is released once the
    caller drops `linear` (or sets `linear.weight = None`). The bias (if any) is kept as a frozen full-precision Parameter.
    """
    bnb = import_bitsandbytes()
    check_quantizable([linear])
    weight = linear.weight
    # Built on meta so that no dense random weight is allocated and then thrown away.
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
    param = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, compress_statistics=True,
                              quant_type="nf4", blocksize=BLOCKSIZE, module=q)
    q.weight = param.to(weight.device)  # moving a not-yet-quantized Params4bit quantizes it (CPU or CUDA)
    q.support_avx512bf16_for_cpu = False  # no in-place repacking in eval mode (see the module docstring)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    q.train(linear.training)
    return q


@torch.no_grad()
def dequantize_nf4(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight a `Linear4bit` multiplies by, in the dtype it was quantized from."""
    bnb = import_bitsandbytes()
    weight = module.weight
    state = weight.quant_state
    if state is None:
        raise ValueError("this Linear4bit has not been quantized yet (move its weight to a device first)")
    return bnb.functional.dequantize_4bit(weight.data, state)


def nf4_nbytes(module: nn.Module) -> int:
    """Bytes a quantized `Linear4bit` holds: packed codes, quant state (absmax, nested absmax, maps, offset), bias."""
    state = module.weight.quant_state
    tensors = [module.weight.data, state.absmax, state.code]
    if state.offset is not None:
        tensors.append(state.offset)
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    if module.bias is not None:
        tensors.append(module.bias)
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
