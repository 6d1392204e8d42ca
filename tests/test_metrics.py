"""Metrics of issue 6: the published SmolLM2-360M numbers, sklearn agreement, eCeLLM's rules, errors.

The real prediction and gold files come from the shared ECInstruct folder; those tests skip when
it is absent. Everything else runs in memory.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import pytest

from metrics import ABBREV, TASK_ALIASES, TASKS, canonical_task, evaluate_task, parse_output
from metrics.ave import f1_star, parse_ave_output, triple_metrics
from metrics.classification import accuracy, binary_metrics, macro_metrics
from metrics.ranking import ESCI_GAINS, dcg, ndcg_ecellm, ndcg_full_ideal


@pytest.fixture
def ecinstruct_dir(request) -> Path:
    """The shared ECInstruct folder: the lead's `shared_dir` fixture when conftest has it, else
    <repo>/../shared/ecinstruct; skips the test when the folder is absent."""
    try:
        return request.getfixturevalue("shared_dir")
    except pytest.FixtureLookupError:
        path = Path(__file__).resolve().parents[2] / "shared" / "ecinstruct"
        if not (path / "gold_outputs.jsonl").is_file():
            pytest.skip("shared ECInstruct folder not found")
        return path


@lru_cache(maxsize=None)
def _load_blocks(folder: str):
    """{(task, setting): (predictions, references)} joined by index; and the QPR labels."""
    folder = Path(folder)
    gold = {}
    with open(folder / "gold_outputs.jsonl") as f:
        for line in f:
            row = json.loads(line)
            gold[(row["task"], row["setting"], row["index"])] = row["output"]
    predictions = defaultdict(dict)
    with open(folder / "predictions_smollm2_360m.jsonl") as f:
        for line in f:
            row = json.loads(line)
            predictions[(row["task"], row["setting"])][row["index"]] = row["prediction"]
    blocks = {}
    for (task, setting), by_index in predictions.items():
        indices = sorted(by_index)
        if (task, setting, 0) not in gold:
            continue  # tasks without gold here (SA, SR, AP, AG, AVE test)
        blocks[(task, setting)] = ([by_index[i] for i in indices], [gold[(task, setting, i)] for i in indices])
    qpr_labels = json.loads((folder / "qpr_label.json").read_text())
    return blocks, qpr_labels


# The study's Table 2 / Table 3 row for SmolLM2-360M-EC (docs/ecinstruct.md section 5.1).
PAPER_NUMBERS = [
    ("Product_Relation_Prediction", "IND_Diverse_Instruction", 0.302),
    ("Product_Matching", "IND_Diverse_Instruction", 0.720),
    ("Multiclass_Product_Classification", "IND_Diverse_Instruction", 0.633),
    ("Product_Substitute_Identification", "IND_Diverse_Instruction", 0.000),
    ("Query_Product_Rank", "IND_Diverse_Instruction", 0.809),
    ("Product_Relation_Prediction", "OOD_Diverse_Instruction", 0.200),
]
# IND_Single numbers recomputed from the same files in docs/ecinstruct.md section 5.1.
DOC_SINGLE_NUMBERS = [
    ("Product_Relation_Prediction", "IND_Single_Instruction", 0.299),
    ("Product_Matching", "IND_Single_Instruction", 0.787),
    ("Multiclass_Product_Classification", "IND_Single_Instruction", 0.633),
    ("Product_Substitute_Identification", "IND_Single_Instruction", 0.000),
    ("Query_Product_Rank", "IND_Single_Instruction", 0.806),
]


@pytest.mark.parametrize("task, setting, expected", PAPER_NUMBERS + DOC_SINGLE_NUMBERS)
def test_reproduces_smollm2_360m_numbers(ecinstruct_dir, task, setting, expected):
    blocks, qpr_labels = _load_blocks(str(ecinstruct_dir))
    predictions, references = blocks[(task, setting)]
    result = evaluate_task(task, predictions, references, setting=setting, qpr_labels=qpr_labels)
    assert round(result["score"], 3) == expected
    assert result["n"] == len(predictions) and result["n_scored"] <= result["n"]


def test_real_blocks_score_in_both_modes(ecinstruct_dir):
    blocks, qpr_labels = _load_blocks(str(ecinstruct_dir))
    for (task, setting), (predictions, references) in blocks.items():
        paper = evaluate_task(task, predictions, references, setting=setting, qpr_labels=qpr_labels)
        strict = evaluate_task(task, predictions, references, setting=setting, qpr_labels=qpr_labels, mode="strict")
        assert 0.0 <= strict["score"] <= 1.0 and 0.0 <= paper["score"] <= 1.0
        if paper["n_invalid"] == 0:
            assert strict["score"] == pytest.approx(paper["score"])


# ---------------------------------------------------------------- task names


def test_task_names():
    assert len(TASKS) == 10 and set(ABBREV) == set(TASKS)
    for task in TASKS:
        assert canonical_task(task) == task
        assert canonical_task(ABBREV[task]) == task
        assert canonical_task(task.lower()) == task
    assert canonical_task("Product_Relation_Predicition") == "Product_Relation_Prediction"
    assert canonical_task("Product_Substitue_Identification") == "Product_Substitute_Identification"
    assert canonical_task("Query_Product_Ranking") == "Query_Product_Rank"
    assert all(target in TASKS for target in TASK_ALIASES.values())
    with pytest.raises(ValueError, match="Attribute_Value_Extraction"):
        canonical_task("Product_Ranking")


# ---------------------------------------------------------------- classification vs sklearn


def _random_labels(rng: random.Random, classes: str, n: int) -> list[str]:
    weights = [rng.random() for _ in classes]
    return rng.choices(list(classes), weights=weights, k=n)


@pytest.mark.slow
def test_classification_agrees_with_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    rng = random.Random(0)
    for trial in range(200):
        n = rng.choice([1, 2, 5, 30, 200])
        classes = rng.choice(["AB", "ABC", "ABCDE", "A"])
        y_true, y_pred = _random_labels(rng, classes, n), _random_labels(rng, rng.choice(["AB", "ABCDE", "BD"]), n)
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
        ours = macro_metrics(y_true, y_pred)
        assert ours["macro_precision"] == pytest.approx(p, abs=1e-12)
        assert ours["macro_recall"] == pytest.approx(r, abs=1e-12)
        assert ours["macro_f1"] == pytest.approx(f, abs=1e-12)
        assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))

        b_true, b_pred = _random_labels(rng, ["yes", "no"], n), _random_labels(rng, ["yes", "no"], n)
        p, r, f, _ = precision_recall_fscore_support(
            b_true, b_pred, average="binary", pos_label="yes", zero_division=0
        )
        tn, fp, fn, tp = confusion_matrix(b_true, b_pred, labels=["no", "yes"]).ravel()
        ours = binary_metrics(b_true, b_pred)
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f), abs=1e-12)
        assert ours["specificity"] == pytest.approx(tn / (tn + fp + 1e-8), abs=1e-12)
        assert ours["npv"] == pytest.approx(tn / (tn + fn + 1e-8), abs=1e-12)
        assert (ours["tp"], ours["fp"], ours["fn"], ours["tn"]) == (tp, fp, fn, tn)


def test_strict_invalid_rows_by_hand():
    # gold: yes yes no no; predictions: yes, invalid, no, invalid
    result = binary_metrics(["yes", "yes", "no", "no"], ["yes", None, "no", None])
    assert result["precision"] == 1.0  # 1 of 1 predicted yes
    assert result["recall"] == 0.5  # 1 of 2 gold yes
    assert result["f1"] == pytest.approx(2 * 1 / (1 + 2))
    assert result["specificity"] == pytest.approx(0.5)  # 1 of 2 gold no
    assert result["npv"] == pytest.approx(1.0)  # 1 of 1 predicted no
    assert result["accuracy"] == 0.5
    # macro over A, B only (None is no class): A: P 1, R 1/2; B: P 1/2, R 1
    result = macro_metrics(["A", "A", "B"], ["A", None, "B"], labels=["A", "B"])
    assert result["macro_precision"] == pytest.approx((1 + 1) / 2)
    assert result["macro_recall"] == pytest.approx((0.5 + 1) / 2)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_paper_drops_invalid_strict_counts_wrong():
    refs = ["yes", "yes", "no", "no"]
    preds = ["Yes ", "maybe", " NO", ""]
    paper = evaluate_task("PM", preds, refs)
    strict = evaluate_task("PM", preds, refs, mode="strict")
    assert paper["n_invalid"] == strict["n_invalid"] == 2
    assert paper["n_scored"] == 2 and paper["accuracy"] == 1.0 and paper["f1"] == 1.0
    assert strict["n_scored"] == 4 and strict["accuracy"] == 0.5 and strict["recall"] == 0.5

    # PRP: eCeLLM accepts any of A-E, strict only the options A-C
    refs = ["A", "B", "C", "A"]
    preds = ["A", "D", "C: similar", "Z"]
    paper = evaluate_task("PRP", preds, refs)
    strict = evaluate_task("PRP", preds, refs, mode="strict")
    assert paper["n_invalid"] == 1 and strict["n_invalid"] == 2
    assert paper["accuracy"] == pytest.approx(2 / 3) and strict["accuracy"] == 0.5
    # paper macro over {A, B, C, D}: F_A 1, F_B 0, F_C 1, F_D 0
    assert paper["macro_f1"] == pytest.approx(0.5)

    # SR: exactly one letter A-T
    paper = evaluate_task("SR", [" B", "U", "AB", "t"], ["B", "C", "A", "T"])
    assert paper["n_invalid"] == 3 and paper["score"] == 1.0
    assert evaluate_task("SR", [" B", "U", "AB", "t"], ["B", "C", "A", "T"], mode="strict")["score"] == 0.25


# ---------------------------------------------------------------- ranking


def test_ndcg_by_hand():
    labels = ["C", "S", "E"]  # options A, B, C
    # predicted C,B,A: gains 1.0, 0.1, 0.01 -> already ideal
    assert ndcg_ecellm(["C", "B", "A"], labels) == pytest.approx(1.0, abs=2e-6)
    # predicted A,B,C: gains 0.01, 0.1, 1.0
    dcg_value = (2**0.01 - 1) / 1 + (2**0.1 - 1) / math.log2(3) + (2**1.0 - 1) / 2
    ideal = (2**1.0 - 1) / 1 + (2**0.1 - 1) / math.log2(3) + (2**0.01 - 1) / 2
    assert dcg([0.01, 0.1, 1.0]) == pytest.approx(dcg_value)
    assert ndcg_ecellm(["A", "B", "C"], labels) == pytest.approx(dcg_value / (ideal + 1e-6))
    # eCeLLM normalises by the predicted list: naming only the best option scores ~1
    assert ndcg_ecellm(["C"], labels) == pytest.approx(1 / (1 + 1e-6))
    assert ndcg_full_ideal(["C"], labels) == pytest.approx(1 / ideal)
    # unknown letters skipped; nothing known -> 0
    assert ndcg_ecellm(["D", " ", ""], labels) == 0.0
    assert ESCI_GAINS == {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}


def _ecellm_qpr_reference(predictions, qpr_labels):
    """eCeLLM evaluate.py's QPR loop, transcribed (test oracle)."""
    score_mapping = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0}
    total, skipped = 0.0, 0
    for i, prediction in enumerate(predictions):
        label2score = {chr(ord("A") + k): label for k, label in enumerate(qpr_labels[i])}
        scores = []
        for rank in prediction.strip().split(","):
            try:
                scores.append(score_mapping[label2score[rank[0]]])
            except (KeyError, IndexError):
                skipped += 1
        ideal = sorted(scores, reverse=True)
        dcg_value = sum((2 ** s - 1) / math.log2(k + 2) for k, s in enumerate(scores))
        idcg = sum((2 ** s - 1) / math.log2(k + 2) for k, s in enumerate(ideal))
        total += dcg_value / (idcg + 1e-6)
    return total / len(predictions), skipped


