"""experiments/smollm2-135m-real/decision.py: its AUC against scikit-learn's, its batched forward passes
against one row at a time, and its refusal of classes that cannot be told apart by their first token."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score   # test oracle (requirements-dev.txt)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "smollm2-135m-real"))

import decision  # noqa: E402
from data.ecinstruct import read_rows  # noqa: E402
from model import load_model  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "ecinstruct_sample.jsonl"


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 60) / 4.0          # few distinct values: many ties
        positive = rng.random(60) < 0.3
        assert decision.auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert np.isnan(decision.auc(np.ones(3), np.zeros(3, dtype=bool)))


def test_auc_se_no_signal_matches_a_permutation_spread():
    """se0 is the spread of the AUC of label-free scores: checked against 4,000 random shuffles."""
    rng = np.random.default_rng(1)
    scores, positive = rng.random(140), np.arange(140) < 31
    aucs = [decision.auc(scores, rng.permutation(positive)) for _ in range(4000)]
    assert np.std(aucs) == pytest.approx(decision.auc_se_no_signal(31, 109), rel=0.05)


def test_batched_right_padded_probabilities_equal_one_row_at_a_time(tiny_dir):
    model, tokenizer = load_model(tiny_dir)
    model.eval()
    rows = [r for r in read_rows(SAMPLE) if r["task"] == "Product_Matching"][:7]
    token_ids = [tokenizer.encode("yes")[0], tokenizer.encode("no")[0]]
    batched = decision.class_probabilities(model, tokenizer, rows, token_ids, 2048, batch_size=4)
    alone = np.concatenate([decision.class_probabilities(model, tokenizer, [r], token_ids, 2048) for r in rows])
    assert len({len(tokenizer.encode(r["input"])) for r in rows}) > 1   # the batches really are padded
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(batched.sum(1), 1.0, atol=1e-6)


class FirstCharTokenizer:
    """Token id = the first character's code point: "A" and "AB" share their first token."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_class_tokens_refuses_classes_sharing_a_first_token():
    rows = [{"task": "Product_Matching", "output": "yes"}, {"task": "Product_Matching", "output": "no"}]
    assert decision.class_tokens(FirstCharTokenizer(), rows) == {"Product_Matching": {"yes": ord("y"), "no": ord("n")}}
    rows = [{"task": "Product_Relation_Prediction", "output": "A"}, {"task": "Product_Relation_Prediction", "output": "AB"}]
    with pytest.raises(ValueError, match="Product_Relation_Prediction: two classes share a first answer token"):
        decision.class_tokens(FirstCharTokenizer(), rows)


def test_decision_runs_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    """A smoke test of the script as run.sh calls it (it once crashed at HEAD on evaluate.py's loader): a tiny run's
    adapter, the sample's rows of the first-token tasks, the table written."""
    import json

    import train

    work = tmp_path / "work"
    work.mkdir()
    keep = ("Product_Matching", "Product_Relation_Prediction", "Product_Substitute_Identification")
    rows = [r for r in read_rows(SAMPLE) if r["task"] in keep]
    rows += [dict(r, split="test") for r in rows[:12]]
    with open(work / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ("index", "row")}) + "\n")
    run = tmp_path / "run"
    assert train.main(["--model", str(tiny_dir), "--dataset", str(work / "rows.jsonl"), "--tasks", ",".join(keep),
                       "--quant", "none", "--max-steps", "1", "--batch-size", "4", "--val-size", "0",
                       "--cache-dir", "", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "decision.md"
    decision.main(["--work", str(work), "--adapter", str(run / "adapter"), "--model", str(tiny_dir),
                   "--out", str(out)])
    table = out.read_text()
    assert "| PM | IND_Diverse |" in table and "AUC" in table
