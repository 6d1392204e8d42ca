"""Tables of the SmolLM2-135M experiment from the files run.sh wrote: zero-shot against fine-tuned,
both metric modes, invalid counts, constant-answer baselines and the study's SmolLM2-360M-EC row.

    python experiments/smollm2-135m-real/report.py --work runs/smollm2-135m-real --out experiments/smollm2-135m-real

Writes to --out: tables.md, loss_curve.png, train_log.jsonl, val_log.jsonl, train_config.json,
zero-shot_metrics.json, finetuned_metrics.json (copies of the run's files, so the numbers stay with the report).

Majority-class baseline of a task: the gold answer most frequent among the *training* rows of that task,
given as the prediction for every evaluation row (AVE: every target attribute answered "None").
For the yes/no tasks (PM, PSI) the always-"yes" answer is shown too: F1 of "yes" makes it the stronger one.
QPR (its score needs each row's ESCI labels) and AG (F_BERT needs an encoder) get no majority score: "–".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.ecinstruct import read_rows  # noqa: E402
from metrics import evaluate_task  # noqa: E402
from metrics.paper_tables import IND_TASKS, OOD_TASKS, PAPER_IND, PAPER_OOD  # noqa: E402
from tasks import ABBREV, TASKS  # noqa: E402

SETTINGS = ("IND_Diverse_Instruction", "IND_Single_Instruction", "IND_Unseen_Instruction", "OOD_Diverse_Instruction")
AVE = "Attribute_Value_Extraction"
NO_CONSTANT = ("Query_Product_Rank", "Answer_Generation")   # scored with inputs a constant answer lacks


def null_attributes(row: dict) -> str:
    """AVE's trivial answer: every target attribute absent (the gold format of an absent attribute)."""
    targets = json.loads(row["input"])["target attributes"]
    names = [t.strip().lower() for t in targets.replace(" and ", ", ").split(",") if t.strip()]
    return json.dumps([{"attribute": n, "value": "None", "source": "None"} for n in names])


def constant_scores(rows: list[dict]) -> tuple[dict, dict, dict]:
    """Scores of answers that ignore the row: ({(task, setting): majority score}, {task: the majority
    answer} (train rows decide it), {(task, setting): always-"yes" score} for the yes/no tasks).

    PM and PSI are scored by F1 of "yes", where always answering "no" scores 0 and always answering
    "yes" scores 2p / (1 + p) with p the share of "yes": the stronger constant answer there.
    """
    answers = {}
    for task in TASKS:
        outputs = [r["output"] for r in rows if r["task"] == task and r["split"] == "train"]
        if outputs and task != AVE:
            answers[task] = Counter(outputs).most_common(1)[0][0]
    majority, always_yes = {}, {}
    for task in TASKS:
        for setting in SETTINGS:
            block = [r for r in rows if r["task"] == task and r["setting"] == setting and r["split"] == "test"]
            if not block or task in NO_CONSTANT:
                continue
            gold = [r["output"] for r in block]
            predictions = [null_attributes(r) if task == AVE else answers[task] for r in block]
            majority[task, setting] = evaluate_task(task, predictions, gold, setting=setting)["score"]
            if set(gold) <= {"yes", "no"}:
                always_yes[task, setting] = evaluate_task(task, ["yes"] * len(block), gold, setting=setting)["score"]
    answers[AVE] = '"None" for every target attribute'
    return majority, answers, always_yes


def published(task: str, setting: str) -> str:
    table, tasks = (PAPER_OOD, OOD_TASKS) if setting.startswith("OOD") else (PAPER_IND, IND_TASKS)
    if setting not in ("IND_Diverse_Instruction", "OOD_Diverse_Instruction") or ABBREV[task] not in tasks:
        return ""
    score = dict((name, s) for name, _, s in table)["SmolLM2-360M-EC"][tasks.index(ABBREV[task])]
    return "–" if score is None else f"{score:.3f}"


def cell(block: dict, mode: str) -> str:
    return f"{block[mode]['score']:.3f}"