def test_qpr_matches_ecellm_loop_on_random_rankings():
    rng = random.Random(1)
    for _ in range(30):
        n = rng.randint(1, 40)
        labels = [rng.sample("ESCI", rng.randint(2, 4)) for _ in range(n)]
        gold = [",".join(sorted("ABCD"[: len(item)], key=lambda x: -ESCI_GAINS[item[ord(x) - 65]])) for item in labels]
        pieces = ["A", "B", "C", "D", "E", "a", " B", "", "AB", "Z"]
        preds = [",".join(rng.choices(pieces, k=rng.randint(0, 5))) for _ in range(n)]
        result = evaluate_task("QPR", preds, gold, qpr_labels=labels)
        expected, skipped = _ecellm_qpr_reference(preds, labels)
        assert result["score"] == pytest.approx(expected, abs=1e-12)
        assert result["n_invalid_letters"] == skipped


def test_qpr_rules_and_errors():
    labels = [["E", "S"], ["I", "C", "E"]]
    gold = ["A,B", "C,B,A"]
    paper = evaluate_task("Query_Product_Ranking", ["A,B", "C, B"], gold, qpr_labels=labels)
    assert paper["n_invalid"] == 1 and paper["n_invalid_letters"] == 1 and paper["n_scored"] == 2
    assert paper["score"] == pytest.approx((1 / (1 + 1e-6) + 1 / (1 + 1e-6)) / 2, abs=1e-6)
    strict = evaluate_task("QPR", ["A,B", "C, B"], gold, qpr_labels=labels, mode="strict")
    assert strict["score"] == pytest.approx(0.5, abs=1e-6)
    # 'C' names no option of a 2-product item: the row is invalid
    assert evaluate_task("QPR", ["A,C", "C,B,A"], gold, qpr_labels=labels)["n_invalid"] == 1
    with pytest.raises(ValueError, match="qpr_labels"):
        evaluate_task("QPR", ["A,B"], ["A,B"])
    with pytest.raises(ValueError, match="1 qpr_labels lists for 2 predictions"):
        evaluate_task("QPR", ["A,B", "A"], gold, qpr_labels=labels[:1])
    with pytest.raises(ValueError, match="row 1"):
        evaluate_task("QPR", ["A,B", "A"], ["A,B", "A,B"], qpr_labels=labels)


