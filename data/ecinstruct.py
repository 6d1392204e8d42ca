"""Rows: ECInstruct's from the hub or a local file, and rows of the user's own tasks; check, select, split.

The hub dataset `NingLab/ECInstruct` ships every row in one file (`dataset.json`); the real split is
a column. A row has eight fields, in this order (the hub's):

    output            str          the gold answer
    input             str          usually a json.dumps string; raw review text for SA
    options           str | None   json.dumps(list) for PRP/SA/MPC, Python str(list) for SR, else null
    task              str          one of the 10 task names (three old spellings accepted, see tasks.py)
    setting           str          one of SETTINGS
    split             str          "train", "val" or "test"
    few_shot_example  str | None   null except in the *_1-shot settings
    instruction       str          the task instruction

`load_rows` returns the selected rows as dicts with exactly these fields, the task in hub spelling,
plus "index": the row's position within its (task, setting, split) block in file order. For the hub
test blocks this is the position in hub test order, the key the gold files use.

Custom tasks: a row whose task is not one of the ten (tasks.task_name) is a row of the user's own task
and needs only

    instruction       str          the task instruction (not blank)
    task              str          the task's name (no commas, '=' or line breaks)
    input             str          optional (default "")
    output            str          the gold answer; optional in rows to predict (predict.py), None then
    split             str          optional: train, val or test; None when absent (train.py holds out a
                                   seeded validation subset of such rows itself, see hold_out)
    setting           str          optional: any name; "default" when absent
    options, few_shot_example      optional, as for ECInstruct rows

Files are read whole (the full hub file is ~530 MB of JSON; a few GB of RAM). JSON, JSON Lines, CSV
(a header row naming the fields; an empty cell is an absent field) and Parquet are read; a `.json` file
may hold a JSON array of row objects, an object with one list of rows, or JSON Lines (the hub file has
been published in more than one shape). Each row also carries "row": its 1-based number in the file
(the line of a JSON Lines file, the data row of a CSV file), which error messages name.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from outdir import parse_jsonl
from tasks import ABBREV, TASKS, abbrev, canonical_task, is_ecinstruct, task_name, task_order

FIELDS = ("output", "input", "options", "task", "setting", "split", "few_shot_example", "instruction")
SETTINGS = (
    "IND_Diverse_Instruction", "IND_Single_Instruction", "IND_Unseen_Instruction",
    "OOD_Diverse_Instruction", "OOD_Single_Instruction", "OOD_Unseen_Instruction",
    "IND_Diverse_Instruction_1-shot", "OOD_Diverse_Instruction_1-shot",
)
SPLITS = ("train", "val", "test")
CUSTOM_SETTING = "default"                     # the setting of a custom-task row that names none
CUSTOM_REQUIRED = ("instruction", "task")      # the fields a custom-task row cannot do without
VAL_FRACTION = 0.1                             # share of a task's unsplit rows train.py holds out for validation
DEFAULT_SETTING = "IND_Diverse_Instruction"   # what eCeLLM trains and validates on
HUB_FILE = "dataset.json"                      # the single file of NingLab/ECInstruct
SAMPLE = "data/sample/ecinstruct_sample.jsonl"  # the in-repo sample (relative to the repository root)
_NULLABLE = {"options", "few_shot_example"}    # str or null; every other field must be a str
_NOT_BLANK = ("instruction", "output")         # a row without them trains (or scores) nothing
_MAX_LISTED = 5                                # invalid rows quoted in an error message
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the file, row and field."""


# ---- names: tasks, settings, splits ------------------------------------------------------------

def _task_or_none(name: str) -> str | None:
    try:
        return canonical_task(name)
    except (KeyError, ValueError):
        return None


