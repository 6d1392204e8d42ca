"""AUC of p(yes) at the first answer token on the first N val rows, for one adapter (a checkpoint's or best/).

    python experiments/pm-135m/val_auc.py --work runs/pm-135m --adapter runs/pm/probe1/checkpoints/step-000024/adapter --n 64

The quick read of a training run's checkpoints behind results.md's probe table; decision.py does the same on the
test rows, with the gain over the label prior. Scored on the NF4 base with the adapter merged, as evaluate.py does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent / "smollm2-135m-real"))

from data.ecinstruct import read_rows  # noqa: E402
from decision import auc, class_probabilities  # noqa: E402  (experiments/smollm2-135m-real)
from lora.base import load_base  # noqa: E402
from model.gguf import packaged_smollm2  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="run.sh's WORKDIR (its rows.jsonl is read)")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--n", type=int, default=64, help="the first N val rows (default 64)")
    args = parser.parse_args()
    rows = [r for r in read_rows(args.work / "rows.jsonl")
            if r["split"] == "val" and r["setting"] == "IND_Diverse_Instruction"][:args.n]
    model, tok, _ = load_base(str(packaged_smollm2()), adapter=args.adapter, merge=True)   # quant, dtype: base.json
    p_yes = class_probabilities(model, tok, rows, [tok.encode("yes")[0], tok.encode("no")[0]], 2048)[:, 0]
    gold = np.array([r["output"] == "yes" for r in rows])
    print(f"{args.adapter}: {len(rows)} val rows, AUC {auc(p_yes, gold):.3f}, accuracy at p = 0.5 "
          f"{np.mean((p_yes > 0.5) == gold):.3f}, mean p(yes) {p_yes.mean():.3f}")
