"""Token ids and loss labels of ECInstruct rows: BOS once, EOS after every answer, prompt masked by position.

One example is laid out as

    input_ids = [BOS]? + prompt ids + answer ids + [EOS]
    labels    = [-100] * prompt_len  + answer ids + [EOS]        (train_on_inputs=False, the default)
    labels    = input_ids                                         (train_on_inputs=True)

where prompt_len counts the BOS. `labels` is aligned with `input_ids` (Hugging Face convention): the
loss compares logits[:, t] with labels[:, t + 1], so labels[0] is never a target. The prompt and the
answer are tokenized separately and concatenated, so the mask boundary is exact by position; nothing
is ever masked by token id (with pad == EOS the EOS label survives, see batching.collate).

BOS follows the checkpoint's policy (`tokenizer.add_bos`, applied by `tokenizer.encode(..., bos=True)`);
if the prompt text itself already starts with BOS (a chat template that writes it) the duplicate is
removed, so there is never more than one.

Truncation: an example longer than `cutoff` tokens (BOS and EOS included) has its *input field*
shortened token by token until it fits; instruction, options, worked example and answer stay whole.
A row that does not fit even with an empty input (in practice: its answer alone is too long) is
dropped and counted. eCeLLM instead truncates the concatenated text from the right, which can cut
the answer and the EOS.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from outdir import write_atomic

from .prompts import render_prompt

IGNORE_INDEX = -100
CACHE_FORMAT = 1      # bump when the encoding or the cache layout changes


# ---- one row ------------------------------------------------------------------------------------

def _encode_prompt_text(tokenizer, text: str) -> list[int]:
    """Prompt ids with the checkpoint's BOS exactly once (never two, even if the text writes BOS)."""
    ids = tokenizer.encode(text, bos=True)
    bos = tokenizer.bos_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def _cut_text(tokenizer, ids: list[int]) -> str:
    """Text of a prefix of token ids, without a trailing half UTF-8 character."""
    return tokenizer.decode(ids, skip_special_tokens=False).rstrip("\ufffd")


def encode_prompt(row: dict, tokenizer, *, max_len: int | None = None,
                  template: str = "alpaca") -> tuple[list[int], bool] | None:
    """(prompt ids with BOS per policy, truncated?) with at most `max_len` ids; None if it cannot fit.

    Only the input field is shortened; None when even the prompt with an empty input is longer.
    Generation (evaluate.py) can call this with max_len = context - max_new_tokens.
    """
    ids = _encode_prompt_text(tokenizer, render_prompt(row, template, tokenizer))
    if max_len is None or len(ids) <= max_len:
        return ids, False
    empty = _encode_prompt_text(tokenizer, render_prompt(row, template, tokenizer, input_text=""))
    if len(empty) > max_len:
        return None
    input_ids = tokenizer.encode(row["input"])
    keep = len(input_ids) - (len(ids) - max_len)   # first guess: drop exactly the overshoot
    while keep > 0:
        text = _cut_text(tokenizer, input_ids[:keep])
        ids = _encode_prompt_text(tokenizer, render_prompt(row, template, tokenizer, input_text=text))
        if len(ids) <= max_len:
            return ids, True
        keep -= max(1, len(ids) - max_len)           # re-tokenising at the cut can merge differently
    return empty, True


def encode_example(row: dict, tokenizer, *, cutoff: int = 2048, template: str = "alpaca",
                   train_on_inputs: bool = False) -> dict | None:
    """One training example (layout in the module docstring), or None if the answer does not fit.

    Returns {"input_ids": list[int], "labels": list[int] (-100 where not supervised),
             "prompt_len": int (BOS included), "truncated": bool (the input field was shortened)}.
    len(input_ids) <= cutoff; the last supervised label is always EOS.
    """
    answer = tokenizer.encode(row["output"]) + [tokenizer.eos_id]
    prompt = encode_prompt(row, tokenizer, max_len=cutoff - len(answer), template=template)
    if prompt is None:
        return None
    prompt_ids, truncated = prompt
    input_ids = prompt_ids + answer
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + answer
    return {"input_ids": input_ids, "labels": labels, "prompt_len": len(prompt_ids), "truncated": truncated}


# ---- many rows ----------------------------------------------------------------------------------

