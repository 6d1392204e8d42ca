"""ECInstruct rows: read them from the hub or a local file, check them, select a split/task/setting.

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

Files are read whole (the full hub file is ~530 MB of JSON; a few GB of RAM). JSON, JSON Lines and
Parquet are read; a `.json` file may hold a JSON array of row objects, an object with one list of
rows, or JSON Lines (the hub file has been published in more than one shape).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from outdir import parse_jsonl
from tasks import ABBREV, TASKS, canonical_task

FIELDS = ("output", "input", "options", "task", "setting", "split", "few_shot_example", "instruction")
SETTINGS = (
    "IND_Diverse_Instruction", "IND_Single_Instruction", "IND_Unseen_Instruction",
    "OOD_Diverse_Instruction", "OOD_Single_Instruction", "OOD_Unseen_Instruction",
    "IND_Diverse_Instruction_1-shot", "OOD_Diverse_Instruction_1-shot",
)
SPLITS = ("train", "val", "test")
DEFAULT_SETTING = "IND_Diverse_Instruction"   # what eCeLLM trains and validates on
HUB_FILE = "dataset.json"                      # the single file of NingLab/ECInstruct
SAMPLE = "data/sample/ecinstruct_sample.jsonl"  # the in-repo sample (relative to the repository root)
_NULLABLE = {"options", "few_shot_example"}    # str or null; every other field must be a str
_NOT_BLANK = ("instruction", "output")         # a row without them trains (or scores) nothing
_MAX_LISTED = 5                                # invalid rows quoted in an error message


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
    """'all', or comma-separated hub names / old spellings / abbreviations -> hub names, in TASKS order.

    >>> parse_tasks("AVE,Query_Product_Ranking")
    ['Attribute_Value_Extraction', 'Query_Product_Rank']
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"no task given; use 'all' or any of: {_valid_tasks_text()}")
    if any(n.lower() == "all" for n in names):
        return list(TASKS)
    chosen = set()
    for n in names:
        task = _task_or_none(n)
        if task is None:
            raise DataError(f"unknown task {n!r}; use 'all' or any of: {_valid_tasks_text()}")
        chosen.add(task)
    return [t for t in TASKS if t in chosen]


def parse_settings(spec: str | Sequence[str] | None) -> list[str] | None:
    """'all' or None -> None (every setting); else comma-separated names (case-insensitive) -> SETTINGS names."""
    if spec is None:
        return None
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names or any(n.lower() == "all" for n in names):
        return None
    by_lower = {s.lower(): s for s in SETTINGS}
    for n in names:
        if n.lower() not in by_lower:
            raise DataError(f"unknown setting {n!r}; valid: all, {', '.join(SETTINGS)}")
    chosen = {by_lower[n.lower()] for n in names}
    return [s for s in SETTINGS if s in chosen]


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


def check_row(row) -> str | None:
    """None when `row` is a valid ECInstruct row, else the first problem as 'field ...' text."""
    if not isinstance(row, dict):
        return f"row must be a JSON object, got {_type_name(row)}"
    for field in FIELDS:
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
        if not row[field].strip():
            return f"field {field!r} is empty"
    if _task_or_none(row["task"]) is None:
        return f"field 'task' has unknown task {row['task']!r}; valid: {', '.join(TASKS)}"
    if row["setting"] not in SETTINGS:
        return f"field 'setting' has unknown setting {row['setting']!r}; valid: {', '.join(SETTINGS)}"
    if row["split"] not in SPLITS:
        return f"field 'split' has unknown split {row['split']!r}; valid: {', '.join(SPLITS)}"
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


def _read_file(path: Path):
    name = str(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path, name)
    if suffix == ".parquet":
        return _read_parquet(path, name)
    raise DataError(f"{name}: unsupported file type {suffix or '(none)'!r}; use .json, .jsonl or .parquet")


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
        raise DataError(f"{text} is a folder; pass a .json, .jsonl or .parquet file")
    if path.suffix.lower() in (".json", ".jsonl", ".parquet") or not _is_hub_id(text):
        raise DataError(f"{text}: no such file (and not a hub dataset id such as NingLab/ECInstruct)")
    return download_hub(text)


# ---- loading ------------------------------------------------------------------------------------

def read_rows(source: str | Path, *, skip_invalid: bool = False) -> list[dict]:
    """Every valid row of a file or hub dataset: hub fields in hub order, task in hub spelling, plus
    "index" (position within the row's (task, setting, split) block in file order).

    Invalid rows raise DataError (naming file, row and field) unless skip_invalid, which drops them
    and prints how many to stderr.
    """
    path = resolve_source(source)
    name = str(source) if Path(str(source)).expanduser().is_file() else f"{source} ({path.name})"
    rows, invalid = [], []
    block_sizes = Counter()
    for number, obj in _read_file(path):
        problem = str(obj) if isinstance(obj, Exception) else check_row(obj)
        if problem is not None:
            invalid.append((f"{name} row {number}: {problem}", number))
            continue
        row = {field: obj[field] for field in FIELDS}
        row["task"] = canonical_task(row["task"])
        key = (row["task"], row["setting"], row["split"])
        row["index"] = block_sizes[key]
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


def describe_counts(rows: Sequence[dict]) -> str:
    """'train: AVE/IND_Diverse_Instruction 51, ...; test: ...' (what a file holds, for error messages)."""
    counts = Counter((r["split"], r["task"], r["setting"]) for r in rows)
    if not counts:
        return "no valid rows"
    parts = []
    for split in SPLITS:
        items = [f"{ABBREV[t]}/{s} {n}" for (sp, t, s), n in sorted(counts.items()) if sp == split]
        if items:
            parts.append(f"{split}: " + ", ".join(items))
    return "; ".join(parts)


def select_rows(rows: Sequence[dict], *, split: str | None = "train", tasks="all",
                settings=(DEFAULT_SETTING,), source: str = "the data") -> list[dict]:
    """The rows of `rows` in the given split, tasks and settings (None = all), in file order."""
    split = parse_split(split)
    task_list = parse_tasks(tasks)
    setting_list = parse_settings(settings)
    wanted_tasks = set(task_list)
    wanted_settings = None if setting_list is None else set(setting_list)
    chosen = [r for r in rows
              if (split is None or r["split"] == split) and r["task"] in wanted_tasks
              and (wanted_settings is None or r["setting"] in wanted_settings)]
    if not chosen:
        task_text = "all" if len(task_list) == len(TASKS) else ",".join(ABBREV[t] for t in task_list)
        setting_text = "all" if setting_list is None else ",".join(setting_list)
        raise DataError(f"no rows match split={split or 'all'} tasks={task_text} settings={setting_text}; "
                        f"{source} holds: {describe_counts(rows)}")
    return chosen


def load_rows(source: str | Path, *, split: str | None = "train", tasks: str | Sequence[str] = "all",
              settings: str | Sequence[str] | None = (DEFAULT_SETTING,), skip_invalid: bool = False) -> list[dict]:
    """ECInstruct rows of `source` (a local .json/.jsonl/.parquet file or a hub dataset id) that are in
    `split` (None = every split), `tasks` ('all', a comma string or a list; hub names, old spellings
    or abbreviations) and `settings` (None = every setting).

    Defaults are eCeLLM's training data: split train, all 10 tasks, IND_Diverse_Instruction.
    Each row: the 8 hub fields (task in hub spelling) + "index" (see read_rows). An empty selection
    raises DataError listing what the file holds.
    """
    rows = read_rows(source, skip_invalid=skip_invalid)
    return select_rows(rows, split=split, tasks=tasks, settings=settings, source=str(source))
