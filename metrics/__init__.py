"""Metrics of the ten ECInstruct tasks, as eCeLLM's evaluate.py and the eCeLLM paper define them.

    from metrics import evaluate_task, parse_output
    evaluate_task("PRP", predictions, references, setting="IND_Diverse_Instruction")["score"]

The task names (TASKS, ABBREV, TASK_ALIASES, canonical_task) are the top-level tasks.py, shared with
data/ and re-exported here.

Modules (each pure Python; only metrics.bertscore imports torch, and only when imported):
    tasks           how each task is scored: its kind, option letters, primary metric
    parsing         raw output -> (parsed answer, valid), eCeLLM's rules
    classification  accuracy, binary P/R/F1 + specificity + NPV, macro P/R/F1
    ranking         HR@1, eCeLLM's NDCG (ESCI gains, 1e-6) and the textbook NDCG
    ave             F1* (paper eq. 1) and eCeLLM's triple matching for attribute value extraction
    scoring         evaluate_task: one (task, setting) block -> score + secondary metrics
    bertscore       F_BERT (BERTScore F1) by greedy matching, on the encoder in model/bert.py
"""

from .parsing import parse_output
from .scoring import evaluate_task
from tasks import ABBREV, TASK_ALIASES, TASKS, canonical_task

__all__ = ["ABBREV", "TASKS", "TASK_ALIASES", "canonical_task", "evaluate_task", "parse_output"]
