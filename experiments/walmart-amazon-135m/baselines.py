"""The baselines printed beside the model on Walmart-Amazon: always "match", and string-similarity rules fit on train.

    python experiments/walmart-amazon-135m/baselines.py SRC_DIR [--out baselines.json]

Rules, each a threshold (and for the second a choice of how to combine) chosen on train.txt to maximize F1 of the
match class, then scored once on test.txt (and on valid.txt, for reference):
- title overlap: Jaccard similarity of the two titles' word sets, J = |A ∩ B| / |A ∪ B|; match when J >= t;
- title overlap or model number: match when J >= t, or when a model number (the `modelno` of a side, at least 4
  characters, lower-cased, without '-', '/', ' ' and '.') appears in the other side's title or modelno, written
  the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_rows import FILES, read_pairs  # noqa: E402


def words(text: str) -> set[str]:
    return set(text.lower().split())


def jaccard(a: str, b: str) -> float:
    """|A ∩ B| / |A ∪ B| of the word sets of a and b (0 for two empty texts)."""
    wa, wb = words(a), words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


def squash(text: str) -> str:
    return "".join(c for c in text.lower() if c not in "-/ .")


def model_number_found(left: dict, right: dict) -> bool:
    """A side's model number (>= 4 characters once squashed) inside the other side's title or model number."""
    for mine, other in ((left, right), (right, left)):
        number = squash(mine["modelno"])
        if len(number) >= 4 and number in squash(other["title"] + " " + other["modelno"]):
            return True
    return False


def f1(gold: list[int], pred: list[bool]) -> float:
    """F1 of the match class: 2 tp / (#predicted matches + #gold matches)."""
    tp = sum(g and p for g, p in zip(gold, pred))
    return 2 * tp / (sum(pred) + sum(gold)) if sum(pred) + sum(gold) else 0.0


def fit_threshold(scores: list[float], gold: list[int]) -> float:
    """The threshold t (one of the scores) whose rule score >= t has the best F1 on these pairs."""
    return max(sorted(set(scores)), key=lambda t: (f1(gold, [s >= t for s in scores]), -t))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder with train.txt, valid.txt and test.txt")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    splits = {split: read_pairs(args.src / name) for split, name in FILES.items()}
    gold = {split: [label for _, _, label in pairs] for split, pairs in splits.items()}
    overlap = {split: [jaccard(l["title"], r["title"]) for l, r, _ in pairs] for split, pairs in splits.items()}
    number = {split: [model_number_found(l, r) for l, r, _ in pairs] for split, pairs in splits.items()}
    t_overlap = fit_threshold(overlap["train"], gold["train"])
    # the second rule: J >= t or a model number found; t fit on train with the model-number half fixed
    t_either = max(sorted(set(overlap["train"])), key=lambda t: (f1(gold["train"], [
        j >= t or n for j, n in zip(overlap["train"], number["train"])]), -t))
    rules = {
        "always match": lambda split: [True] * len(gold[split]),
        f"title overlap >= {t_overlap:.3f}": lambda split: [j >= t_overlap for j in overlap[split]],
        f"title overlap >= {t_either:.3f} or model number found": lambda split: [
            j >= t_either or n for j, n in zip(overlap[split], number[split])],
    }
    results = {name: {split: round(f1(gold[split], rule(split)), 4) for split in FILES} for name, rule in rules.items()}
    print(f"{'rule (fit on train)':<52} {'train':>6} {'val':>6} {'test':>6}")
    for name, by_split in results.items():
        print(f"{name:<52} {by_split['train']:>6.3f} {by_split['val']:>6.3f} {by_split['test']:>6.3f}")
    if args.out:
        args.out.write_text(json.dumps({"metric": "F1 of the match class", "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
