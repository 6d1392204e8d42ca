"""experiments/pm-135m/merge_metrics.py: each task from the first run that scored it, and a one-line refusal when
the runs evaluated different things or miss a block of the rows' test split."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "pm-135m"))

import merge_metrics  # noqa: E402

PM, PRP = "Product_Matching", "Product_Relation_Prediction"
DIVERSE, SINGLE = "IND_Diverse_Instruction", "IND_Single_Instruction"


def block(score: float, n: int) -> dict:
    return {"strict": {"score": score, "n": n, "n_invalid": 0}, "paper": {"score": score, "n": n, "n_invalid": 0}}


def run(results: dict, caps: dict | None = None, **changes) -> dict:
    generation = {"template": "alpaca", "greedy": True, "cutoff": 2048, "quant": "nf4", "dtype": "float32",
                  "max_new_tokens": 100, "max_new_tokens_by_task": caps or {PM: 8, PRP: 8}, "seconds": 10.0}
    out = {"model": "m.gguf", "adapter": "a", "split": "test", "label": "ours", "generation": generation,
           "results": results}
    for key, value in changes.items():
        (generation if key in generation else out)[key] = value
    return out


TEST = Counter({(PM, DIVERSE): 4, (PM, SINGLE): 4, (PRP, DIVERSE): 3})


def test_each_task_from_the_first_run_that_scored_it():
    pm_run = run({PM: {DIVERSE: block(0.9, 4), SINGLE: block(0.8, 4), "OOD_Diverse_Instruction": block(0.1, 2)}})
    rest = run({PM: {DIVERSE: block(0.1, 4), SINGLE: block(0.1, 4)}, PRP: {DIVERSE: block(0.5, 3)},
                "Sentiment_Analysis": {DIVERSE: block(0.3, 7)}})
    merged = merge_metrics.merge({"pm.json": pm_run, "rest.json": rest}, TEST)
    assert merged["results"] == {PM: {DIVERSE: block(0.9, 4), SINGLE: block(0.8, 4)}, PRP: {DIVERSE: block(0.5, 3)}}
    assert merged["merged_from"] == {"pm.json": [PM], "rest.json": [PRP]}
    assert merged["generation"]["max_new_tokens_by_task"] == {PM: 8, PRP: 8}
    assert merged["generation"]["seconds"] == 20.0 and merged["tasks"] == [PM, PRP]


@pytest.mark.parametrize("change, message", [
    ({"adapter": "another"}, "differs from pm.json in 'adapter'"),
    ({"quant": "none"}, "differs from pm.json in generation 'quant'"),
    ({"caps": {PM: 100, PRP: 8}}, "capped Product_Matching answers at 100 tokens, pm.json at 8"),
])
def test_runs_that_evaluated_different_things_are_refused(change, message):
    pm_run = run({PM: {DIVERSE: block(0.9, 4), SINGLE: block(0.8, 4)}})
    rest = run({PM: {DIVERSE: block(0.1, 4), SINGLE: block(0.1, 4)}, PRP: {DIVERSE: block(0.5, 3)}}, **change)
    with pytest.raises(ValueError, match=message):
        merge_metrics.merge({"pm.json": pm_run, "rest.json": rest}, TEST)


def test_a_missing_or_short_block_is_named():
    pm_run = run({PM: {DIVERSE: block(0.9, 4), SINGLE: block(0.8, 3)}})
    rest = run({PRP: {DIVERSE: block(0.5, 3)}})
    with pytest.raises(ValueError, match="Product_Matching/IND_Single_Instruction has 4 test rows, pm.json scored 3"):
        merge_metrics.merge({"pm.json": pm_run, "rest.json": rest}, TEST)
    with pytest.raises(ValueError, match="Product_Relation_Prediction/IND_Diverse_Instruction has 3 test rows, "
                                         "no source scored None"):
        merge_metrics.merge({"pm.json": run({PM: {DIVERSE: block(0.9, 4), SINGLE: block(0.8, 4)}})}, TEST)
