"""Peak memory (RSS) of building a QLoRA model: the NF4 base plus LoRA, from a hub-layout folder.

    python bench/qlora_build_rss.py write smollm2-1.7b DIR      # a random checkpoint of a preset's shape (bf16)
    /usr/bin/time -v python bench/qlora_build_rss.py build DIR  # load + apply_lora(quantize="nf4"), fp32 base

`build` does what train.py does on a CPU (`--quant nf4`, `--dtype auto` = fp32): the checkpoint is
read, each decoder linear is quantized to NF4 and the paper's LoRA targets are wrapped. It prints the
model's bytes and the process's peak RSS (`ru_maxrss`; `/usr/bin/time -v` reports the same figure
as "Maximum resident set size").

The floor is the NF4 model itself: 4.5 bits per decoder weight, plus the embedding (and any untied head)
in fp32. Built the direct way (every dense weight loaded, then quantized) the peak is the dense fp32
model plus what reading the checkpoint holds; read one tensor at a time and quantized as it comes
(`load_model(..., quantize_linear=...)`) the peak is the NF4 model plus one dense tensor.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: `import model`, `import lora`
sys.path.insert(0, str(ROOT / "tests"))   # tests/tiny.py: a small tokenizer for the random checkpoint

import torch


def write(preset: str, folder: Path) -> None:
    """config.json, model.safetensors (random bf16 weights, std 0.02) and a small tokenizer, in hub layout."""
    from safetensors.torch import save_file

    from model import Llama, ModelConfig
    from tiny import tiny_tokenizer_json

    config = ModelConfig.from_name(preset)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s)).to(torch.bfloat16)
             for k, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(384))
    print(f"wrote {folder}: {preset}, {sum(v.numel() for v in state.values()) / 1e9:.2f}B parameters in bf16")


def build(folder: Path, stream: bool) -> None:
    from lora import apply_lora, quantize_nf4
    from model import load_model

    t0 = time.time()
    kw = {"quantize_linear": partial(quantize_nf4, compute_dtype=torch.float32)} if stream else {}
    model, _ = load_model(folder, dtype=torch.float32, **kw)
    apply_lora(model, quantize="nf4", compute_dtype=torch.float32)
    held = sum(p.numel() * p.element_size() for p in model.parameters())   # NF4: the packed codes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB
    print(f"built {folder.name} with NF4 base ({'one tensor at a time' if stream else 'dense, then quantized'}) "
          f"in {time.time() - t0:.0f} s: parameters {held / 2**30:.2f} GiB, peak RSS {peak:.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("preset")
    w.add_argument("folder", type=Path)
    b = sub.add_parser("build")
    b.add_argument("folder", type=Path)
    b.add_argument("--dense-first", action="store_true",
                   help="load the whole dense model, then quantize (what load_model without quantize_linear gives)")
    args = p.parse_args()
    write(args.preset, args.folder) if args.command == "write" else build(args.folder, not args.dense_first)


if __name__ == "__main__":
    main()
