"""The multi-task run's zero-shot scores, from the two zero-shot evaluations already committed, without generating again.

    python experiments/pm-135m/merge_zero_shot.py --rows WORKDIR/rows.jsonl --out WORKDIR/zero-shot/metrics.json

The multi-task rows (make_rows.py --multitask) are the PM test items of this experiment plus the earlier experiment's
evaluation rows of PRP, MPC, PSI and AVE, and the zero-shot model (SmolLM2-135M-Instruct, dense, greedy, the same
token caps) was evaluated on both already: experiments/pm-135m/report/zero-shot_metrics.json (PM) and
experiments/smollm2-135m-real/zero-shot_metrics.json (the other tasks). This takes each task's blocks from the run
that evaluated it, after checking that both ran the same model, quantization, template and caps and that every
block holds as many rows as the multi-task rows' test split; it stops with one line naming the block otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.ecinstruct import read_rows  # noqa: E402
from outdir import write_json  # noqa: E402

PM = "Product_Matching"
SOURCES = {"pm": ROOT / "experiments/pm-135m/report/zero-shot_metrics.json",
           "other": ROOT / "experiments/smollm2-135m-real/zero-shot_metrics.json"}
SAME = ("model", "adapter", "split")
SAME_GENERATION = ("template", "greedy", "cutoff", "quant", "dtype")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True, help="the multi-task rows.jsonl (make_rows.py --multitask)")
    parser.add_argument("--out", type=Path, required=True, help="the metrics.json to write")
    args = parser.parse_args()
    runs = {name: json.loads(path.read_text()) for name, path in SOURCES.items()}
    pm, other = runs["pm"], runs["other"]
    for key in SAME:
        if pm.get(key) != other.get(key):
            sys.exit(f"merge_zero_shot: the two zero-shot runs differ in {key!r}: {pm.get(key)!r} vs {other.get(key)!r}")
    for key in SAME_GENERATION:
        if pm["generation"].get(key) != other["generation"].get(key):
            sys.exit(f"merge_zero_shot: the two zero-shot runs differ in generation {key!r}")
    caps = {PM: pm["generation"]["max_new_tokens"]}
    if other["generation"]["max_new_tokens_by_task"].get(PM) != caps[PM]:
        sys.exit("merge_zero_shot: the two zero-shot runs capped PM answers differently")

    test = Counter((r["task"], r["setting"]) for r in read_rows(args.rows) if r["split"] == "test")
    results = {task: blocks for task, blocks in other["results"].items() if task != PM}
    results[PM] = pm["results"][PM]
    for (task, setting), n in sorted(test.items()):
        block = results.get(task, {}).get(setting)
        if block is None or block["strict"]["n"] != n:
            sys.exit(f"merge_zero_shot: {args.rows}: {task}/{setting} has {n} test rows, the zero-shot run scored "
                     f"{None if block is None else block['strict']['n']}")
    results = {task: {s: b for s, b in blocks.items() if (task, s) in test} for task, blocks in results.items()}

    merged = {key: other[key] for key in ("model", "adapter", "split")}
    merged.update(label=other["label"], dataset=str(args.rows), tasks=sorted(results),
                  generation={**{k: other["generation"][k] for k in SAME_GENERATION},
                              "max_new_tokens": other["generation"]["max_new_tokens"],
                              "max_new_tokens_by_task": other["generation"]["max_new_tokens_by_task"]},
                  merged_from={name: str(path.relative_to(ROOT)) for name, path in SOURCES.items()},
                  results=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, merged)
    print(f"wrote {args.out}: {sum(test.values())} test rows in {len(test)} blocks, PM from {SOURCES['pm'].name} "
          f"of experiments/pm-135m/report, the other tasks from experiments/smollm2-135m-real")


if __name__ == "__main__":
    main()
