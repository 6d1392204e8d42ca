"""Export a fine-tuned model for use outside this project: the adapter merged into the base, written as a
hub-layout folder (transformers, vLLM, this project) or as a llama.cpp GGUF file (llama.cpp, ollama, LM Studio).

    python export.py --model smollm2-360m --adapter runs/x/adapter --format hf --out runs/x/merged
    python export.py --model smollm2-360m --adapter runs/x/adapter --format hf --dtype bf16 --out runs/x/merged-bf16
    python export.py --model FILE.gguf --adapter runs/x/adapter --format gguf --gguf-quant q8_0 --out runs/x/model.gguf
    python evaluate.py --model runs/x/model.gguf --out runs/x/eval-gguf    # the export scores as model + adapter

The merge, for every adapted layer: W' = W + (B @ A) * alpha / r, in float32, on the base as the adapter was
trained on it (base.json: the same dtype; with --quant nf4 the NF4 base quantized from that dtype, dequantized:
the very weights training saw), then cast once.
A tied output head with an adapter becomes an untied head (its own weight = embedding + delta); the
embedding is never changed. Without --adapter the base model is converted as it is.

Formats:
  hf    folder: config.json (tie_word_embeddings as above, torch_dtype), generation_config.json,
        model.safetensors, tokenizer.json, tokenizer_config.json; --dtype f32 (default: the merged
        weights exactly as evaluate.py computes them, so the export scores as base + adapter), bf16 or
        f16 (half the size; the rounding can change a few greedy answers)
  gguf  one file, architecture llama, with the tokenizer and chat template llama.cpp needs;
        --gguf-quant f16 (default), q8_0 or f32 for the 2-D weights (norms stay f32)

Safety: a merged weight that is not finite (NaN, inf, or an f16 overflow) is refused; --out is never
replaced without --overwrite; the export is written to a temporary sibling of --out, fsynced and renamed,
so --out only ever holds a complete export. Exit codes: 0 written; 2 refused or bad input (one line on
stderr, nothing written).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cli import run_script

DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: alias (smollm2-360m, ...), hub id, hub-layout folder or .gguf file "
                                   "(default: the base recorded in the adapter's base.json)")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT format) to merge; none: convert the base as it is")
    p.add_argument("--quant", choices=("none", "nf4"), default=None,
                   help="the base the adapter is merged into: none = the dense weights; nf4 = the dequantized NF4 "
                        "base of QLoRA training (as evaluate.py --quant nf4). Default: what the adapter's base.json "
                        "records (none without one)")
    p.add_argument("--format", required=True, choices=("hf", "gguf"), help="hf: hub-layout folder; gguf: llama.cpp file")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="hf only: weights dtype (default f32: scores exactly as "
                                                          "base + adapter; bf16 and f16 are half the size)")
    p.add_argument("--gguf-quant", choices=("f16", "q8_0", "f32"), help="gguf only: type of the 2-D weights "
                                                                          "(default f16)")
    p.add_argument("--out", required=True, help="the folder (hf) or .gguf file (gguf) to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (a model export only)")
    args = p.parse_args(argv)
    if args.format == "hf" and args.gguf_quant:
        p.error("--gguf-quant is for --format gguf; a hub-layout export takes --dtype")
    if args.format == "gguf" and args.dtype:
        p.error("--dtype is for --format hf; a GGUF export takes --gguf-quant")
    if args.format == "gguf" and not args.out.endswith(".gguf"):
        p.error(f"--out {args.out}: a GGUF export's name must end in .gguf (that is how it is recognised when loaded)")
    if args.quant == "nf4" and not args.adapter:
        p.error("--quant nf4 is for merging a QLoRA adapter into its NF4 base: give --adapter too")
    if args.model is None and args.adapter is None:
        p.error("give --model (or --adapter with a base.json, which names its base)")
    args.dtype = args.dtype or "f32"
    args.gguf_quant = args.gguf_quant or "f16"
    return args


def export_name(model_arg: str, config_name: str) -> str:
    """general.name of a GGUF export: the source's hub id or own name, never a local path."""
    from model.load import LOCAL_KINDS, source_kind

    return config_name if config_name and source_kind(config_name) not in LOCAL_KINDS else Path(model_arg).stem


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from lora import LoRALinear, NonFiniteError, check_export_path, choose_base, export_gguf, export_merged
    from lora.base import recorded_dtype

    folder = args.format == "hf"
    try:   # refuse before any work: an existing --out, a bad adapter folder
        check_export_path(args.out, folder=folder, overwrite=args.overwrite)
    except FileExistsError as e:
        raise FileExistsError(f"--out {e}" + ("" if args.overwrite else ": pass --overwrite to replace it")) from None
    # --model and --quant: the adapter's base.json (the base it was trained on) unless given. The base is loaded in
    # the dtype it was trained in (an NF4 base quantized from the dtype base.json records: the same codes and
    # scales, so the same dequantized weights, as in training), the merge computed in float32 on the CPU.
    base = choose_base(args.model, args.quant, "auto", "cpu", args.adapter)
    base.dtype = recorded_dtype(base.record) if base.record else torch.float32
    base.dtype_why = " (as trained; the merge is float32)" if base.record else " (the merge is float32)"
    started = time.time()
    model, tokenizer = base.load()   # refuses an adapter tensor holding NaN or inf, naming it
    head_adapted = isinstance(getattr(model, "lm_head", None), LoRALinear)
    try:
        if folder:
            export_merged(model, tokenizer, args.out, dtype=getattr(torch, DTYPES[args.dtype]),
                          overwrite=args.overwrite)
            what = f"hub-layout folder ({args.dtype})"
        else:
            export_gguf(model, tokenizer, args.out, quant=args.gguf_quant, overwrite=args.overwrite,
                        name=export_name(base.source, model.config.name))
            what = f"GGUF file ({args.gguf_quant})"
    except NonFiniteError as e:
        raise NonFiniteError(f"refusing to export: {e}; nothing was written to {args.out}") from None
    tied = model.config.tie_word_embeddings and not head_adapted
    print(f"wrote {args.out}: {what}, {'tied' if tied else 'untied'} head, "
          f"{'adapter ' + args.adapter + ' merged' if args.adapter else 'no adapter'} ({time.time() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    run_script("export.py", main)
