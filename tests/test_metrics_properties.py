"""Property tests: no output crashes a parser or evaluate_task, and malformed outputs count as invalid.

Every task gets random text, "", very long strings, JSON of the wrong shape and out-of-range letters,
in both modes. AG uses a stand-in scorer here (tests/test_bert.py runs the real encoder).
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics import TASKS, evaluate_task, parse_output
from metrics.tasks import OPTION_LETTERS, TASK_KIND

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AVE_GOLD = json.dumps([
    {"attribute": "color", "value": "black", "source": "product title"},
    {"attribute": "material", "value": "None", "source": "None"},
])
# One valid gold output per task (QPR rows use QPR_LABELS).
GOLD = {
    "Attribute_Value_Extraction": AVE_GOLD,
    "Product_Relation_Prediction": "B",
    "Product_Matching": "yes",
    "Sentiment_Analysis": "A: very positive",
    "Sequential_Recommendation": "K",
    "Multiclass_Product_Classification": "C: The product does not fulfill the query, but could be used together.",
    "Product_Substitute_Identification": "yes",
    "Query_Product_Rank": "B,A",
    "Answerability_Prediction": "yes",
    "Answer_Generation": "Yes, it fits the 2019 model.",
}
QPR_LABELS = ["S", "E"]  # options A, B of every QPR row here


def _count_words(cands, refs):
    """Stand-in F_BERT: 1 for a non-empty candidate, 0 otherwise."""
    return [float(bool(c.strip())) for c in cands]


def _evaluate(task, predictions, mode):
    return evaluate_task(task, predictions, [GOLD[task]] * len(predictions), setting="OOD_Diverse_Instruction",
                         qpr_labels=[QPR_LABELS] * len(predictions), mode=mode, bertscorer=_count_words)


# JSON values of any shape but the right one for AVE (a list of attribute/value/source dicts).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
wrong_shape_json = (
    st.dictionaries(st.text(max_size=8), json_values, max_size=4)
    | st.integers()
    | st.text(max_size=30)
    | st.lists(st.lists(json_values, max_size=3), min_size=1, max_size=3)  # nested lists
    | st.lists(st.integers() | st.text(max_size=10) | st.none(), min_size=1, max_size=4)  # lists of non-dicts
    | st.lists(st.fixed_dictionaries({"attribute": st.text(max_size=8)}), min_size=1, max_size=3)  # keys missing
).map(json.dumps)
long_strings = st.sampled_from([
    "x" * 100_000,
    "[" * 100_000,
    "{" * 50_000,
    ",A" * 50_000,
    "yes " * 25_000,
    json.dumps([{"attribute": "color"}] * 5_000),
])
random_text = st.text(max_size=200)


def _out_of_range_letters(task: str, mode: str) -> list[str]:
    """Letters a task must reject: beyond eCeLLM's A-E (paper) or the task's options (strict)."""
    kind = TASK_KIND[task]
    if kind == "multiclass":
        allowed = "ABCDE" if mode == "paper" else OPTION_LETTERS[task]
    elif kind in ("recommendation", "ranking"):
        allowed = OPTION_LETTERS[task]
    else:
        allowed = ""
    return [c for c in string.ascii_uppercase + string.ascii_lowercase + "0!" if c not in allowed]


ALL_TASKS = pytest.mark.parametrize("task", TASKS)
MODES = pytest.mark.parametrize("mode", ["paper", "strict"])


@ALL_TASKS
@MODES
@FAST
@given(predictions=st.lists(random_text | long_strings | wrong_shape_json, max_size=6))
def test_any_text_is_scored_and_invalid_rows_counted(task, mode, predictions):
    result = _evaluate(task, predictions, mode)
    n_invalid = sum(not parse_output(task, p, mode=mode)[1] for p in predictions)
    if TASK_KIND[task] != "ranking":  # QPR also rejects letters beyond the row's options
        assert result["n_invalid"] == n_invalid
    else:
        assert result["n_invalid"] >= n_invalid
    assert result["n"] == len(predictions)
    assert 0.0 <= result["score"] <= 1.0


@ALL_TASKS
@MODES
@FAST
@given(text=wrong_shape_json | long_strings | st.just("") | st.text(string.whitespace, max_size=5))
def test_malformed_outputs_are_invalid(task, mode, text):
    if TASK_KIND[task] == "generation":
        # an answer is any non-empty text; only empty ones are invalid
        assert parse_output(task, text, mode=mode)[1] == bool(text.strip())
        return
    parsed, valid = parse_output(task, text, mode=mode)
    assert not valid
    assert _evaluate(task, [text], mode)["n_invalid"] == 1


@ALL_TASKS
@MODES
@FAST
@given(data=st.data())
def test_out_of_range_letters_are_invalid(task, mode, data):
    letters = _out_of_range_letters(task, mode)
    if not letters or TASK_KIND[task] == "generation":
        return
    letter = data.draw(st.sampled_from(letters))
    suffix = data.draw(st.sampled_from(["", ": very positive", " ", ",A"]))
    text = letter + suffix
    result = _evaluate(task, [text], mode)
    assert result["n_invalid"] == 1, (task, text)
    if mode == "strict":
        assert result["score"] == 0.0


@pytest.mark.parametrize("mode", ["paper", "strict"])
def test_qpr_letters_beyond_the_row_are_invalid(mode):
    # QPR_LABELS has two options: C and D exist in the alphabet but not in this row
    result = _evaluate("Query_Product_Rank", ["C,A", "B,D", "B,A"], mode)
    assert result["n_invalid"] == 2


def test_valid_outputs_are_valid():
    for task in TASKS:
        result = _evaluate(task, [GOLD[task]], "strict")
        assert result["n_invalid"] == 0 and result["score"] == pytest.approx(1.0, abs=1e-5), task
