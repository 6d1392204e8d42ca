"""Classification metrics on label lists: accuracy, binary P/R/F1 with specificity and NPV, macro P/R/F1.

Pure Python, no numpy or sklearn. Each function reproduces what eCeLLM's `evaluate.py` gets
from scikit-learn (`accuracy_score`, `precision_score`/`recall_score`/`f1_score` with
`average="binary", pos_label="yes"` or `average="macro"`, default `zero_division`, which scores
an undefined ratio 0), and `tests/test_metrics.py` checks them against sklearn on random inputs.

Invalid predictions. In "strict" mode the caller leaves an invalid prediction in the list as a
label that matches no gold label (any value that is not a class, e.g. None). Such a row then
- counts as wrong for accuracy;
- counts in every recall denominator (number of gold rows of its class), so it lowers recall
  and specificity, as a missed row should;
- counts in no precision denominator (it predicted no class), so it leaves precision and NPV
  unchanged, and it is not a class of the macro average.
With no invalid rows (eCeLLM's "paper" mode drops them beforehand) the formulas below are exactly
sklearn's and eCeLLM's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is 0 (sklearn's zero_division=0)."""
    return numerator / denominator if denominator else 0.0


def _check_aligned(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold labels but {len(y_pred)} predictions")


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """accuracy = #{i : y_pred[i] == y_true[i]} / n; 0.0 when n = 0.

    For Sequential_Recommendation (one gold item among 20 candidates, one letter predicted)
    this is HR@1.
    """
    _check_aligned(y_true, y_pred)
    return _ratio(sum(t == p for t, p in zip(y_true, y_pred)), len(y_true))


def binary_metrics(
    y_true: Sequence[Hashable],
    y_pred: Sequence[Hashable],
    positive: Hashable = "yes",
    negative: Hashable = "no",
) -> dict[str, float]:
    """Binary metrics with `positive` ('yes') as the positive class, as in eCeLLM.

    With tp = #(gold pos, pred pos), tn = #(gold neg, pred neg), and the row counts
    gold_pos, gold_neg, pred_pos, pred_neg:
        precision   = tp / pred_pos                   (0 if pred_pos = 0)
        recall      = tp / gold_pos                   (0 if gold_pos = 0)
        f1          = 2 tp / (pred_pos + gold_pos)    (= 2PR/(P+R); 0 if no positives at all)
        specificity = tn / (gold_neg + 1e-8)          (eCeLLM: tn / (tn + fp + 1e-8))
        npv         = tn / (pred_neg + 1e-8)          (eCeLLM: tn / (tn + fn + 1e-8))
        accuracy    = (tp + tn) / n
    A prediction that is neither label (strict mode's invalid row) is in no pred_* count.
    Returns those six plus the counts tp, fp, fn, tn (fn counts predicted negatives only, so with
    invalid rows tp + fn < gold_pos).
    """
    _check_aligned(y_true, y_pred)
    tp = fp = fn = tn = 0
    gold_pos = gold_neg = 0
    for gold, pred in zip(y_true, y_pred):
        gold_pos += gold == positive
        gold_neg += gold == negative
        tp += gold == positive and pred == positive
        fp += gold != positive and pred == positive
        fn += gold == positive and pred == negative
        tn += gold == negative and pred == negative
    pred_pos, pred_neg = tp + fp, tn + fn
    precision, recall = _ratio(tp, pred_pos), _ratio(tp, gold_pos)
    return {
        "accuracy": _ratio(tp + tn, len(y_true)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, pred_pos + gold_pos),
        "specificity": tn / (gold_neg + 1e-8),
        "npv": tn / (pred_neg + 1e-8),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def macro_metrics(
    y_true: Sequence[Hashable],
    y_pred: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """Macro-averaged precision, recall and F1 over `labels`, as sklearn's `average="macro"`.

    For each class c:  P_c = tp_c / #(pred == c),  R_c = tp_c / #(gold == c),
                       F_c = 2 tp_c / (#(pred == c) + #(gold == c)),   each 0 when undefined;
    macro P/R/F1 = unweighted means of P_c, R_c, F_c over the classes (macro F1 is the mean of
    the F_c, not the F1 of macro P and R).
    `labels` defaults to sklearn's choice: every label in y_true or y_pred, so a class the model
    predicts but the gold never has (e.g. 'D' for PRP, which eCeLLM accepts) is averaged in with
    F_c = 0. Pass `labels` to leave a sentinel (strict mode's invalid marker) out of the average.
    Returns macro_precision, macro_recall, macro_f1 and accuracy.
    """
    _check_aligned(y_true, y_pred)
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred), key=str)
    per_class_p, per_class_r, per_class_f = [], [], []
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        n_pred = sum(p == c for p in y_pred)
        n_gold = sum(t == c for t in y_true)
        per_class_p.append(_ratio(tp, n_pred))
        per_class_r.append(_ratio(tp, n_gold))
        per_class_f.append(_ratio(2 * tp, n_pred + n_gold))
    n_classes = len(labels)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_precision": _ratio(sum(per_class_p), n_classes),
        "macro_recall": _ratio(sum(per_class_r), n_classes),
        "macro_f1": _ratio(sum(per_class_f), n_classes),
    }
