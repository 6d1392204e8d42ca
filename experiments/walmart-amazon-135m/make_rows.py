"""Walmart-Amazon product matching as rows of a custom task, and its task spec.

    python experiments/walmart-amazon-135m/make_rows.py SRC_DIR OUT_DIR [--train-negatives-per-match K]

SRC_DIR holds Ditto's serialization of the benchmark (train.txt, valid.txt, test.txt: one pair a line,
`LEFT<TAB>RIGHT<TAB>LABEL`, each side `COL title VAL ... COL category VAL ... COL brand VAL ... COL modelno VAL
... COL price VAL ...`; left Walmart, right Amazon). Writes

    OUT_DIR/rows.jsonl      every pair as a row of task "walmart_amazon": split train / val (from valid.txt) /
                            test, output "yes" (same product) or "no". With --train-negatives-per-match K the
                            train split keeps all 576 matches and K times as many non-matches, drawn at random
                            (seed 0) from its 5,568; val and test are always whole
    OUT_DIR/task_spec.json  {"walmart_amazon": {"metric": "f1", "labels": ["yes", "no"], "positive": "yes"}}

The prompt. One short instruction (the same for every pair; every token of it is paid on each of the 6,144
training pairs), then the two records with their fields side by
side, in the same order and with the same names, so that the model compares like with like:

    Walmart: <title> | brand: <brand> | model: <modelno> | price: <price>
    Amazon: <title> | brand: <brand> | model: <modelno> | price: <price>

Why: what tells a match from these hard negatives is mostly the model number (a rule on title overlap plus
model-number equality scores F1 0.85 on this split, title overlap alone 0.40), which sits in `modelno` on one
side and often only in the title on the other; putting each record on one line of named fields keeps every
value the comparison needs and little else. The category is left out: the two shops use different
taxonomies ("electronics - general" against "projection screens"), so it differs for matches as often as for
non-matches, and it costs tokens. An empty field is written "-". The answer is one word, "yes" or "no" (one
token each for SmolLM2's tokenizer).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TASK = "walmart_amazon"
INSTRUCTION = "Are these the same product? Answer yes or no."
FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
FIELDS = ("title", "category", "brand", "modelno", "price")
SPEC = {TASK: {"metric": "f1", "labels": ["yes", "no"], "positive": "yes"}}


def parse_record(text: str, where: str) -> dict[str, str]:
    """Ditto's `COL name VAL value ...` -> {name: value}; ValueError naming `where` when it is not that."""
    record = {}
    for part in text.split("COL ")[1:]:
        name, sep, value = part.partition(" VAL ")
        if not sep:
            raise ValueError(f"{where}: 'COL {name.strip()}' has no ' VAL '")
        record[name.strip()] = value.strip()
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)} field (expected COL title/category/brand/modelno/price)")
    return record


def describe(shop: str, record: dict[str, str]) -> str:
    value = lambda name: record[name] or "-"
    return f"{shop}: {value('title')} | brand: {value('brand')} | model: {value('modelno')} | price: {value('price')}"


def read_pairs(path: Path) -> list[tuple[dict, dict, int]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.split("\t")
        where = f"{path} line {number}"
        if len(cells) != 3 or cells[2].strip() not in ("0", "1"):
            raise ValueError(f"{where}: expected LEFT<TAB>RIGHT<TAB>0|1")
        pairs.append((parse_record(cells[0], where + " (left)"), parse_record(cells[1], where + " (right)"),
                      int(cells[2])))
    return pairs


def make_rows(src: Path, negatives_per_match: int | None = None) -> list[dict]:
    rows = []
    for split, name in FILES.items():
        pairs = read_pairs(src / name)
        if split == "train" and negatives_per_match is not None:
            negatives = [i for i, (_, _, label) in enumerate(pairs) if not label]
            n_keep = min(len(negatives), negatives_per_match * (len(pairs) - len(negatives)))
            dropped = set(negatives) - set(random.Random(0).sample(negatives, n_keep))
            pairs = [pair for i, pair in enumerate(pairs) if i not in dropped]
        for left, right, label in pairs:
            text = describe("Walmart", left) + "\n" + describe("Amazon", right)
            rows.append({"instruction": INSTRUCTION, "input": text, "output": "yes" if label else "no", "task": TASK,
                         "split": split})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder with train.txt, valid.txt and test.txt")
    p.add_argument("out", type=Path, help="folder to write rows.jsonl and task_spec.json into")
    p.add_argument("--train-negatives-per-match", type=int, default=None, metavar="K",
                   help="keep every train match and K times as many train non-matches, sampled with seed 0 "
                        "(default: every train pair)")
    args = p.parse_args(argv)
    if args.train_negatives_per_match is not None and args.train_negatives_per_match < 1:
        p.error("--train-negatives-per-match must be at least 1")
    try:
        rows = make_rows(args.src, args.train_negatives_per_match)
    except (OSError, ValueError) as e:
        print(f"make_rows.py: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "rows.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (args.out / "task_spec.json").write_text(json.dumps(SPEC, indent=2) + "\n", encoding="utf-8")
    for split in FILES:
        chosen = [r for r in rows if r["split"] == split]
        print(f"{split}: {len(chosen)} pairs, {sum(r['output'] == 'yes' for r in chosen)} matches")
    print(f"wrote {args.out / 'rows.jsonl'} and {args.out / 'task_spec.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