def _valid_tasks_text() -> str:
    return ", ".join(f"{ABBREV[t]} ({t})" for t in TASKS)


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """'all', or comma-separated task names -> their names in one canonical order: ECInstruct tasks (hub
    names, old spellings or abbreviations) in TASKS order, then custom task names sorted. 'all' gives the
    ten ECInstruct tasks; `is_all` tells select_rows to take a file's custom tasks too.

    >>> parse_tasks("AVE,Query_Product_Ranking")
    ['Attribute_Value_Extraction', 'Query_Product_Rank']
    >>> parse_tasks("title_extraction,PM")
    ['Product_Matching', 'title_extraction']
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"no task given; use 'all', a task of your own or any of: {_valid_tasks_text()}")
    if is_all(names):
        return list(TASKS)
    try:
        return sorted({task_name(n) for n in names}, key=task_order)
    except ValueError as e:
        raise DataError(str(e)) from None


def is_all(spec: str | Sequence[str]) -> bool:
    """True when a --tasks value asks for every task ('all')."""
    names = spec.split(",") if isinstance(spec, str) else spec
    return any(str(n).strip().lower() == "all" for n in names)


def parse_settings(spec: str | Sequence[str] | None) -> list[str] | None:
    """'all' or None -> None (every setting); else comma-separated names -> ECInstruct's settings (any letter
    case, in SETTINGS order), then the names of custom-task settings (sorted). A name that starts like an
    ECInstruct setting (IND, OOD, IND_..., OOD_...) but is none of them is refused: a typo, not a setting of
    one's own."""
    if spec is None:
        return None
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names or any(n.lower() == "all" for n in names):
        return None
    by_lower = {s.lower(): s for s in SETTINGS}
    for n in names:
        if n.lower() not in by_lower and (n.lower() in ("ind", "ood") or n.lower().startswith(("ind_", "ood_"))):
            raise DataError(f"unknown setting {n!r}; valid: all, {', '.join(SETTINGS)} (or a setting name of "
                            "your own task's rows)")
    chosen = {by_lower.get(n.lower(), n) for n in names}
    return [s for s in SETTINGS if s in chosen] + sorted(chosen - set(SETTINGS))


def parse_split(split: str | None) -> str | None:
    """'train' | 'val' | 'test' ('validation' accepted for 'val'); None or 'all' -> None (every split)."""
    if split is None or split.lower() == "all":
        return None
    s = {"validation": "val", "valid": "val", "dev": "val"}.get(split.lower(), split.lower())
    if s not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)} (or all)")
    return s


# ---- validation ---------------------------------------------------------------------------------

def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def check_row(row, *, need_output: bool = True) -> str | None:
    """None when `row` is a valid row (ECInstruct's, or of a custom task), else the first problem as
    'field ...' text. need_output=False: a row may lack its output (rows to predict, predict.py)."""
    if not isinstance(row, dict):
        return f"row must be a JSON object, got {_type_name(row)}"
    task = row.get("task")
    if isinstance(task, str) and task.strip() and not is_ecinstruct(task):
        return check_custom_row(row, need_output=need_output)
    for field in FIELDS:
        if field == "output" and not need_output and row.get("output") is None:   # a row to predict
            continue
        if field not in row:
            return f"field {field!r} is missing"
        value = row[field]
        if field in _NULLABLE:
            if value is not None and not isinstance(value, str):
                return f"field {field!r} must be a string or null, got {_type_name(value)}"
        elif not isinstance(value, str):
            return f"field {field!r} must be a string, got {_type_name(value)}"
        if isinstance(value, str):
            bad = lone_surrogate(value)
            if bad is not None:
                return (f"field {field!r} holds a lone surrogate ({value[bad]!a} at character {bad}): not valid "
                        "Unicode text (a broken escape in the file?)")
    for field in _NOT_BLANK:
        if row.get(field) is not None and not row[field].strip():
            return f"field {field!r} is empty"
    if _task_or_none(row["task"]) is None:
        return f"field 'task' has unknown task {row['task']!r}; valid: {', '.join(TASKS)}"
    if row["setting"] not in SETTINGS:
        return f"field 'setting' has unknown setting {row['setting']!r}; valid: {', '.join(SETTINGS)}"
    if row["split"] not in SPLITS:
        return f"field 'split' has unknown split {row['split']!r}; valid: {', '.join(SPLITS)}"
    return None


