"""The multi-task run beside the PM-only run and the earlier experiment's three runs, block by block (markdown).

    python experiments/pm-135m/compare_runs.py [--multitask experiments/pm-135m/report-multitask/finetuned_metrics.json]

Columns: the multi-task run's strict and paper scores and invalid answers; the PM-only headline run's strict score
(PM blocks only: it trained and was tested on PM alone); the earlier experiment's runs 1, 2 and 3
(experiments/smollm2-135m-real: 1e-4 two epochs, 5e-4 one epoch, 5e-4 three epochs; 1,679 training rows with 125
of PM), whose test rows are the multi-task run's for every task but PM (PM there had 35 items, 105 rows, so its
scores are not on the same rows and are left out). Every score is read from the committed metrics files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model.config import read_json  # noqa: E402
from tasks import ABBREV  # noqa: E402

PM = "Product_Matching"
PM_ONLY = ROOT / "experiments/pm-135m/report/finetuned_metrics.json"
EARLIER = [ROOT / "experiments/smollm2-135m-real" / sub / "finetuned_metrics.json"
           for sub in (".", "lr5e-4-1epoch", "lr5e-4-3epoch")]


def score(run: dict, task: str, setting: str, mode: str = "strict") -> float | None:
    block = run["results"].get(task, {}).get(setting)
    return None if block is None else block[mode]["score"]


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def table(multitask: dict, pm_only: dict, earlier: list[dict]) -> str:
    lines = ["| task | setting | n | multi-task strict | multi-task paper | invalid | PM-only run | earlier run 1 / 2 / 3 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for task in sorted(multitask["results"], key=lambda t: (t != PM, t)):
        for setting, block in multitask["results"][task].items():
            strict = block["strict"]
            pm_only_score = score(pm_only, task, setting) if task == PM else None
            runs = "–" if task == PM else " / ".join(fmt(score(run, task, setting)) for run in earlier)
            lines.append(f"| {ABBREV[task]} | {setting.removesuffix('_Instruction')} | {strict['n']} "
                         f"| {fmt(strict['score'])} | {fmt(block['paper']['score'])} | {strict['n_invalid']}/{strict['n']} "
                         f"| {fmt(pm_only_score)} | {runs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multitask", type=Path, default=ROOT / "experiments/pm-135m/report-multitask/finetuned_metrics.json")
    args = parser.parse_args()
    print(table(read_json(args.multitask), read_json(PM_ONLY), [read_json(path) for path in EARLIER]))


if __name__ == "__main__":
    main()
