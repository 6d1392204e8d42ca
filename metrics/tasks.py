"""The ten ECInstruct tasks: names, spellings, abbreviations, and what each one is scored on.

Dependency-free on purpose: `data/` imports these names, so this file imports nothing heavy.

Spellings. The hub (`NingLab/ECInstruct`) spells the tasks as in `TASKS`. eCeLLM's own
`evaluate.py` still uses three older folder names (`Product_Relation_Predicition`,
`Product_Substitue_Identification`, `Query_Product_Ranking`); `canonical_task` accepts those,
the abbreviations (`AVE`, `PRP`, ...) and any letter case, and returns the hub spelling.
"""

from __future__ import annotations

# Hub spellings, in the paper's table order (product understanding, user understanding,
# query-product matching, product question answering).
TASKS: tuple[str, ...] = (
    "Attribute_Value_Extraction",
    "Product_Relation_Prediction",
    "Product_Matching",
    "Sentiment_Analysis",
    "Sequential_Recommendation",
    "Multiclass_Product_Classification",
    "Product_Substitute_Identification",
    "Query_Product_Rank",
    "Answerability_Prediction",
    "Answer_Generation",
)

# Hub spelling -> the paper's abbreviation.
ABBREV: dict[str, str] = {
    "Attribute_Value_Extraction": "AVE",
    "Product_Relation_Prediction": "PRP",
    "Product_Matching": "PM",
    "Sentiment_Analysis": "SA",
    "Sequential_Recommendation": "SR",
    "Multiclass_Product_Classification": "MPC",
    "Product_Substitute_Identification": "PSI",
    "Query_Product_Rank": "QPR",
    "Answerability_Prediction": "AP",
    "Answer_Generation": "AG",
}

# Other accepted spelling -> hub spelling: eCeLLM evaluate.py's misspellings and the abbreviations.
TASK_ALIASES: dict[str, str] = {
    "Product_Relation_Predicition": "Product_Relation_Prediction",
    "Product_Substitue_Identification": "Product_Substitute_Identification",
    "Query_Product_Ranking": "Query_Product_Rank",
    **{abbrev: task for task, abbrev in ABBREV.items()},
}

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

_BY_FOLDED_NAME: dict[str, str] = {
    **{name.lower(): name for name in TASKS},
    **{alias.lower(): name for alias, name in TASK_ALIASES.items()},
}


def canonical_task(name: str) -> str:
    """Hub spelling of a task given any accepted spelling (hub, eCeLLM's, abbreviation; any case).

    Raises ValueError listing the valid names when `name` is none of them.
    """
    found = _BY_FOLDED_NAME.get(str(name).strip().lower())
    if found is None:
        valid = ", ".join(f"{task} ({ABBREV[task]})" for task in TASKS)
        old = ", ".join(alias for alias in TASK_ALIASES if "_" in alias)
        raise ValueError(f"unknown task {name!r}; valid tasks: {valid}; also accepted: {old}")
    return found