class RaggedIds(Sequence):
    """A list of int lists stored flat: values (N,) int32 and offsets (n + 1,) int64.

    Behaves as a read-only list[list[int]]: x[i] is a list[int], len(x), iteration, slicing and ==.
    It keeps ~100k tokenized rows in a few hundred MB instead of several GB of Python ints.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values = np.asarray(values, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "RaggedIds":
        arrays = [np.asarray(x, dtype=np.int32) for x in lists]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.values[self.offsets[i]: self.offsets[i + 1]].tolist()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(
            list(a) == b for a, b in zip(other, self))

    def __repr__(self) -> str:
        return f"RaggedIds({len(self)} rows, {len(self.values)} ids)"


@dataclass
class TokenizedData:
    """Tokenized rows, in the order of the rows given (dropped rows left out).

    input_ids[i], labels[i]: list[int] of equal length lengths[i]; source_index[i] is the example's
    position in the rows given to tokenize_rows; truncated[i] says its input field was shortened.
    stats: rows, kept, dropped, truncated, tokens, supervised_tokens, cutoff, template,
    per_task {task: {rows, dropped, truncated}}, cache ("hit", "miss" or "off").
    """

    input_ids: RaggedIds
    labels: RaggedIds
    lengths: list[int]
    source_index: list[int]
    truncated: list[bool]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lengths)


def rows_digest(rows: Sequence[dict]) -> str:
    """sha256 over the fields that shape the tokens (and the row identity), in order."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["instruction"], r["input"], r.get("options"), r["output"],
                             r.get("few_shot_example"), r.get("task"), r.get("setting"), r.get("split"),
                             r.get("index")], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(rows: Sequence[dict], tokenizer, *, cutoff: int, template: str, train_on_inputs: bool) -> str:
    """sha256 of everything the tokenized result depends on."""
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if not fingerprint:
        raise ValueError("caching needs tokenizer.fingerprint (model.tokenizer.Tokenizer has one)")
    chat = getattr(tokenizer, "chat_template", None) if template == "chat" else None
    parts = {"format": CACHE_FORMAT, "tokenizer": fingerprint, "template": template, "chat_template": chat,
             "cutoff": cutoff, "train_on_inputs": train_on_inputs, "rows": rows_digest(rows)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _to_arrow(data: TokenizedData, key: str):
    import pyarrow as pa

    def list_array(r: RaggedIds):
        return pa.LargeListArray.from_arrays(pa.array(r.offsets), pa.array(r.values))

    table = pa.table({"input_ids": list_array(data.input_ids), "labels": list_array(data.labels),
                      "source_index": pa.array(data.source_index, pa.int64()),
                      "truncated": pa.array(data.truncated, pa.bool_())})
    return table.replace_schema_metadata({"slm_ec_key": key, "stats": json.dumps(data.stats)})


def _from_arrow(table) -> TokenizedData:
    def ragged(name: str) -> RaggedIds:
        col = table.column(name).combine_chunks()
        # offsets may not start at 0 after combine_chunks of sliced data: rebase them.
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy()[offsets[0]: offsets[-1]]
        return RaggedIds(values, offsets - offsets[0])

    input_ids, labels = ragged("input_ids"), ragged("labels")
    lengths = np.diff(input_ids.offsets).tolist()
    stats = json.loads(table.schema.metadata[b"stats"])
    return TokenizedData(input_ids, labels, lengths, table.column("source_index").to_pylist(),
                         table.column("truncated").to_pylist(), stats)


def _write_cache(path: Path, data: TokenizedData, key: str) -> None:
    """Arrow IPC file, written atomically (outdir.write_atomic: a reader never sees half a file)."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    table = _to_arrow(data, key)

    def write(tmp: Path) -> None:
        with pa.ipc.new_file(str(tmp), table.schema) as writer:
            writer.write_table(table)

    write_atomic(path, write)


def _read_cache(path: Path, key: str) -> TokenizedData | None:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException):
        return None      # missing or unreadable: tokenize again and overwrite it
    if table.schema.metadata is None or table.schema.metadata.get(b"slm_ec_key") != key.encode():
        return None
    return _from_arrow(table)


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"tokenized-{key[:20]}.arrow"


def _progress(rows, verbose: bool):
    """A tqdm bar on stderr for long runs (the full training set takes minutes), if tqdm is installed."""
    if not verbose or len(rows) < 5000:
        return rows
    try:
        from tqdm import tqdm
    except ImportError:
        return rows
    return tqdm(rows, desc="tokenizing", unit="rows", mininterval=2.0)


def tokenize_rows(rows: Sequence[dict], tokenizer, *, cutoff: int = 2048, template: str = "alpaca",
                  train_on_inputs: bool = False, cache_dir: str | Path | None = None,
                  verbose: bool = True) -> TokenizedData:
    """encode_example over `rows`, dropping (and counting) rows whose answer does not fit in `cutoff`.

    With cache_dir, the result is stored as an Arrow IPC file named by cache_key (tokenizer
    fingerprint, template, cutoff, train_on_inputs, the rows' content, the format version), and a
    later call with the same inputs reads it back without tokenizing. With verbose, dropped rows
    are reported on stderr.
    """
    key = path = None
    if cache_dir is not None:
        key = cache_key(rows, tokenizer, cutoff=cutoff, template=template, train_on_inputs=train_on_inputs)
        path = cache_path(cache_dir, key)
        cached = _read_cache(path, key)
        if cached is not None:
            cached.stats["cache"] = "hit"
            return cached

    input_ids, labels, source_index, truncated = [], [], [], []
    per_task: dict[str, Counter] = {}
    for i, row in enumerate(_progress(rows, verbose)):
        counts = per_task.setdefault(row.get("task", "?"), Counter())
        counts["rows"] += 1
        ex = encode_example(row, tokenizer, cutoff=cutoff, template=template, train_on_inputs=train_on_inputs)
        if ex is None:
            counts["dropped"] += 1
            continue
        counts["truncated"] += ex["truncated"]
        input_ids.append(ex["input_ids"])
        labels.append(ex["labels"])
        source_index.append(i)
        truncated.append(ex["truncated"])

    lengths = [len(x) for x in input_ids]
    input_ids, labels = RaggedIds.from_lists(input_ids), RaggedIds.from_lists(labels)
    dropped = len(rows) - len(lengths)
    stats = {"rows": len(rows), "kept": len(lengths), "dropped": dropped, "truncated": sum(truncated),
             "tokens": sum(lengths), "supervised_tokens": int((labels.values != IGNORE_INDEX).sum()),
             "cutoff": cutoff, "template": template, "train_on_inputs": train_on_inputs,
             "per_task": {t: {k: c[k] for k in ("rows", "dropped", "truncated")} for t, c in per_task.items()},
             "cache": "off" if cache_dir is None else "miss"}
    data = TokenizedData(input_ids, labels, lengths, source_index, truncated, stats)
    if verbose and dropped:
        which = ", ".join(f"{t} {c['dropped']}" for t, c in stats["per_task"].items() if c["dropped"])
        print(f"dropped {dropped} of {len(rows)} rows whose answer does not fit in {cutoff} tokens ({which})",
              file=sys.stderr)
    if path is not None:
        _write_cache(path, data, key)
    return data
