"""Split the real ECInstruct rows by item (80% train, 20% evaluation) and write the two JSONL files.

The same item appears once per setting (IND_Single, IND_Diverse, IND_Unseen share the item at the
same index), so a split by row would leak evaluation items into training. Items are drawn per task
with a fixed seed; `split.json` records the chosen item indices so the run can be repeated exactly.

    python experiments/smollm2-135m-real/make_split.py --shared PATH/TO/ecinstruct --out WORKDIR

Training rows: IND_Diverse_Instruction rows of the training items (as the paper trains).
Evaluation rows: IND_Diverse, IND_Single and IND_Unseen rows of the evaluation items, and
OOD_Diverse rows of the evaluation share of the out-of-domain PRP items. All rows keep their
hub fields; evaluation rows are relabelled split=test, training rows split=train, and a val split
(10% of the training items' IND_Diverse rows, held out of training) is written for validation loss.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from outdir import read_jsonl  # noqa: E402

EVAL_SETTINGS = ("IND_Diverse_Instruction", "IND_Single_Instruction", "IND_Unseen_Instruction")


def item_key(row: dict, position: int) -> str:
    """AVE rows are distinct items (one setting each): key by input; the others by position in their block."""
    return row["input"] if row["task"] == "Attribute_Value_Extraction" else str(position)


def make_split(shared: Path, seed: int = 0, eval_fraction: float = 0.2) -> dict:
    rows = read_jsonl(shared / "test_rows_dev.jsonl") + read_jsonl(shared / "ave_train_100.jsonl")
    blocks = defaultdict(list)  # (task, domain) -> item keys in order of first appearance
    for block_rows in _blocks(rows).values():
        for position, row in enumerate(block_rows):
            domain = row["setting"].split("_")[0]
            key = item_key(row, position)
            if key not in blocks[(row["task"], domain)]:
                blocks[(row["task"], domain)].append(key)
    rng = random.Random(seed)
    split = {}
    for (task, domain), keys in sorted(blocks.items()):
        order = sorted(range(len(keys)), key=lambda _: rng.random())
        n_eval = round(len(keys) * eval_fraction)
        eval_items = sorted(order[:n_eval])
        split[f"{task}/{domain}"] = {"items": len(keys), "eval": eval_items}
    return split


def _blocks(rows: list[dict]) -> dict:
    blocks = defaultdict(list)
    for row in rows:
        blocks[(row["task"], row["setting"])].append(row)
    return blocks


def write_files(shared: Path, split: dict, out: Path, val_fraction: float = 0.1, seed: int = 0) -> dict:
    rows = read_jsonl(shared / "test_rows_dev.jsonl") + read_jsonl(shared / "ave_train_100.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    item_index = defaultdict(dict)  # (task, domain) -> key -> item number
    train, val, evaluation = [], [], []
    rng = random.Random(seed + 1)
    for (task, setting), block_rows in _blocks(rows).items():
        domain = setting.split("_")[0]
        entry = split[f"{task}/{domain}"]
        eval_items = set(entry["eval"])
        for position, row in enumerate(block_rows):
            key = item_key(row, position)
            number = item_index[(task, domain)].setdefault(key, len(item_index[(task, domain)]))
            if number in eval_items:
                if setting in EVAL_SETTINGS or setting == "OOD_Diverse_Instruction" or task == "Attribute_Value_Extraction":
                    evaluation.append({**row, "split": "test"})
            elif setting == "IND_Diverse_Instruction":
                (val if rng.random() < val_fraction else train).append({**row, "split": "train"})
    for row in val:
        row["split"] = "val"
    with open(out / "rows.jsonl", "w") as f:
        for row in train + val + evaluation:
            f.write(json.dumps(row) + "\n")
    return {"train": len(train), "val": len(val), "eval": len(evaluation)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, required=True, help="folder holding test_rows_dev.jsonl and ave_train_100.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="where rows.jsonl is written")
    parser.add_argument("--new-split", action="store_true", help="draw split.json again instead of reading it")
    args = parser.parse_args()
    split_file = HERE / "split.json"
    if args.new_split or not split_file.exists():
        split_file.write_text(json.dumps(make_split(args.shared), indent=1) + "\n")
    counts = write_files(args.shared, json.loads(split_file.read_text()), args.out)
    print(json.dumps(counts))
