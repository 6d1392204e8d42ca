"""The command-line words train.py, evaluate.py and export.py share, so that one spelling works in all three.

- dtypes: bf16 | fp32 | fp16 (and auto); bfloat16, float32, float16, f32, f16 are the same choices.
- devices: auto | cpu | cuda | cuda:N; auto is cuda when one is available.
- an adapter's base: lora/base.py (load_base) reads the adapter folder's base.json, which gives the defaults of
  --model, --quant and --dtype; a flag that says otherwise wins, with one warning line naming the difference.
- a run's folder name: folder_name(text).
- a run-time package missing (the system python instead of .venv/bin/python): one line, not a traceback;
- a script's end (run_script): a full disk exit 1, bad input or a refusal exit 2, each one line.

Imports nothing beyond the standard library at module level (it must load where torch is missing).
"""

from __future__ import annotations

import argparse
import re
import sys

DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32", "f32": "fp32",
                 "fp16": "fp16", "float16": "fp16", "f16": "fp16", "auto": "auto"}


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


def folder_name(text: str) -> str:
    """`text` as one folder name (runs/<name>): letters, digits, '.', '_' and '-' kept, anything else '-', lower
    case, no leading or trailing '.' or '-' (never '..', never a flag); 'run' when nothing is left."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text).strip(".-").lower() or "run"


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