def score_or_dash(scores: dict, key: tuple[str, str], width: int = 0) -> str:
    return f"{scores[key]:>{width}.3f}" if key in scores else f"{'–':>{width}}"


def render(zero: dict, tuned: dict, majority: dict, answers: dict, always_yes: dict) -> str:
    lines = ["| task | setting | metric | majority | always yes | zero-shot paper | zero-shot strict | zero-shot invalid | "
             "fine-tuned paper | fine-tuned strict | fine-tuned invalid | SmolLM2-360M-EC (study) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task in TASKS:
        for setting in SETTINGS:
            if setting not in tuned.get(task, {}):
                continue
            z, t = zero[task][setting], tuned[task][setting]
            lines.append(f"| {ABBREV[task]} | {setting.replace('_Instruction', '')} | {t['paper']['metric']} | "
                         f"{score_or_dash(majority, (task, setting))} | {score_or_dash(always_yes, (task, setting))} | {cell(z, 'paper')} | {cell(z, 'strict')} | "
                         f"{z['paper']['n_invalid']}/{z['paper']['n']} | {cell(t, 'paper')} | {cell(t, 'strict')} | "
                         f"{t['paper']['n_invalid']}/{t['paper']['n']} | {published(task, setting)} |")
    lines += ["", "Majority answers (most frequent gold answer among the training rows):", ""]
    lines += [f"- {ABBREV[task]}: {answers[task][:90]}" for task in TASKS if task in answers]
    return "\n".join(lines) + "\n"


def summary(zero: dict, tuned: dict, majority: dict) -> str:
    """The same comparison for a terminal: strict scores, invalid answers in brackets."""
    lines = [f"{'task':<5} {'setting':<14} {'metric':<9} {'majority':>8} {'zero-shot (invalid)':>20} "
             f"{'fine-tuned (invalid)':>21}"]
    for task in TASKS:
        for setting in SETTINGS:
            if setting not in tuned.get(task, {}):
                continue
            z, t = zero[task][setting]["strict"], tuned[task][setting]["strict"]
            lines.append(f"{ABBREV[task]:<5} {setting.replace('_Instruction', ''):<14} {t['metric']:<9} "
                         f"{score_or_dash(majority, (task, setting), 8)} {z['score']:>10.3f} ({z['n_invalid']:>3}/{z['n']:<3}) "
                         f"{t['score']:>11.3f} ({t['n_invalid']:>3}/{t['n']:<3})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="run.sh's WORKDIR")
    parser.add_argument("--out", type=Path, required=True, help="the experiment's report folder")
    parser.add_argument("--rows", type=Path, help="the rows the runs used (default: WORK/rows.jsonl)")
    parser.add_argument("--print", action="store_true", help="also print the comparison (summary.txt)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zero = json.loads((args.work / "zero-shot" / "metrics.json").read_text())
    tuned = json.loads((args.work / "finetuned" / "metrics.json").read_text())
    majority, answers, always_yes = constant_scores(read_rows(args.rows or args.work / "rows.jsonl"))
    (args.out / "tables.md").write_text(render(zero["results"], tuned["results"], majority, answers, always_yes))
    (args.out / "summary.txt").write_text(summary(zero["results"], tuned["results"], majority))
    copies = {"train/loss_curve.png": "loss_curve.png", "train/train_log.jsonl": "train_log.jsonl",
              "train/val_log.jsonl": "val_log.jsonl", "train/config.json": "train_config.json",
              "zero-shot/metrics.json": "zero-shot_metrics.json", "finetuned/metrics.json": "finetuned_metrics.json"}
    for source, target in copies.items():
        if target.endswith(".png"):
            shutil.copyfile(args.work / source, args.out / target)
        else:   # paths inside the checkout relative to it, the home folder as ~: the report names no machine's folders
            text = (args.work / source).read_text().replace(str(ROOT) + "/", "")
            (args.out / target).write_text(text.replace(str(Path.home()) + "/", "~/"))
    if args.print:
        print((args.out / "summary.txt").read_text(), end="")
    print(f"wrote {args.out / 'tables.md'}, summary.txt and copies of the run's logs and metrics")


if __name__ == "__main__":
    main()
