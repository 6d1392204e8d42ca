"""The command-line words train.py, evaluate.py and export.py share, so that one spelling works in all three.

- dtypes: bf16 | fp32 | fp16 (and auto); bfloat16, float32, float16, f32, f16 are the same choices.
- devices: auto | cpu | cuda | cuda:N; auto is cuda when one is available.
- an adapter's base: the adapter folder's base.json (lora.io) gives the defaults of --model, --quant and
  --dtype; a flag that says otherwise wins, with one warning line naming the difference.
- a run-time package missing (the system python instead of .venv/bin/python): one line, not a traceback;
- a script's end (run_script): a full disk exit 1, bad input or a refusal exit 2, each one line.

Imports nothing beyond the standard library at module level (it must load where torch is missing).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "f32": "fp32",
                 "fp16": "fp16", "float16": "fp16", "f16": "fp16", "auto": "auto"}
TORCH_DTYPE = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}   # canonical -> torch name
SHORT_DTYPE = {v: k for k, v in TORCH_DTYPE.items()}                       # torch name -> canonical


def dtype_type(*allowed: str):
    """An argparse `type`: any spelling in DTYPE_ALIASES -> its canonical name, which must be in `allowed`."""
    def parse(text: str) -> str:
        name = DTYPE_ALIASES.get(text.strip().lower())
        if name is None or name not in allowed:
            spellings = sorted(k for k, v in DTYPE_ALIASES.items() if v in allowed)
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(allowed)} "
                                             f"(spellings accepted: {', '.join(spellings)})")
        return name
    parse.__name__ = "dtype"
    return parse


def resolve_device(spec: str):
    """torch.device of auto | cpu | cuda | cuda:N (auto: cuda if available); one line for a bad one."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise ValueError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA device is available here (use --device cpu)")
    return torch.device(spec)


def resolve_dtype(name: str, device, *, warn=None):
    """torch dtype of a canonical name. auto: bf16 on a GPU that has it or on a CPU with native bf16, else
    fp32; bf16 on a CPU without native bf16 warns in one line (model.cpu.compute_dtype; `warn` as there)."""
    import torch

    from model.cpu import compute_dtype

    if name == "fp16":
        return torch.float16
    return compute_dtype(name, device, warn=warn)


def _native_bf16(args) -> bool:
    """Whether the device args.device names computes bf16 natively (a CUDA device does; a CPU per its flags)."""
    from model.cpu import cpu_native_bf16

    return resolve_device(getattr(args, "device", "auto")).type == "cuda" or cpu_native_bf16()


def _loadable(source: str | None) -> bool:
    """An alias, a hub id or an existing file or folder (what model.load_model accepts)."""
    from model import PRESETS

    if not source:
        return False
    path = Path(source).expanduser()
    return source in PRESETS or path.exists() or (source.count("/") == 1 and not source.startswith((".", "/", "~"))
                                                  and not source.endswith(".gguf"))


def describe_base(record: dict) -> str:
    """'an NF4 base (quantized from float32, float32 compute)' or 'a dense bfloat16 base'."""
    q = record.get("quantization")
    if q:
        return f"an NF4 base (quantized from {q['quantized_from']}, {record['compute_dtype']} compute)"
    return f"a dense {record['compute_dtype']} base"


def adapter_defaults(args, *, dtype: bool) -> dict | None:
    """Fill args.model, args.quant (and args.dtype when `dtype`) left unset from the adapter's base.json,
    and warn on stderr, one line each, where a flag says otherwise. Returns the record (None without one:
    then --quant defaults to none, as for an adapter from another tool).

    args.quant None means "not given"; args.dtype "auto" means not given.
    """
    from lora import read_base_record

    record = read_base_record(args.adapter) if args.adapter else None
    if record is None:
        if args.model is None:
            raise ValueError(f"--adapter {args.adapter} has no base.json (the record of the base it was trained on): "
                             "give --model")
        args.quant = args.quant or "none"
        return None
    where = f"{Path(args.adapter) / 'base.json'}"
    if args.model is None:
        choice = next((s for s in (record.get("base_checkpoint"), record.get("base_model")) if _loadable(s)), None)
        if choice is None:
            raise ValueError(f"{where} names base {record.get('base_checkpoint') or record.get('base_model')!r}, "
                             "which is not here: give --model")
        args.model = choice
    recorded_quant = "nf4" if record.get("quantization") else "none"
    if args.quant is None:
        args.quant = recorded_quant
    elif args.quant != recorded_quant:
        print(f"warning: {args.adapter} was trained on {describe_base(record)} ({where}); --quant {args.quant} "
              f"puts it on {'an NF4' if args.quant == 'nf4' else 'the dense'} base instead", file=sys.stderr)
    if dtype:
        q = record.get("quantization")
        recorded = SHORT_DTYPE.get(q["quantized_from"] if q else record["compute_dtype"])
        if args.dtype == "auto" and recorded == "bf16" and not _native_bf16(args):
            print(f"note: {args.adapter} was trained in bfloat16 ({where}); this CPU has no native bf16, so the base "
                  "is loaded in float32 (--dtype bf16 matches the training exactly, several times slower)",
                  file=sys.stderr)
        elif args.dtype == "auto":
            args.dtype = recorded
        elif args.dtype != recorded:
            print(f"warning: {args.adapter} was trained on {describe_base(record)} ({where}); --dtype {args.dtype} "
                  "loads the base in another dtype, so its outputs can differ from the trained model's",
                  file=sys.stderr)
    return record


def check_fingerprint(model, record: dict | None, args) -> None:
    """Warn (one line) when the loaded base is not the checkpoint the adapter's base.json fingerprinted."""
    from lora import base_fingerprint

    if record is None or not record.get("base_fingerprint"):
        return
    now = base_fingerprint(model)
    if now != record["base_fingerprint"]:
        print(f"warning: --model {args.model} is not the base {args.adapter} was trained on "
              f"({record.get('base_checkpoint') or record.get('base_model')}; base fingerprint "
              f"{record['base_fingerprint']} there, {now} here)", file=sys.stderr)


def missing_package(prog: str, error: ModuleNotFoundError) -> None:
    """Stop with one line when a run-time package is missing: usually the system python, not .venv's."""
    print(f"{prog}: error: the package {error.name!r} is not installed for {sys.executable}; run "
          f".venv/bin/python {prog} (bash setup.sh creates .venv), or pip install -r requirements.txt",
          file=sys.stderr)
    raise SystemExit(2)


def run_script(prog: str, main) -> None:
    """A script's __main__ block: exit with main()'s code; one line on stderr instead of a traceback for a full disk
    (outdir.DiskFull, a failure during the run: exit 1, what was written before is kept) and for bad input or a
    refusal (ValueError, OSError, RuntimeError: exit 2). Text that cannot be encoded is printed escaped."""
    from outdir import DiskFull

    sys.stdout.reconfigure(errors="backslashreplace")
    sys.stderr.reconfigure(errors="backslashreplace")
    try:
        code = main()
    except DiskFull as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 1
    except (ValueError, OSError, RuntimeError) as e:   # DataError, NonFiniteError: ValueError; FolderBusy: Runtime
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
