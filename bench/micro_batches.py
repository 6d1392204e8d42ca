"""Micro-batches per optimizer step that the epoch planner makes on real rows, for this checkout and any other.

    python bench/micro_batches.py --rows PATH/TO/ecinstruct/test_rows_dev.jsonl --rows PATH/TO/ave_train_100.jsonl
    python bench/micro_batches.py --rows ... --code OLD      # OLD: another checkout, e.g. a `git worktree`

Tokenizes the rows with the packaged SmolLM2 tokenizer (eCeLLM's prompts, this checkout's data pipeline), then
asks each checkout's `data.batching.plan_epoch` for epoch 0 (seed 0) at each (rows per step, --micro-batch-tokens)
pair and prints micro-batches per step and how full they are: fill = real tokens / (micro-batches x budget).
Fewer micro-batches is less fixed work per step (kernel launches, NF4 dequantisation of every layer).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import load_rows, tokenize_rows  # noqa: E402
from model import load_tokenizer  # noqa: E402
from model.gguf import packaged_smollm2  # noqa: E402

SIZES = ((128, 16384), (128, 4096), (16, 4096), (8, 2048))   # (rows per step, --micro-batch-tokens)


def planner(code: Path):
    """plan_epoch of the checkout `code` (its data/batching.py, loaded on its own)."""
    spec = importlib.util.spec_from_file_location(f"batching_{abs(hash(str(code)))}", code / "data" / "batching.py")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "data"   # its `from .encode import ...`: this checkout's data package, already imported
    spec.loader.exec_module(module)
    return module.plan_epoch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", action="append", required=True, help="a .jsonl of ECInstruct rows (repeatable)")
    p.add_argument("--code", action="append", default=[], type=Path, help="another checkout to plan with too")
    args = p.parse_args(argv)
    rows = [r for path in args.rows for r in load_rows(path, split=None, settings=None)]
    lengths = tokenize_rows(rows, load_tokenizer(str(packaged_smollm2())), verbose=False).lengths
    print(f"{len(lengths)} rows, {sum(lengths)} tokens (SmolLM2 tokenizer)")
    for code in [*args.code, ROOT]:
        plan_epoch = planner(code.resolve())
        print(f"\n{code}:")
        for per_step, budget in SIZES:
            plan = plan_epoch(lengths, epoch=0, seed=0, seqs_per_step=per_step, max_tokens=budget)
            micro = sum(len(step) for step in plan)
            print(f"  {per_step:>4} rows a step, {budget:>5} tokens: {micro / len(plan):5.2f} micro-batches a step, "
                  f"fill {sum(lengths) / (micro * budget):4.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
