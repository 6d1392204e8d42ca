"""What each of the ten ECInstruct tasks is scored on: its kind, option letters and primary metric.

The task names themselves (TASKS, ABBREV, TASK_ALIASES, canonical_task) live in the top-level
tasks.py, shared with `data/`; they are re-exported here, so `from metrics.tasks import TASKS` works.
"""

from __future__ import annotations

from tasks import ABBREV, TASK_ALIASES, TASKS, canonical_task

__all__ = ["ABBREV", "OPTION_LETTERS", "PRIMARY_METRIC", "TASKS", "TASK_ALIASES", "TASK_KIND", "canonical_task"]

# How each task is scored (see metrics/scoring.py):
#   "extraction" AVE; "multiclass" PRP/SA/MPC; "binary" PM/PSI/AP;
#   "recommendation" SR; "ranking" QPR; "generation" AG.
TASK_KIND: dict[str, str] = {
    "Attribute_Value_Extraction": "extraction",
    "Product_Relation_Prediction": "multiclass",
    "Product_Matching": "binary",
    "Sentiment_Analysis": "multiclass",
    "Sequential_Recommendation": "recommendation",
    "Multiclass_Product_Classification": "multiclass",
    "Product_Substitute_Identification": "binary",
    "Query_Product_Rank": "ranking",
    "Answerability_Prediction": "binary",
    "Answer_Generation": "generation",
}

# The option letters each letter-answered task really offers (docs: PRP 3 options, MPC 4 ESCI
# classes, SA 5 star classes, SR 20 candidates, QPR at most 4 products). eCeLLM's script is
# looser for the multiclass tasks: it accepts any of A-E for all three (see metrics/parsing.py).
OPTION_LETTERS: dict[str, str] = {
    "Product_Relation_Prediction": "ABC",
    "Sentiment_Analysis": "ABCDE",
    "Multiclass_Product_Classification": "ABCD",
    "Sequential_Recommendation": "ABCDEFGHIJKLMNOPQRST",
    "Query_Product_Rank": "ABCD",
}

# The primary metric of each task in the paper's tables (the `score` of evaluate_task).
PRIMARY_METRIC: dict[str, str] = {
    "Attribute_Value_Extraction": "f1_star",
    "Product_Relation_Prediction": "macro_f1",
    "Product_Matching": "f1",
    "Sentiment_Analysis": "macro_f1",
    "Sequential_Recommendation": "hr@1",
    "Multiclass_Product_Classification": "accuracy",
    "Product_Substitute_Identification": "f1",
    "Query_Product_Rank": "ndcg",
    "Answerability_Prediction": "f1",
    "Answer_Generation": "f_bert",
}
