"""Print what a dataset selection holds: rows per task and setting, token lengths, truncation, one example.

    python -m data.inspect --dataset data/sample/ecinstruct_sample.jsonl --tasks all \\
        --setting IND_Diverse_Instruction --split train --tokenizer smollm2-360m

--tokenizer takes a .gguf file, a folder with tokenizer.json, a model alias (smollm2-360m, ...) or a
hub id (only the tokenizer files are downloaded). Without it, lengths are given in characters.
In the example, the text between [[ and ]] is what the loss is computed on (answer + EOS); everything
before it is prompt, masked from the loss (unless --train-on-inputs).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict

import numpy as np

from model.load import load_tokenizer

from . import DEFAULT_SAMPLE, DataError, load_rows
from .ecinstruct import DEFAULT_SETTING, SETTINGS
from .encode import IGNORE_INDEX, tokenize_rows
from .prompts import TEMPLATES, render_prompt

PERCENTILES = (0, 50, 90, 99, 100)


def _percentiles(values) -> str:
    p = np.percentile(np.asarray(values), PERCENTILES) if len(values) else [0] * len(PERCENTILES)
    return " ".join(f"{int(round(v)):>6}" for v in p)


def _table_header(unit: str) -> str:
    cols = " ".join(f"{'p' + str(q) if q not in (0, 100) else ('min' if q == 0 else 'max'):>6}" for q in PERCENTILES)
    return f"  {'task':<36}{'rows':>6} {cols}   ({unit})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(DEFAULT_SAMPLE),
                        help="hub dataset id or local .json/.jsonl/.parquet file (default: the in-repo sample)")
    parser.add_argument("--tasks", default="all", help="'all' or comma-separated task names / abbreviations")
    parser.add_argument("--setting", default=DEFAULT_SETTING, help=f"'all' or comma-separated: {', '.join(SETTINGS)}")
    parser.add_argument("--split", default="train", help="train, val, test or all")
    parser.add_argument("--tokenizer", default=None, help="a .gguf file, tokenizer folder, model alias or hub id")
    parser.add_argument("--cutoff", type=int, default=2048, help="maximum tokens per example (the paper's 2048)")
    parser.add_argument("--template", default="alpaca", choices=TEMPLATES, help="prompt template")
    parser.add_argument("--train-on-inputs", action="store_true", help="supervise the prompt tokens too")
    parser.add_argument("--example", type=int, default=0, help="which selected row to render (0-based)")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid rows instead of refusing the file")
    args = parser.parse_args(argv)
    try:
        return report(args)
    except (DataError, OSError, ValueError) as e:   # one line naming the file, row or field (HubError is an OSError)
        print(f"error: {e}", file=sys.stderr)
        return 2


def describe_tokenized(rows: list[dict], data, tokenizer, *, train_on_inputs: bool = False, example: int = 0) -> str:
    """Token lengths per task (with truncated and dropped rows), token totals, and one example rendered from
    its ids with the supervised part in [[...]]: what the loss sees. (train.py --dry-run prints it too.)"""
    stats, by_task = data.stats, defaultdict(list)
    for i, length in zip(data.source_index, data.lengths):
        by_task[rows[i]["task"]].append(length)
    lines = ["\ntoken lengths (BOS + prompt + answer + EOS)", _table_header("tokens") + "  truncated dropped"]
    for task in sorted(stats["per_task"]):
        t = stats["per_task"][task]
        lines.append(f"  {task:<36}{len(by_task[task]):>6} {_percentiles(by_task[task])}   {t['truncated']:>9} "
                     f"{t['dropped']:>7}")
    lines.append(f"  {'all':<36}{stats['kept']:>6} {_percentiles(data.lengths)}   {stats['truncated']:>9} "
                 f"{stats['dropped']:>7}")
    lines.append(f"tokens {stats['tokens']}, supervised {stats['supervised_tokens']} "
                 f"({stats['supervised_tokens'] / max(stats['tokens'], 1):.1%})")
    if not len(data):
        return "\n".join(lines + ["\nevery row was dropped: no example to show"])
    k = min(example, len(data) - 1)
    ids, labels = data.input_ids[k], data.labels[k]
    row = rows[data.source_index[k]]
    first = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
    if train_on_inputs:
        first = len(ids) - len(tokenizer.encode(row["output"])) - 1
    lines += [f"\nexample {k}: {row['task']} {row['setting']} {row['split']} index {row.get('index', '?')}"
              f"{' (input truncated)' if data.truncated[k] else ''}: {first} prompt tokens"
              f"{'' if train_on_inputs else ' (masked)'}, {len(ids) - first} answer tokens (supervised); "
              "[[...]] marks the answer + EOS",
              tokenizer.decode(ids[:first], skip_special_tokens=False) + "[["
              + tokenizer.decode(ids[first:], skip_special_tokens=False) + "]]"]
    return "\n".join(lines)


def report(args) -> int:
    """Print the report of main()'s arguments; bad input raises DataError / ValueError / OSError."""
    rows = load_rows(args.dataset, split=args.split, tasks=args.tasks, settings=args.setting,
                     skip_invalid=args.skip_invalid)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None

    print(f"dataset {args.dataset}: split={args.split} tasks={args.tasks} setting={args.setting}")
    print(f"\nrows per task and setting ({len(rows)} in all)")
    counts = Counter((r["task"], r["setting"]) for r in rows)
    for (task, setting), n in sorted(counts.items()):
        print(f"  {task:<36}{setting:<34}{n:>6}")

    by_task = defaultdict(list)
    if tokenizer is None:
        for r in rows:
            by_task[r["task"]].append(len(render_prompt(r, args.template)) + len(r["output"]))
        print("\nprompt + answer length in characters (pass --tokenizer for token lengths)")
        print(_table_header("characters"))
        for task, lengths in sorted(by_task.items()):
            print(f"  {task:<36}{len(lengths):>6} {_percentiles(lengths)}")
        all_lengths = [n for v in by_task.values() for n in v]
        print(f"  {'all':<36}{len(all_lengths):>6} {_percentiles(all_lengths)}")
        example = rows[min(args.example, len(rows) - 1)]
        print(f"\nexample {args.example}: {example['task']} {example['setting']} {example['split']} "
              f"index {example['index']}; [[...]] is supervised (answer + EOS)")
        print(render_prompt(example, args.template) + "[[" + example["output"] + "<EOS>]]")
        return 0

    data = tokenize_rows(rows, tokenizer, cutoff=args.cutoff, template=args.template,
                         train_on_inputs=args.train_on_inputs, verbose=False)
    print(f"\ntokenizer {args.tokenizer}: bos {tokenizer.bos_id} (added: {tokenizer.add_bos}), eos {tokenizer.eos_id}, "
          f"pad {tokenizer.pad_id}; cutoff {args.cutoff}; template {args.template}")
    print(describe_tokenized(rows, data, tokenizer, train_on_inputs=args.train_on_inputs, example=args.example))
    return 0


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")   # text that cannot be encoded is shown escaped
    sys.exit(main())
