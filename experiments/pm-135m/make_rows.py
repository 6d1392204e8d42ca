"""Write the rows of the Product Matching experiment: ECInstruct's real PM train/val splits and its PM test items.

    python experiments/pm-135m/make_rows.py --shared PATH/TO/ecinstruct --out WORKDIR [--multitask]

WORKDIR/rows.jsonl, PM only:
- train: the 2,022 IND_Diverse_Instruction rows of ECInstruct's PM train split (`pm_train_val.jsonl`), the paper's
  training setting;
- val: the 253 IND_Diverse_Instruction rows of its val split (validation loss, best adapter);
- test: every PM test item of `test_rows_dev.jsonl` (177 items) under IND_Diverse, IND_Single and IND_Unseen.

With --multitask, WORKDIR/rows.jsonl also holds the other tasks' rows of the earlier experiment's item split
(experiments/smollm2-135m-real/split.json: PRP, MPC, PSI and AVE; its PM rows are left out, since every PM test
item is evaluated here and PM trains on its real train split): their training and val rows, and their evaluation
rows as test rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from data.ecinstruct import read_rows  # noqa: E402

PM = "Product_Matching"
TRAIN_SETTING = "IND_Diverse_Instruction"
TEST_SETTINGS = ("IND_Diverse_Instruction", "IND_Single_Instruction", "IND_Unseen_Instruction")


def pm_rows(shared: Path) -> list[dict]:
    train_val = [r for r in read_rows(shared / "pm_train_val.jsonl") if r["setting"] == TRAIN_SETTING]
    test = [r for r in read_rows(shared / "test_rows_dev.jsonl") if r["task"] == PM and r["setting"] in TEST_SETTINGS]
    return train_val + test


def other_task_rows(shared: Path) -> list[dict]:
    """The earlier experiment's item split of PRP, MPC, PSI and AVE (train, val and evaluation rows)."""
    sys.path.insert(0, str(ROOT / "experiments" / "smollm2-135m-real"))
    from make_split import write_files

    split = json.loads((ROOT / "experiments" / "smollm2-135m-real" / "split.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        write_files(shared, split, Path(tmp))
        return [r for r in read_rows(Path(tmp) / "rows.jsonl") if r["task"] != PM]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    keys = ("output", "input", "options", "task", "setting", "split", "few_shot_example", "instruction")
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({k: row.get(k) for k in keys}) + "\n")


def counts(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        key = f"{r['task']}/{r['split']}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, required=True,
                        help="folder holding pm_train_val.jsonl, test_rows_dev.jsonl and ave_train_100.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="the folder rows.jsonl is written to")
    parser.add_argument("--multitask", action="store_true", help="add the other tasks' rows")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = pm_rows(args.shared) + (other_task_rows(args.shared) if args.multitask else [])
    write_jsonl(args.out / "rows.jsonl", rows)
    print(args.out / "rows.jsonl", json.dumps(counts(rows)))