# ---------------------------------------------------------------- attribute value extraction


def _triple(attribute, value, source):
    return {"attribute": attribute, "value": value, "source": source}


def test_f1_star_by_hand():
    gold = [
        [_triple("color", "black", "product title"), _triple("material", "None", "None")],  # CV, NV
        [_triple("color", "red", "product title"), _triple("color", "red", "product feature"),
         _triple("size", "xl", "product title")],  # color CV (two sources), size NL
        [_triple("style", "None", "None"), _triple("brand", "acme", "product brand")],  # IV, WV
    ]
    pred = [
        [_triple("color", "Black ", "product description"), _triple("material", "None", "None")],
        [_triple("color", "red", "product title"), _triple("color", "red", "product feature"),
         _triple("weight", "3 lb", "product title")],  # weight: not a target, ignored
        [_triple("style", "casual", "product title"), _triple("brand", "acme", "product title"),
         _triple("brand", "other", "product title")],  # brand: one wrong extra value -> WV
    ]
    result = f1_star(pred, gold)
    assert {k: result[k] for k in ("NV", "IV", "CV", "WV", "NL", "N")} == {
        "NV": 1, "IV": 1, "CV": 2, "WV": 1, "NL": 1, "N": 6}
    precision, recall = 3 / 5, 3 / 6
    assert result["precision_star"] == pytest.approx(precision)
    assert result["recall_star"] == pytest.approx(recall)
    assert result["f1_star"] == pytest.approx(2 * precision * recall / (precision + recall))
    # an invalid row in strict mode is wrong everywhere
    strict = f1_star([None], [gold[0]])
    assert (strict["WV"], strict["IV"], strict["f1_star"]) == (1, 1, 0.0)


