"""What a fine-tuned adapter learnt beyond each task's label prior, read from the first answer token.

On PRP, PM, MPC and PSI the answer's first token decides it (a letter, or yes/no). For each evaluation
row, one forward pass over the prompt gives the next-token distribution where the answer starts;
restricted to the task's class tokens and renormalised it is p(c | prompt). Per (task, setting):

    gain = mean over rows of [log p(gold | prompt) - log prior(gold)]     nats per row
           prior(c) = frequency of class c among the task's training rows
    AUC  = P(s(random positive row) > s(random negative row)), ties counting 1/2
           s = p(positive | prompt); positive = "yes" (PM, PSI), the majority letter against the rest (PRP, MPC)
    argmax share = fraction of rows whose most likely class is the majority class (greedy decoding's choice)
    se0  = sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)), the AUC's standard error when scores carry no signal

gain <= 0 and AUC near 0.5: the adapter learnt the prior and nothing of the row. AUC above 0.5 while
argmax is always the majority: the model orders rows correctly but never enough to flip its answer.

    python experiments/smollm2-135m-real/decision.py --work runs/smollm2-135m-real --adapter runs/smollm2-135m-real/train/best \
        --out experiments/smollm2-135m-real/decision.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data.ecinstruct import read_rows  # noqa: E402
from data.encode import encode_prompt  # noqa: E402
from lora.base import load_base  # noqa: E402
from model.gguf import packaged_smollm2  # noqa: E402
from report import SETTINGS  # noqa: E402  (report.py, beside this file)
from tasks import ABBREV  # noqa: E402

POSITIVE = {"Product_Matching": "yes", "Product_Substitute_Identification": "yes"}   # else: the majority class


def class_of(output: str) -> str:
    """The deciding part of a gold answer: "yes"/"no", or the letter before ":" (MPC) or alone (PRP)."""
    return output.split(":")[0].strip()


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties 1/2; nan if one side is empty."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def auc_se_no_signal(n_pos: int, n_neg: int) -> float:
    """Standard error of the AUC of scores unrelated to the labels (Mann-Whitney U under the null)."""
    return math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg)) if n_pos and n_neg else float("nan")


def class_tokens(tokenizer, rows: list[dict]) -> dict[str, dict[str, int]]:
    """{task: {class: first token id of its answers}}; refuses a task whose classes share a first token."""
    tokens = defaultdict(dict)
    for row in rows:
        first = tokenizer.encode(row["output"])[0]
        seen = tokens[row["task"]].setdefault(class_of(row["output"]), first)
        if seen != first:
            raise ValueError(f"{row['task']}: class {class_of(row['output'])!r} starts with tokens {seen} and {first}")
    for task, by_class in tokens.items():
        if len(set(by_class.values())) != len(by_class):
            raise ValueError(f"{task}: two classes share a first answer token: {by_class}")
    return dict(tokens)


@torch.inference_mode()
def class_probabilities(model, tokenizer, rows: list[dict], token_ids: list[int], context: int,
                        batch_size: int = 16) -> np.ndarray:
    """p(c | prompt) for each row, over the classes whose first tokens are `token_ids`, renormalised.

    Prompts are right-padded: under the causal mask a row's last prompt token never sees the padding
    after it, so each row's next-token logits are those of the row alone.
    """
    prompts = [encode_prompt(row, tokenizer, max_len=context - 1)[0] for row in rows]
    probs = np.zeros((len(rows), len(token_ids)))
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chosen)
        ids = torch.tensor([prompts[i] + [0] * (width - len(prompts[i])) for i in chosen])   # (B, T)
        last = torch.tensor([len(prompts[i]) - 1 for i in chosen])
        hidden = model(ids, return_hidden=True)[torch.arange(len(chosen)), last]           # (B, hidden)
        logits = model.lm_head(hidden)[:, token_ids].float()                              # (B, n_classes)
        probs[chosen] = torch.softmax(logits, dim=-1).numpy()
    return probs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="run.sh's WORKDIR (its rows.jsonl is read)")
    parser.add_argument("--adapter", type=Path, required=True, help="the adapter folder (e.g. WORKDIR/train/best)")
    parser.add_argument("--label", default=None, help="the run's name in the output (default: the adapter's path)")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--model", help="the base (default: the packaged SmolLM2-135M-Instruct GGUF, what run.sh "
                                        "trains on; the quantization and dtype come from the adapter's base.json)")
    args = parser.parse_args(argv)

    rows = read_rows(args.work / "rows.jsonl")
    rows = [r for r in rows if class_of(r["output"]) in ("yes", "no", "A", "B", "C", "D")]   # AVE excluded
    # The model run.sh's evaluate.py scores: the NF4 base the adapter was trained on, adapter merged.
    model, tokenizer, _ = load_base(args.model or str(packaged_smollm2()), adapter=str(args.adapter), merge=True)
    context = min(2048, model.config.max_position_embeddings)   # evaluate.py's default --cutoff
    tokens = class_tokens(tokenizer, rows)

    priors = {}
    for task in tokens:
        counts = Counter(class_of(r["output"]) for r in rows if r["task"] == task and r["split"] == "train")
        if missing := [c for c in tokens[task] if not counts[c]]:
            raise ValueError(f"{task}: class {missing} has no training row, so it has no prior")
        priors[task] = {c: counts[c] / sum(counts.values()) for c in tokens[task]}

    start = time.time()
    adapter = args.adapter.resolve()
    label = args.label or str(adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter)
    lines = [f"Adapter: {label}", "",
             "| task | setting | n | gain (nats/row) | AUC (positive) | se0 | argmax = majority | classes (prior) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for task in tokens:
        classes = sorted(tokens[task])
        majority = max(classes, key=lambda c: priors[task][c])
        positive = POSITIVE.get(task, majority)
        for setting in SETTINGS:
            block = [r for r in rows if r["task"] == task and r["setting"] == setting and r["split"] == "test"]
            if not block:
                continue
            probs = class_probabilities(model, tokenizer, block, [tokens[task][c] for c in classes], context)
            gold = np.array([classes.index(class_of(r["output"])) for r in block])
            prior = np.array([priors[task][c] for c in classes])
            gain = float(np.mean(np.log(probs[np.arange(len(block)), gold]) - np.log(prior[gold])))
            k = classes.index(positive)
            area = auc(probs[:, k], gold == k)
            se0 = auc_se_no_signal(int((gold == k).sum()), int((gold != k).sum()))
            share = float(np.mean(probs.argmax(1) == classes.index(majority)))
            spelled = ", ".join(f"{c} {priors[task][c]:.2f}" for c in classes)
            lines.append(f"| {ABBREV[task]} | {setting.replace('_Instruction', '')} | {len(block)} | {gain:+.3f} | "
                         f"{area:.3f} ({positive}) | {se0:.3f} | {share:.2f} | {spelled} |")
            print(lines[-1], flush=True)
    lines += ["", f"{sum(1 for r in rows if r['split'] == 'test')} rows in {time.time() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
