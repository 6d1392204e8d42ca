"""Task names: the ten ECInstruct tasks (spellings, abbreviations) and custom tasks (what a task is, not how
it is scored).

Dependency-free and top level on purpose: `data/` (which imports torch) and `metrics/` (which must
not) both name tasks, and neither imports the other; metrics/tasks.py adds how each task is scored.

Spellings. The hub (`NingLab/ECInstruct`) spells the tasks as in `TASKS`. eCeLLM's own
`evaluate.py` still uses three older folder names (`Product_Relation_Predicition`,
`Product_Substitue_Identification`, `Query_Product_Ranking`); `canonical_task` accepts those,
the abbreviations (`AVE`, `PRP`, ...) and any letter case, and returns the hub spelling.

Custom tasks. Any other name is a task of the user's own (`task_name` keeps it as written, stripped):
ECInstruct names keep the paper's prompts and scoring rules, a custom task is scored by the metric its
task spec names (metrics/custom.py).
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

_BY_FOLDED_NAME: dict[str, str] = {
    **{name.lower(): name for name in TASKS},
    **{alias.lower(): name for alias, name in TASK_ALIASES.items()},
}


def is_ecinstruct(name: str) -> bool:
    """True when `name` is one of the ten ECInstruct tasks in any accepted spelling."""
    return str(name).strip().lower() in _BY_FOLDED_NAME


def task_name(name: str) -> str:
    """The name a task goes by: an ECInstruct task's hub spelling (any accepted spelling in), or a custom
    task's own name, stripped. A custom name is any text without commas, '=' or line breaks (they separate
    names in --tasks and --max-new-tokens); ValueError otherwise."""
    text = str(name).strip()
    if is_ecinstruct(text):
        return canonical_task(text)
    if not text or any(c in text for c in ",=\n\r\t"):
        raise ValueError(f"task name {name!r} is not usable: give a non-empty name without commas, '=', tabs or "
                         "line breaks")
    return text


def abbrev(task: str) -> str:
    """The short name of a task for tables: the paper's abbreviation (AVE, PM, ...) or a custom task's name."""
    return ABBREV.get(task, task)


def task_order(task: str) -> tuple:
    """Sort key: the ten ECInstruct tasks in the paper's order, then custom tasks by name."""
    return (0, TASKS.index(task), "") if task in ABBREV else (1, 0, task)


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