def _ecellm_ave_reference(predictions, references, setting):
    """eCeLLM evaluate.py's AVE loop (@ f364c18), transcribed (test oracle; dict-only predictions)."""
    idx2pred = {}
    for i, prediction in enumerate(predictions):
        try:
            idx2pred[i] = json.loads(prediction)
            if type(idx2pred[i]) != list:
                idx2pred[i] = []
        except Exception:
            idx2pred[i] = []
    hits = count_label = count_pred = 0
    for i, reference in enumerate(references):
        for label in json.loads(reference):
            count_label += 1
            for pred in idx2pred[i]:
                if "attribute" in pred and "value" in pred and "source" in pred:
                    if pred["attribute"] == label["attribute"] and pred["value"] == label["value"] and pred["source"] == label["source"]:
                        hits += 1
                    elif ("OOD" in setting and pred["attribute"] == label["attribute"] and pred["value"] is not None
                          and pred["source"] is not None
                          and (str(pred["value"]) in str(label["value"]) or str(label["value"]) in str(pred["value"]))
                          and (pred["source"] in label["source"] or label["source"] in pred["source"])):
                        hits += 1
    for i in range(len(predictions)):
        count_pred += sum("attribute" in pred for pred in idx2pred[i])
    recall = hits / count_label
    precision = hits / (count_pred + 1e-6)
    return precision, recall, 2 * recall * precision / (recall + precision + 1e-6)