def check_custom_row(row: dict, *, need_output: bool = True) -> str | None:
    """check_row for a row of a custom task (see the module docstring): None or the first problem."""
    required = CUSTOM_REQUIRED + (("output",) if need_output else ())
    for field in required:
        if row.get(field) is None:
            return f"field {field!r} is missing"
    for field in FIELDS:
        value = row.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"field {field!r} must be a string, got {_type_name(value)}"
        bad = lone_surrogate(value)
        if bad is not None:
            return (f"field {field!r} holds a lone surrogate ({value[bad]!a} at character {bad}): not valid "
                    "Unicode text (a broken escape in the file?)")
    for field in ("instruction", "output"):
        if row.get(field) is not None and not row[field].strip():
            return f"field {field!r} is empty"
    try:
        task_name(row["task"])
    except ValueError as e:
        return f"field 'task': {e}"
    if row.get("split") is not None and row["split"] not in SPLITS:
        return f"field 'split' has unknown split {row['split']!r}; valid: {', '.join(SPLITS)} (or leave it out)"
    if row.get("setting") is not None and not row["setting"].strip():
        return "field 'setting' is empty (leave it out for no setting)"
    return None


def lone_surrogate(text: str) -> int | None:
    """The position of the first lone UTF-16 surrogate in `text` (JSON's "\\ud800" decodes to one; no
    UTF-8 writer or tokenizer accepts it), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


# ---- reading files ------------------------------------------------------------------------------
# Each reader yields (row number, parsed object or an Exception). Row numbers are 1-based: the line
# number in a JSON Lines file, the position in a JSON array or a Parquet table.

def _read_jsonl_text(text: str, name: str):
    parsed_any = False
    failures = []
    for number, value in parse_jsonl(text):   # a line that is not JSON comes as the ValueError saying why
        if isinstance(value, ValueError):
            failures.append(number)
        else:
            parsed_any = True
        yield number, value
        if not parsed_any and len(failures) >= 3:
            raise DataError(f"{name}: not a JSON or JSON Lines file (lines {', '.join(map(str, failures))} "
                            "do not parse as JSON)")
    if not parsed_any:
        raise DataError(f"{name}: not a JSON or JSON Lines file (no line parses as JSON)" if failures
                        else f"{name}: the file is empty")


def _read_json(path: Path, name: str):
    text = _read_text(path, name)
    if path.suffix.lower() == ".jsonl":
        yield from _read_jsonl_text(text, name)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":   # several JSON values: JSON Lines in a .json file
            yield from _read_jsonl_text(text, name)
            return
        raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:          # one deeply nested value: read line by line to name the row
        yield from _read_jsonl_text(text, name)
        return
    if isinstance(data, dict):     # {"data": [...]} or {"train": [...]}: one list of rows inside an object
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{name}: a JSON object must hold exactly one list of rows, found {len(lists)}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON array of row objects, got {_type_name(data)}")
    yield from enumerate(data, start=1)


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not a UTF-8 text file, so not JSON (byte {e.start}: {e.reason})") from None


def _read_parquet(path: Path, name: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: cannot read it as Parquet ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_csv(path: Path, name: str, keep_empty: bool = False):
    """Rows of a CSV file with a header row; an empty cell is an absent field (so a row to predict may leave
    `output` empty), or with keep_empty an empty string. Row numbers count data rows (the header is not one)."""
    text = _read_text(path, name).removeprefix("\ufeff")   # a spreadsheet's byte-order mark
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{name}: the file is empty (a CSV file needs a header row naming its fields)")
    try:
        for number, record in enumerate(reader, start=1):
            if None in record:
                yield number, DataError(f"more cells than the header names ({len(reader.fieldnames)})")
                continue
            yield number, dict(record) if keep_empty else {k: v for k, v in record.items() if v not in (None, "")}
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: not valid CSV ({e})") from None


def _read_file(path: Path):
    name = str(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path, name)
    if suffix == ".parquet":
        return _read_parquet(path, name)
    if suffix == ".csv":
        return _read_csv(path, name)
    raise DataError(f"{name}: unsupported file type {suffix or '(none)'!r}; use .json, .jsonl, .csv or .parquet")


# ---- the hub ------------------------------------------------------------------------------------

def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def download_hub(repo_id: str, filename: str = HUB_FILE) -> Path:
    """The local path of a dataset repo's hub file, through model.hub.fetch (the cache first, HF_HUB_OFFLINE
    honoured); DataError, one sentence that names the in-repo sample, when the hub cannot provide it."""
    from model.hub import HubError, fetch

    try:
        return fetch(repo_id, filename=filename, repo_type="dataset",
                     instead=f"pass a local .json/.jsonl/.parquet file with --dataset, such as the ECInstruct "
                             f"sample in this repository ({SAMPLE})")
    except HubError as e:
        raise DataError(str(e)) from None


def resolve_source(source: str | Path) -> Path:
    """A local file as given, or the downloaded file of a hub dataset id."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise DataError(f"{text} is a folder; pass a .json, .jsonl, .csv or .parquet file")
    if path.suffix.lower() in DATA_SUFFIXES or not _is_hub_id(text):
        raise DataError(f"{text}: no such file (and not a hub dataset id such as NingLab/ECInstruct)")
    return download_hub(text)


