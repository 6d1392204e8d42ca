"""Attribute_Value_Extraction: output parsing, the paper's F1*, and eCeLLM's triple matching.

An AVE output is a JSON list of triples, all lower-cased, one per (attribute, value, source):
    [{"attribute": "color", "value": "black", "source": "product title"},
     {"attribute": "material", "value": "None", "source": "None"}]
A target attribute the product does not state has value "None" (a *null* gold). One attribute can
have several gold triples (the same value found in several sources, or several values).

Two views are scored:
- F1* (the paper's equation 1), counted over (row, target attribute) pairs; see `f1_star`.
- eCeLLM's triple matching (`evaluate.py` @ f364c18), counted over triples; see `triple_metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

TRIPLE_KEYS = ("attribute", "value", "source")

# Values read as "no value" (after str().strip().lower()); the gold uses the string "None".
NULL_VALUES = frozenset({"", "none", "null"})


def parse_ave_output(text: object) -> tuple[list[dict], bool]:
    """(triples, valid) for one AVE output.

    `json.loads(text)` must give a list (eCeLLM's rule). `triples` keeps the list's dict elements
    (what eCeLLM's loop can read); the output is *valid* iff it parses to a list whose every
    element is a dict holding all three keys. An empty list is valid (it predicts nothing).
    Anything that does not parse, or parses to a non-list, gives ([], False); never raises.
    """
    if not isinstance(text, str):
        return [], False
    try:
        loaded = json.loads(text)
    except Exception:  # JSONDecodeError, RecursionError on deep nesting, ...
        return [], False
    if not isinstance(loaded, list):
        return [], False
    triples = [element for element in loaded if isinstance(element, dict)]
    valid = len(triples) == len(loaded) and all(all(k in t for k in TRIPLE_KEYS) for t in triples)
    return triples, valid


def _norm(x: object) -> str:
    return str(x).strip().lower()


def _is_null(value: object) -> bool:
    return value is None or _norm(value) in NULL_VALUES


def f1_star(pred_rows: Sequence[Sequence[dict] | None], gold_rows: Sequence[Sequence[dict]]) -> dict:
    """The paper's F1* for attribute value extraction (eCeLLM eq. 1).

    Each (row, target attribute) pair falls in exactly one of five classes:
        NV  gold null,  prediction null         IV  gold null,  a value predicted
        CV  gold value, the right value         WV  gold value, a wrong value
        NL  gold value, prediction null
        precision* = (NV + CV) / (NV + IV + CV + WV)
        recall*    = (NV + CV) / N,   N = NV + IV + CV + WV + NL (all pairs)
        F1*        = 2 P* R* / (P* + R*)           (each 0 when its denominator is 0; no epsilon)
    Conventions:
    - the target attributes of a row are the distinct attributes of its gold triples;
      attributes and values compare after str().strip().lower();
    - gold values G = the non-null values of the attribute's gold triples; G empty = null gold;
    - predicted values V = the non-null values of the predicted triples naming that attribute
      (null = JSON null, "", "None", "null"); V empty (including no triple at all) = null
      prediction. Several triples for one attribute (e.g. one value from two sources) are read as
      one set: CV iff V is a non-empty subset of G (every predicted value is one of the gold
      values), so padding the answer with a wrong extra value makes it WV. Sources are ignored.
    - predicted attributes that are not targets are ignored (no pair exists for them);
    - a row given as None (an invalid output in strict mode) scores IV on null golds and WV on
      the others: wrong everywhere.
    Returns the five counts, N, precision_star, recall_star and f1_star.
    """
    if len(pred_rows) != len(gold_rows):
        raise ValueError(f"{len(gold_rows)} gold rows but {len(pred_rows)} predicted rows")
    counts = {"NV": 0, "IV": 0, "CV": 0, "WV": 0, "NL": 0}
    for pred, gold in zip(pred_rows, gold_rows):
        gold_values: dict[str, set[str]] = {}
        for triple in gold:
            values = gold_values.setdefault(_norm(triple.get("attribute")), set())
            if not _is_null(triple.get("value")):
                values.add(_norm(triple["value"]))
        pred_values: dict[str, set[str]] = {}
        for triple in pred or ():
            if "attribute" in triple and not _is_null(triple.get("value")):
                pred_values.setdefault(_norm(triple["attribute"]), set()).add(_norm(triple["value"]))
        for attribute, gold_set in gold_values.items():
            predicted = pred_values.get(attribute, set())
            if pred is None:  # invalid output, strict mode
                counts["IV" if not gold_set else "WV"] += 1
            elif not gold_set:
                counts["NV" if not predicted else "IV"] += 1
            elif not predicted:
                counts["NL"] += 1
            else:
                counts["CV" if predicted <= gold_set else "WV"] += 1
    n = sum(counts.values())
    right = counts["NV"] + counts["CV"]
    answered = right + counts["IV"] + counts["WV"]
    precision = right / answered if answered else 0.0
    recall = right / n if n else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {**counts, "N": n, "precision_star": precision, "recall_star": recall, "f1_star": f1}


def _triples_match(pred: dict, gold: dict, substring: bool) -> bool:
    """eCeLLM's hit test: attribute, value and source all equal; with `substring` (OOD settings)
    also a hit when the attributes are equal, value and source are not JSON null, and each of
    str(value), str(source) is a substring of the other's (either way round)."""
    if not all(k in pred for k in TRIPLE_KEYS):
        return False
    if all(pred[k] == gold[k] for k in TRIPLE_KEYS):
        return True
    if not substring or pred["attribute"] != gold["attribute"]:
        return False
    if pred["value"] is None or pred["source"] is None:
        return False
    pv, gv, ps, gs = str(pred["value"]), str(gold["value"]), str(pred["source"]), str(gold["source"])
    return (pv in gv or gv in pv) and (ps in gs or gs in ps)


def triple_metrics(
    pred_rows: Sequence[Sequence[dict]], gold_rows: Sequence[Sequence[dict]], *, substring: bool = False
) -> dict:
    """eCeLLM's triple-matching precision, recall and F1 (evaluate.py @ f364c18), exactly:

        hits      = sum over rows, gold triples g, predicted triples p of [p matches g]
        recall    = hits / #gold triples
        precision = hits / (#predicted triples + 1e-6)
        F1        = 2 R P / (R + P + 1e-6)
    #predicted triples counts the dicts with an "attribute" key; a prediction row that did not
    parse is an empty list (it adds gold triples, no predictions). As in eCeLLM, hits count
    (gold, prediction) pairs, so a duplicated predicted triple, or (with `substring`, used for
    OOD settings) one prediction matching several gold triples, counts more than once: recall
    can exceed 1. "None" gold triples are ordinary triples here. Before f364c18 (Sep 2025)
    eCeLLM divided by 1e-6 alone, so older published "F1" values are about 2 x recall.
    Returns precision, recall, f1, hits, n_gold_triples, n_pred_triples.
    """
    if len(pred_rows) != len(gold_rows):
        raise ValueError(f"{len(gold_rows)} gold rows but {len(pred_rows)} predicted rows")
    hits = n_gold = n_pred = 0
    for pred, gold in zip(pred_rows, gold_rows):
        n_gold += len(gold)
        n_pred += sum("attribute" in p for p in pred)
        hits += sum(_triples_match(p, g, substring) for g in gold for p in pred)
    recall = hits / n_gold if n_gold else 0.0
    precision = hits / (n_pred + 1e-6)
    f1 = 2 * recall * precision / (recall + precision + 1e-6)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "hits": hits,
        "n_gold_triples": n_gold,
        "n_pred_triples": n_pred,
    }