def test_triple_metrics_match_ecellm_loop():
    rng = random.Random(2)
    attributes, values, sources = ["color", "size", "style"], ["red", "red shirt", "xl", "None", "x"], [
        "product title", "product feature", "None", "title"]
    for _ in range(40):
        n = rng.randint(1, 8)
        refs, preds = [], []
        for _ in range(n):
            refs.append(json.dumps([_triple(rng.choice(attributes), rng.choice(values), rng.choice(sources))
                                    for _ in range(rng.randint(1, 3))]))
            shape = rng.random()
            if shape < 0.15:
                preds.append("not json")
            elif shape < 0.25:
                preds.append(json.dumps({"attribute": "color"}))
            else:
                triples = [_triple(rng.choice(attributes), rng.choice(values + [None]), rng.choice(sources))
                           for _ in range(rng.randint(0, 3))]
                if rng.random() < 0.2:
                    triples.append({"attribute": "color", "value": "red"})  # no source: counted, never a hit
                preds.append(json.dumps(triples))
        for setting in ("IND_Diverse_Instruction", "OOD_Diverse_Instruction"):
            result = evaluate_task("AVE", preds, refs, setting=setting)
            precision, recall, f1 = _ecellm_ave_reference(preds, refs, setting)
            assert result["triple_precision"] == pytest.approx(precision, abs=1e-12)
            assert result["triple_recall"] == pytest.approx(recall, abs=1e-12)
            assert result["triple_f1"] == pytest.approx(f1, abs=1e-12)
            assert 0.0 <= result["score"] <= 1.0


def test_ave_parsing_and_ood_substring():
    assert parse_ave_output('[{"attribute": "a", "value": "b", "source": "c"}]')[1]
    assert parse_ave_output("[]") == ([], True)
    assert parse_ave_output('{"attribute": "a"}') == ([], False)
    assert parse_ave_output('[1, {"attribute": "a", "value": "b", "source": "c"}]')[1] is False
    assert parse_ave_output("[" * 100_000) == ([], False)
    gold = [[_triple("mount type", "wall mount", "product title")]]
    pred = [[_triple("mount type", "wall", "title")]]
    assert triple_metrics(pred, gold)["hits"] == 0
    assert triple_metrics(pred, gold, substring=True)["hits"] == 1


# ---------------------------------------------------------------- parsing and errors


@pytest.mark.parametrize("task, text, expected", [
    ("PM", " Yes\n", ("yes", True)),
    ("PSI", "yes.", (None, False)),
    ("SA", "B: positive", ("B", True)),
    ("SA", "F", (None, False)),
    ("MPC", "", (None, False)),
    ("SR", "T", ("T", True)),
    ("SR", "U", (None, False)),
    ("QPR", "C,B,A", (["C", "B", "A"], True)),
    ("QPR", "A, B", (["A", " "], False)),
    ("QPR", "A,A", (["A", "A"], False)),
    ("AG", "  ", ("  ", False)),
    ("AG", None, (None, False)),
])
def test_parse_output(task, text, expected):
    assert parse_output(task, text) == expected


def test_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        evaluate_task("PM", ["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="row 1 is missing"):
        evaluate_task("PM", ["yes", "no"], ["yes", None])
    with pytest.raises(ValueError, match="valid tasks"):
        evaluate_task("Product_Search", ["yes"], ["yes"])
    with pytest.raises(ValueError, match="mode"):
        evaluate_task("PM", ["yes"], ["yes"], mode="lenient")
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        evaluate_task("PM", ["yes"], ["maybe"])
    with pytest.raises(ValueError, match="BertScorer.from_pretrained"):
        evaluate_task("AG", ["an answer"], ["the answer"])
    with pytest.raises(ValueError, match="JSON list"):
        evaluate_task("AVE", ["[]"], ["not json"])


def test_ag_with_a_plain_callable():
    def overlap(cands, refs):  # a stand-in scorer: Jaccard overlap of words
        return [len(set(c.split()) & set(r.split())) / max(1, len(set(c.split()) | set(r.split())))
                for c, r in zip(cands, refs)]

    result = evaluate_task("Answer_Generation", ["yes it does", "", None], ["yes it does", "no", "maybe"],
                           bertscorer=overlap)
    assert result["score"] == pytest.approx(1 / 3) and result["n_invalid"] == 2 and result["n_scored"] == 3
    assert result["bertscore_precision"] is None