# ---- loading ------------------------------------------------------------------------------------

def read_rows(source: str | Path, *, skip_invalid: bool = False, need_output: bool = True) -> list[dict]:
    """Every valid row of a file or hub dataset: hub fields in hub order, task in hub spelling (a custom
    task's name as written), plus "index" (position within the row's (task, setting, split) block in file
    order) and "row" (1-based row number in the file). A custom-task row's absent fields are filled in:
    input "", options and few_shot_example None, setting "default", split None (and output None when
    need_output is False, for rows to predict).

    Invalid rows raise DataError (naming file, row and field) unless skip_invalid, which drops them
    and prints how many to stderr.
    """
    path = resolve_source(source)
    name = str(source) if Path(str(source)).expanduser().is_file() else f"{source} ({path.name})"
    rows, invalid = [], []
    block_sizes = Counter()
    for number, obj in _read_file(path):
        problem = str(obj) if isinstance(obj, Exception) else check_row(obj, need_output=need_output)
        if problem is not None:
            invalid.append((f"{name} row {number}: {problem}", number))
            continue
        row = {field: obj.get(field) for field in FIELDS}
        row["task"] = task_name(row["task"])
        if row["task"] not in ABBREV:   # a custom task: absent optional fields filled in
            row["input"] = row["input"] or ""
            row["setting"] = row["setting"] or CUSTOM_SETTING
        key = (row["task"], row["setting"], row["split"])
        row["index"] = block_sizes[key]
        row["row"] = number
        block_sizes[key] += 1
        rows.append(row)
    if invalid and not skip_invalid:   # one line: the first invalid row in full, then where the others are
        others = [str(number) for _, number in invalid[1:]]
        more = (f"; {len(others)} more invalid row(s): row(s) {', '.join(others[:_MAX_LISTED])}"
                + (" ..." if len(others) > _MAX_LISTED else "")) if others else ""
        raise DataError(f"{invalid[0][0]}{more} (fix the file, or pass --skip-invalid to train.py, evaluate.py or "
                        "data.inspect, skip_invalid=True to load_rows, to leave invalid rows out)")
    if invalid:
        print(f"skipped {len(invalid)} invalid rows (first: {invalid[0][0]})", file=sys.stderr)
    return rows


def read_raw_records(source: str | Path):
    """(row number, the record as the file holds it) for each row object of a local file: the numbers
    read_rows gives as "row" (what predict.py writes back, every field kept)."""
    path = Path(source).expanduser()
    records = _read_csv(path, str(path), keep_empty=True) if path.suffix.lower() == ".csv" else _read_file(path)
    for number, obj in records:
        if isinstance(obj, dict):
            yield number, obj


def describe_counts(rows: Sequence[dict]) -> str:
    """'train: AVE/IND_Diverse_Instruction 51, ...; test: ...; no split: ...' (what a file holds, for error
    messages)."""
    counts = Counter((r["split"], r["task"], r["setting"]) for r in rows)
    if not counts:
        return "no valid rows"
    parts = []
    for split in (*SPLITS, None):
        items = [f"{abbrev(t)}/{s} {n}" for (sp, t, s), n in sorted(counts.items(), key=lambda kv: (
            task_order(kv[0][1]), kv[0][2])) if sp == split]
        if items:
            parts.append(f"{split or 'no split'}: " + ", ".join(items))
    return "; ".join(parts)


