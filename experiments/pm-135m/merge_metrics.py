"""One metrics.json from evaluations of the same model that scored different tasks of the same rows.

    python experiments/pm-135m/merge_metrics.py --rows WORKDIR/rows.jsonl --out OUT/metrics.json SOURCE.json ...

Each task's blocks come from the first SOURCE that scored the task. The sources must agree on what was
evaluated: model, adapter, split, and the generation's template, greedy decoding, cutoff, quantization and
compute dtype; and each task's token cap (its per-task cap, else the run's max_new_tokens) must be the same in
every source that scored it. Every (task, setting) block of the rows' test split must be present with as many
rows as the split holds, and blocks of tasks or settings the rows do not hold are dropped. Any mismatch stops
with one line that names the source and the field or block.

run.sh uses it for the multi-task run's zero-shot side, from the two committed zero-shot evaluations (PM from
this experiment, the other tasks from experiments/smollm2-135m-real), so nothing is generated twice:

    python experiments/pm-135m/merge_metrics.py --rows WORKDIR/rows.jsonl --out WORKDIR/zero-shot/metrics.json \\
        experiments/pm-135m/report/zero-shot_metrics.json experiments/smollm2-135m-real/zero-shot_metrics.json
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.ecinstruct import read_rows  # noqa: E402
from model.config import read_json  # noqa: E402
from outdir import write_json  # noqa: E402

SAME = ("model", "adapter", "split")
SAME_GENERATION = ("template", "greedy", "cutoff", "quant", "dtype")


def token_cap(run: dict, task: str) -> int:
    """The answer-token cap a run gave `task`: its per-task cap, else its max_new_tokens."""
    generation = run["generation"]
    return (generation.get("max_new_tokens_by_task") or {}).get(task, generation["max_new_tokens"])


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (so the merged file names no machine's folders)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def merge(runs: dict[str, dict], test: Counter) -> dict:
    """The merged metrics of `runs` ({name: metrics.json}, first wins per task) on the test blocks `test`.

    Raises ValueError with a one-line reason when the runs differ in what they evaluated or miss a block.
    """
    (first_name, first), *rest = runs.items()
    for name, run in rest:
        for key in SAME:
            if run.get(key) != first.get(key):
                raise ValueError(f"{name} differs from {first_name} in {key!r}: {run.get(key)!r} vs {first.get(key)!r}")
        for key in SAME_GENERATION:
            if run["generation"].get(key) != first["generation"].get(key):
                raise ValueError(f"{name} differs from {first_name} in generation {key!r}: "
                                 f"{run['generation'].get(key)!r} vs {first['generation'].get(key)!r}")

    results, taken_from = {}, {}
    for name, run in runs.items():
        for task, blocks in run["results"].items():
            if task not in results:
                results[task], taken_from[task] = blocks, name
    for task, source in taken_from.items():
        for name, run in runs.items():
            if task in run["results"] and token_cap(run, task) != token_cap(runs[source], task):
                raise ValueError(f"{name} capped {task} answers at {token_cap(run, task)} tokens, "
                                 f"{source} at {token_cap(runs[source], task)}")

    for (task, setting), n in sorted(test.items()):
        block = results.get(task, {}).get(setting)
        if block is None or block["strict"]["n"] != n:
            scored = None if block is None else block["strict"]["n"]
            raise ValueError(f"{task}/{setting} has {n} test rows, {taken_from.get(task, 'no source')} scored {scored}")
    tasks = sorted({task for task, _ in test})
    results = {task: {s: b for s, b in results[task].items() if (task, s) in test} for task in tasks}
    caps = {task: token_cap(runs[taken_from[task]], task) for task in tasks}

    merged = {key: first.get(key) for key in SAME}
    merged.update(label=first["label"], tasks=tasks,
                  generation={**{k: first["generation"][k] for k in SAME_GENERATION},
                              "max_new_tokens": max(caps.values()), "max_new_tokens_by_task": caps,
                              "seconds": round(sum(r["generation"].get("seconds", 0) for r in runs.values()), 2)},
                  merged_from={name: sorted(t for t, source in taken_from.items() if source == name and t in tasks)
                               for name in runs},
                  results=results)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True, help="the rows the sources evaluated (their test split)")
    parser.add_argument("--out", type=Path, required=True, help="the metrics.json to write")
    parser.add_argument("sources", type=Path, nargs="+", help="evaluate.py metrics.json files, first wins per task")
    args = parser.parse_args()
    runs = {shown(path): read_json(path) for path in args.sources}
    test = Counter((r["task"], r["setting"]) for r in read_rows(args.rows) if r["split"] == "test")
    try:
        merged = merge(runs, test)
    except ValueError as error:
        sys.exit(f"merge_metrics: {args.rows}: {error}")
    merged["dataset"] = str(args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, merged)
    print(f"wrote {args.out}: {sum(test.values())} test rows in {len(test)} blocks; "
          + "; ".join(f"{', '.join(tasks)} from {name}" for name, tasks in merged["merged_from"].items() if tasks))


if __name__ == "__main__":
    main()
