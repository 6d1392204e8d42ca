"""Answer the rows of a file with a model or an adapter: every input row as given, plus its `prediction`.

    # a spreadsheet of rows to answer (instruction, input, task; no output needed), answered by an adapter
    python predict.py --adapter runs/x/adapter --dataset new_rows.csv --out answers.csv
    # JSON Lines in and out, the base model zero-shot, short answers
    python predict.py --model smollm2-360m --dataset rows.jsonl --max-new-tokens 8 --out answers.jsonl
    # a yes/no task answered by the threshold evaluate.py chose on its val rows (its results.md names it)
    python predict.py --adapter runs/x/adapter --dataset pairs.csv --task-spec task_spec.json --decode threshold \\
        --threshold 0.31 --out answers.csv

Rows: the fields train.py and evaluate.py read (.json, .jsonl, .csv, .parquet; ECInstruct rows or rows of your own
task: instruction, input, task, and optionally output, split, setting); an `output` is not needed and is kept
as it is. --tasks and --split choose rows (default: all of them). --out is .jsonl (each input record with
"prediction" added) or .csv (the input's columns, then "prediction"; a value that is not text written as JSON).

The generator, the generation flags, batching and label decoding are evaluate.py's. While it generates, finished
rows are saved to OUT.partial.jsonl; run the same command again after an interruption and it generates only the
rest. OUT is written whole at the end (written aside, then renamed over), so a failed or killed run leaves no half
file; an OUT that is already there is replaced only with --overwrite, and never when it is the --dataset file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from cli import missing_package, run_script

try:
    from data.ecinstruct import DATA_SUFFIXES, read_raw_records, read_rows, select_rows
    from evaluate import (add_generation_args, add_model_args, check_generation_args, choose_generation_base,
                          generate_records, label_decoding_plan, read_task_spec)
    from outdir import FolderLock, write_atomic
except ModuleNotFoundError as e:   # the system python instead of .venv/bin/python
    missing_package("predict.py", e)

OUT_SUFFIXES = (".jsonl", ".csv")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python predict.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--dataset", required=True, help="the rows to answer: a .json/.jsonl/.csv/.parquet file")
    p.add_argument("--tasks", default="all", help="'all' (default) or comma-separated task names")
    p.add_argument("--split", default="all", help="train, val, test or all (default: all, rows without a split too)")
    p.add_argument("--out", required=True, help="the answers: a .jsonl or .csv file")
    p.add_argument("--overwrite", action="store_true", help="replace an --out file that is already there")
    add_generation_args(p, threshold_help="give it with --threshold, such as the one evaluate.py chose on val rows")
    args = p.parse_args(argv)
    if args.model is None and args.adapter is None:
        p.error("give --model, or --adapter (its base.json names the base)")
    check_generation_args(args, p)
    if args.decode == "threshold" and args.threshold is None:
        p.error("--decode threshold needs --threshold here (evaluate.py chooses one on val rows and names it in its "
                "results.md and metrics.json)")
    out = Path(args.out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        p.error(f"--out {args.out}: name a .jsonl or .csv file")
    if not Path(args.dataset).is_file() or Path(args.dataset).suffix.lower() not in DATA_SUFFIXES:
        p.error(f"--dataset {args.dataset}: not a .json, .jsonl, .csv or .parquet file")
    if out.exists() and out.resolve() == Path(args.dataset).resolve():
        p.error(f"--out {args.out} is the --dataset file: name another file, the rows must not be overwritten")
    if out.is_dir():
        p.error(f"--out {args.out} is a folder: name a .jsonl or .csv file")
    if out.exists() and not args.overwrite:
        p.error(f"--out {args.out} is already there: pass --overwrite to replace it, or name another file")
    return args


def csv_text(records: list[dict]) -> str:
    """CSV of `records`: their keys in order of first appearance as the header; non-text values as JSON."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False, default=str)
                         for k, v in r.items()})
    return buffer.getvalue()


def predict(args) -> int:
    rows = select_rows(read_rows(args.dataset, need_output=False), split=args.split, tasks=args.tasks, settings=None,
                       source=args.dataset)
    raw = dict(read_raw_records(args.dataset))   # {row number: the record as the file gives it}
    specs = read_task_spec(args.task_spec) if args.task_spec else {}
    args.label_tasks, _ = label_decoding_plan(args, specs, None, {r["task"] for r in rows})
    choose_generation_base(args)   # a bad adapter folder fails now, not after the base model has loaded
    # Records are keyed by the file's row number (unique, whatever the rows' splits); the gold is not needed.
    keyed = [r | {"index": r["row"], "output": r["output"] or ""} for r in rows]
    out = Path(args.out)
    records = generate_records(args, keyed, specs, partial=out.with_name(out.name + ".partial.jsonl"))
    answers = {r["index"]: r["output"] for r in records}
    if any("prediction" in raw[r["row"]] for r in rows):
        print("note: the input rows have a 'prediction' field: it is replaced by this run's", file=sys.stderr)
    results = [raw[r["row"]] | {"prediction": answers[r["row"]]} for r in rows]
    if out.suffix.lower() == ".csv":
        write_atomic(out, csv_text(results))
    else:
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in results))
    out.with_name(out.name + ".partial.jsonl").unlink(missing_ok=True)
    print(f"wrote {len(results)} predictions to {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    with FolderLock(out.parent if str(out.parent) else Path("."), "predict.py", f".{out.name}.lock"):
        return predict(args)


if __name__ == "__main__":
    run_script("predict.py", main)