def select_rows(rows: Sequence[dict], *, split: str | None = "train", tasks="all",
                settings=(DEFAULT_SETTING,), source: str = "the data") -> list[dict]:
    """The rows of `rows` in the given split, tasks and settings (None = all), in file order.

    tasks 'all' takes every ECInstruct task and every custom task the rows hold. Settings filter the rows of
    their own kind: ECInstruct's setting names filter ECInstruct rows, other names filter custom-task rows,
    and a kind none of whose settings is named is taken whole (so the default IND_Diverse_Instruction
    leaves custom tasks' rows alone). split 'unsplit' takes the custom rows that name no split.
    """
    unsplit = split == "unsplit"
    split = None if unsplit else parse_split(split)
    wanted = row_filter(tasks, settings)
    in_split = (lambda r: r["split"] is None) if unsplit else (lambda r: split is None or r["split"] == split)
    chosen = [r for r in rows if in_split(r) and wanted(r["task"], r["setting"])]
    if not chosen:
        task_text = "all" if is_all(tasks) else ",".join(abbrev(t) for t in parse_tasks(tasks))
        setting_list = parse_settings(settings)
        setting_text = "all" if setting_list is None else ",".join(setting_list)
        raise DataError(f"no rows match split={'(none)' if unsplit else split or 'all'} tasks={task_text} "
                        f"settings={setting_text}; {source} holds: {describe_counts(rows)}")
    return chosen


def row_filter(tasks, settings):
    """(task, setting) -> whether select_rows takes it: the rule in select_rows' docstring."""
    every_task = is_all(tasks)
    wanted_tasks = set(parse_tasks(tasks))
    setting_list = parse_settings(settings)
    paper = None if setting_list is None else {s for s in setting_list if s in SETTINGS}
    custom = None if setting_list is None else {s for s in setting_list if s not in SETTINGS}

    def wanted(task: str, setting: str) -> bool:
        ecinstruct = task in ABBREV
        if not (task in wanted_tasks or (every_task and not ecinstruct)):
            return False
        names = paper if ecinstruct else custom
        return not names or setting in names
    return wanted


def hold_out(rows: Sequence[dict], *, seed: int, fraction: float = VAL_FRACTION) -> tuple[list[dict], list[dict]]:
    """(train, val) of rows that name no split: per task, a seeded random `fraction` of its rows (rounded,
    at least 1 of a task's 10 or more rows, none of fewer) becomes validation, the rest training; each
    keeps file order and gets its split written in. The same rows and seed give the same split."""
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_task.setdefault(r["task"], []).append(i)
    val_positions = set()
    for task in sorted(by_task, key=task_order):
        positions = by_task[task]
        n_val = max(1, round(fraction * len(positions))) if len(positions) >= 10 else 0
        val_positions |= set(random.Random(f"{seed}/{task}").sample(positions, n_val))
    train, val = [], []
    for i, r in enumerate(rows):
        (val if i in val_positions else train).append(r | {"split": "val" if i in val_positions else "train"})
    return train, val


def load_rows(source: str | Path, *, split: str | None = "train", tasks: str | Sequence[str] = "all",
              settings: str | Sequence[str] | None = (DEFAULT_SETTING,), skip_invalid: bool = False) -> list[dict]:
    """ECInstruct rows of `source` (a local .json/.jsonl/.parquet file or a hub dataset id) that are in
    `split` (None = every split), `tasks` ('all', a comma string or a list; hub names, old spellings
    or abbreviations) and `settings` (None = every setting).

    Defaults are eCeLLM's training data: split train, all 10 tasks, IND_Diverse_Instruction.
    Each row: the 8 hub fields (task in hub spelling) + "index" and "row" (see read_rows). An empty
    selection raises DataError listing what the file holds.
    """
    rows = read_rows(source, skip_invalid=skip_invalid)
    return select_rows(rows, split=split, tasks=tasks, settings=settings, source=str(source))
