"""Reading a raw model output as an answer: `parse_output(task, text) -> (parsed, valid)`.

The rules are eCeLLM's `evaluate.py` (@ f364c18), which the published numbers depend on:

| task kind | valid when | parsed |
| --- | --- | --- |
| binary (PM, PSI, AP) | `text.lower().strip()` is exactly `yes` or `no` | that word |
| multiclass (PRP, SA, MPC) | the first character of `text.strip()` is one of A-E | that letter |
| SR | `text.strip()` is exactly one letter A-T | that letter |
| QPR | every piece of `text.strip().split(",")` is one letter A-D, no letter twice | first character of each piece ("" for an empty piece), in order |
| AVE | `json.loads(text)` is a list of dicts with keys attribute, value, source | its dict elements (metrics/ave.py) |
| AG | `text.strip()` is not empty | the text |

- Multiclass: eCeLLM accepts any of A-E for all three tasks, although PRP has options A-C and
  MPC A-D; a PRP "D" is then a (wrong) class of the macro average. `mode="strict"` accepts only
  the task's own option letters (metrics.tasks.OPTION_LETTERS).
- QPR: eCeLLM scores the first character of each comma-separated piece, unstripped, so "A, B"
  scores A and skips " B"; `parsed` keeps exactly those characters so NDCG can reproduce it.
  Whether a letter names one of the item's 2-4 options is known only with the labels
  (metrics.scoring checks it).
- A non-string (e.g. None for a missing output) is invalid for every task. Nothing here raises
  on any string: empty, 100k characters, JSON of any shape, any letters.
"""

from __future__ import annotations

from tasks import canonical_task

from .ave import parse_ave_output
from .tasks import OPTION_LETTERS, TASK_KIND

# eCeLLM accepts these first letters for every multiclass task (PRP, SA, MPC).
ECELLM_MULTICLASS_LETTERS = "ABCDE"
BINARY_ANSWERS = ("yes", "no")
MODES = ("paper", "strict")


def parse_output(task: str, text: object, setting: str | None = None, *, mode: str = "paper") -> tuple[object, bool]:
    """(parsed, valid) for one raw output of `task` (any accepted spelling), per the table above.

    `parsed` is JSON-serialisable and None when nothing usable was read. `setting` is accepted
    for symmetry with evaluate_task: no parsing rule depends on it (AVE's OOD substring rule
    is a matching rule, applied when scoring). `mode` ("paper" or "strict") only changes which
    multiclass letters count as valid (see the module docstring).
    """
    task = canonical_task(task)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kind = TASK_KIND[task]
    if kind == "extraction":
        return parse_ave_output(text)
    if not isinstance(text, str):
        return None, False
    if kind == "binary":
        answer = text.lower().strip()
        return (answer, True) if answer in BINARY_ANSWERS else (None, False)
    if kind == "multiclass":
        stripped = text.strip()
        allowed = OPTION_LETTERS[task] if mode == "strict" else ECELLM_MULTICLASS_LETTERS
        # the `stripped[:1]` guard: eCeLLM's `pred[0]` raises IndexError on an empty output
        return (stripped[0], True) if stripped[:1] and stripped[0] in allowed else (None, False)
    if kind == "recommendation":
        answer = text.strip()
        return (answer, True) if len(answer) == 1 and answer in OPTION_LETTERS[task] else (None, False)
    if kind == "ranking":
        pieces = text.strip().split(",")
        first_chars = [piece[:1] for piece in pieces]  # (n_pieces,) "" for an empty piece
        valid = all(len(p) == 1 and p in OPTION_LETTERS[task] for p in pieces) and len(set(pieces)) == len(pieces)
        return first_chars, valid
    # generation (AG): any non-empty answer is an answer
    return text, bool(text.strip())
