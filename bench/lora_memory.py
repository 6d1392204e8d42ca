"""Memory of a QLoRA setup per model preset: the NF4 base and the LoRA adapters, beside the bf16 model.

    python bench/lora_memory.py                      # every preset, markdown table on stdout
    python bench/lora_memory.py smollm2-360m --r 16  # some presets
    python bench/lora_memory.py smollm2-135m --full  # also quantize a whole random model and compare

What is counted (weights only: no activations, gradients or optimizer state):
- bf16: every parameter at 2 bytes; a tied head shares the embedding and is counted once.
- NF4 base: each decoder linear in NF4 with double quantization, as `apply_lora(quantize="nf4")` builds it:
  n/2 bytes of 4-bit codes + n/64 absmax bytes (8-bit, double quantization) + 4 bytes per 256 absmax
  blocks (the second-level float32 scales) + a float32 offset + the two code maps (16 and 256 float32)
  per layer; embeddings, norms and an untied head stay bf16 (all presets have tied heads).
- LoRA: the A and B matrices in float32, for the paper's targets (7 projections + lm_head) and without lm_head.
The NF4 formula is checked against bitsandbytes by quantizing one random layer of every distinct shape
(pass --full to quantize a whole random model instead; meant for the small presets). The adapter
sizes come from `apply_lora` itself on a meta-device model.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `import model`, `import lora`

import torch
import torch.nn as nn

from lora import apply_lora, quantize_nf4
from lora.nf4 import BLOCKSIZE, nf4_nbytes
from model import PRESETS, Llama, ModelConfig

NESTED_BLOCKSIZE = 256  # absmax values per second-level (float32) scale
CODE_MAPS = (16 + 256) * 4  # the NF4 map and the 8-bit dynamic map of the absmax, float32, stored per layer


def nf4_linear_bytes(in_features: int, out_features: int) -> int:
    """Bytes of one bias-free linear in NF4 with double quantization (blocks of 64, nested blocks of 256)."""
    n = in_features * out_features
    blocks = math.ceil(n / BLOCKSIZE)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 + CODE_MAPS


def linear_shapes(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, in, out) of the seven projections of one decoder layer."""
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


def adapter_params(config: ModelConfig, r: int, targets) -> int:
    with torch.device("meta"):
        m = Llama(config)
    apply_lora(m, r=r, alpha=r, targets=targets)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def measure(alias: str, r: int = 16) -> dict:
    config = ModelConfig.from_name(alias)
    with torch.device("meta"):
        m = Llama(config)
    total = sum(p.numel() for p in m.parameters())                    # tied head counted once
    linear = sum(i * o for _, i, o in linear_shapes(config)) * config.num_hidden_layers
    rest = total - linear                                             # embedding, norms (+ an untied head)
    nf4 = sum(nf4_linear_bytes(i, o) for _, i, o in linear_shapes(config)) * config.num_hidden_layers
    return dict(preset=alias, params=total, bf16=2 * total, nf4_linears=nf4, rest_bf16=2 * rest,
                nf4_base=nf4 + 2 * rest, lora_paper=4 * adapter_params(config, r, "paper"),
                lora_no_head=4 * adapter_params(config, r, "no-head"), tied=config.tie_word_embeddings)


def verify_shapes(aliases) -> int:
    """Quantize one random layer of every distinct shape with bitsandbytes; the formula must match exactly."""
    shapes = sorted({(i, o) for a in aliases for _, i, o in linear_shapes(ModelConfig.from_name(a))})
    for i, o in shapes:
        layer = nn.Linear(i, o, bias=False, dtype=torch.bfloat16)
        nn.init.normal_(layer.weight, std=0.02)
        got, want = nf4_nbytes(quantize_nf4(layer)), nf4_linear_bytes(i, o)
        if got != want:
            raise AssertionError(f"NF4 bytes of a {o}x{i} layer: bitsandbytes holds {got}, the formula says {want}")
    return len(shapes)


def verify_full(alias: str, row: dict) -> int:
    """Build a random bf16 model, quantize it with apply_lora, and count the bytes it really holds."""
    config = ModelConfig.from_name(alias)
    torch.manual_seed(0)
    m = Llama(config).to(torch.bfloat16)
    apply_lora(m, quantize="nf4")
    seen, nbytes = set(), 0
    for module in m.modules():
        if hasattr(module, "quant_state"):  # a Linear4bit
            nbytes += nf4_nbytes(module)
            seen.update(id(p) for p in module.parameters())
    for p in m.parameters():
        if id(p) not in seen and not p.requires_grad:
            nbytes += p.numel() * p.element_size()
    if nbytes != row["nf4_base"]:
        raise AssertionError(f"{alias}: the quantized model holds {nbytes} bytes, the formula says {row['nf4_base']}")
    return nbytes


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def table(rows: list[dict], r: int) -> str:
    lines = [f"| preset | params | bf16 MiB | NF4 base MiB (linears + bf16 embed/norms) | LoRA r={r} fp32 MiB, paper "
             "| LoRA fp32 MiB, no head | NF4 + LoRA (paper) MiB | vs bf16 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        both = row["nf4_base"] + row["lora_paper"]
        lines.append(f"| {row['preset']} | {row['params'] / 1e6:,.1f} M | {mib(row['bf16'])} | {mib(row['nf4_base'])} "
                     f"({mib(row['nf4_linears'])} + {mib(row['rest_bf16'])}) | {mib(row['lora_paper'])} "
                     f"| {mib(row['lora_no_head'])} | {mib(both)} | {both / row['bf16']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", default=list(PRESETS), help="model aliases (default: all)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--full", action="store_true", help="quantize whole random models too (slow for large ones)")
    args = parser.parse_args(argv)
    unknown = [a for a in args.presets if a not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}; valid: {', '.join(PRESETS)}")
    rows = [measure(a, args.r) for a in args.presets]
    n = verify_shapes(args.presets)
    print(table(rows, args.r))
    print(f"\nNF4 bytes per layer checked against bitsandbytes for {n} distinct layer shapes. The head is tied to "
          "the embedding in every preset, so it is stored once (bf16); its LoRA delta is in the adapter column.")
    if args.full:
        for a, row in zip(args.presets, rows):
            print(f"{a}: a whole random model quantized by apply_lora holds {verify_full(a, row):,} bytes (formula: equal)")
    return rows


if __name__ == "__main__":
    main()
