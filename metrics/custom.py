"""Scoring a task of your own: the metric its task spec names, on normalized answers.

    specs = parse_task_spec(json.load(open("task_spec.json")), "task_spec.json")
    score_custom(specs.get(task, DEFAULT_SPEC), predictions, references, mode="paper")

A task spec is a JSON object, one entry per task:

    {"NAME": {"metric": "accuracy" | "f1" | "macro_f1" | "exact_match" | "token_f1" | "f_bert",
              "labels": ["yes", "no"],     optional: an answer outside them is invalid
              "positive": "yes"}}          the positive label, for f1 (required there)

Answers are compared normalized: norm(text) = text stripped, case-folded, inner white space collapsed to
one space. With labels, an answer is valid when norm(answer) equals norm(label) of one label (the answer is
then that label); without labels every text answer is valid (a non-string, such as a JSON null in a
predictions file, never is). A task with no spec is scored by DEFAULT_SPEC: exact match after trimming and
case folding.

Metrics, over rows i = 1..n with answers a_i and gold g_i (both normalized):
    accuracy, exact_match   #(a_i == g_i) / n
    f1                      F1 of the positive label: 2 tp / (#(a_i = pos) + #(g_i = pos)) (binary_metrics)
    macro_f1                mean over classes c of 2 tp_c / (#(a_i = c) + #(g_i = c)); the classes are the
                            labels, or without labels every gold answer (macro_metrics)
    token_f1                mean over rows of SQuAD's token F1: common = |tokens(a_i) ∩ tokens(g_i)| (as
                            multisets, tokens = white-space words), P = common / |tokens(a_i)|,
                            R = common / |tokens(g_i)|, F1 = 2PR / (P + R); 1 when both are empty, 0 when one is
    f_bert                  mean BERTScore F1 of the answers (metrics/scoring.py's AG scorer, metrics/bertscore.py)
Modes, as for ECInstruct (metrics/scoring.py): "paper" leaves invalid answers out of the label metrics
(accuracy, exact_match, f1, macro_f1), "strict" counts them wrong. token_f1 and f_bert score every row
(an invalid answer as the empty text), so both modes agree there, and so they do for any task without labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .classification import accuracy, binary_metrics, macro_metrics
from .parsing import MODES
from .scoring import _score_ag

METRICS = ("accuracy", "f1", "macro_f1", "exact_match", "token_f1", "f_bert")
LABEL_METRICS = ("accuracy", "f1", "macro_f1", "exact_match")   # the metrics invalid answers are dropped from
_KEYS = ("metric", "labels", "positive")


@dataclass(frozen=True)
class TaskSpec:
    """How one custom task is scored (see the module docstring)."""
    metric: str = "exact_match"
    labels: tuple[str, ...] | None = None
    positive: str | None = None
    given: bool = True   # False: DEFAULT_SPEC, no spec named this task

    def describe(self) -> str:
        """'f1 (positive "yes"; labels yes, no)', for tables."""
        extras = ([f'positive "{self.positive}"'] if self.positive else []) + \
                 ([f"labels {', '.join(self.labels)}"] if self.labels else [])
        text = f"{self.metric} ({'; '.join(extras)})" if extras else self.metric
        return text if self.given else f"{text}, after trimming and case folding (no task spec)"


DEFAULT_SPEC = TaskSpec(given=False)


def norm(text: str) -> str:
    """norm(text) = stripped, case-folded, inner white space collapsed: how answers are compared."""
    return " ".join(text.split()).casefold()


def parse_task_spec(obj, where: str) -> dict[str, TaskSpec]:
    """{task: TaskSpec} of a task-spec JSON value; ValueError naming `where` and the task and field at fault."""
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{where}: a task spec is a JSON object with one entry per task, such as "
                         '{"my_task": {"metric": "f1", "labels": ["yes", "no"], "positive": "yes"}}')
    specs = {}
    for task, entry in obj.items():
        at = f"{where}: task {task!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{at}: expected an object with metric, labels, positive; got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise ValueError(f"{at}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(_KEYS)}")
        metric = entry.get("metric", "exact_match")
        if metric not in METRICS:
            raise ValueError(f"{at}: unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        labels = entry.get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not labels or not all(isinstance(l, str) and l.strip() for l in labels):
                raise ValueError(f"{at}: labels must be a non-empty list of non-empty strings")
            folded = [norm(l) for l in labels]
            if len(set(folded)) != len(folded):
                raise ValueError(f"{at}: labels {labels} name the same answer twice (compared trimmed and case-folded)")
            labels = tuple(labels)
        positive = entry.get("positive")
        if positive is not None and not (isinstance(positive, str) and positive.strip()):
            raise ValueError(f"{at}: positive must be a non-empty string")
        if metric == "f1" and positive is None:
            raise ValueError(f"{at}: metric f1 needs \"positive\", the label whose F1 is scored")
        if positive is not None and labels is not None and norm(positive) not in map(norm, labels):
            raise ValueError(f"{at}: positive {positive!r} is not one of the labels {list(labels)}")
        specs[str(task)] = TaskSpec(metric, labels, positive)
    return specs


def parse_custom(spec: TaskSpec, output) -> tuple[str | None, bool]:
    """(normalized answer or None, valid) of one raw output under `spec`."""
    if not isinstance(output, str):
        return None, False
    answer = norm(output)
    if spec.labels is not None and answer not in map(norm, spec.labels):
        return answer, False
    return answer, True


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1 of two normalized texts (see the module docstring)."""
    p, g = prediction.split(), gold.split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score_custom(spec: TaskSpec, predictions: Sequence, references: Sequence[str], *, mode: str = "paper",
                 bertscorer=None) -> dict:
    """Score raw outputs against gold outputs of one custom-task block; the same shape as evaluate_task:
    metric, score, the metric's companions, n, n_invalid, n_scored."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} gold outputs")
    parsed = [parse_custom(spec, p) for p in predictions]
    gold = [norm(r) for r in references]
    n_invalid = sum(not valid for _, valid in parsed)
    metric = spec.metric
    if metric in LABEL_METRICS:
        if mode == "paper":   # invalid answers left out, as eCeLLM does for its label tasks
            pairs = [(g, a) for g, (a, valid) in zip(gold, parsed) if valid]
        else:                 # an invalid answer matches no class
            pairs = [(g, a if valid else None) for g, (a, valid) in zip(gold, parsed)]
        y_true, y_pred = [g for g, _ in pairs], [a for _, a in pairs]
        if metric == "f1":
            pos = norm(spec.positive)
            to_binary = lambda x: None if x is None else x == pos   # True: positive, False: any other answer
            metrics = binary_metrics([g == pos for g in y_true], [to_binary(a) for a in y_pred],
                                     positive=True, negative=False)
        elif metric == "macro_f1":
            classes = sorted(set(map(norm, spec.labels)) if spec.labels else set(gold))
            metrics = macro_metrics(y_true, y_pred, labels=classes)
        else:
            metrics = {metric: accuracy(y_true, y_pred)}
        n_scored = len(pairs)
    elif metric == "token_f1":
        per_row = [token_f1(a if valid else "", g) for g, (a, valid) in zip(gold, parsed)]
        metrics, n_scored = {"token_f1": sum(per_row) / len(per_row) if per_row else 0.0}, len(per_row)
    else:   # f_bert: answer generation's scorer, every row (an invalid answer as the empty text)
        if bertscorer is None:
            raise ValueError("metric f_bert needs an F_BERT encoder (evaluate.py --bertscore-model)")
        texts = [p if isinstance(p, str) and valid else "" for p, (_, valid) in zip(predictions, parsed)]
        metrics = _score_ag(texts, references, bertscorer)
        n_scored = metrics.pop("n_scored")
    return {"metric": metric, "score": metrics[metric], "mode": mode, **metrics, "n": len(predictions),
            "n_invalid": n_invalid, "n_scored": n_scored}


def check_gold(spec: TaskSpec, outputs: Sequence[tuple[str, str]]) -> None:
    """ValueError naming the first (where, gold output) whose output is not one of the spec's labels."""
    if spec.labels is None:
        return
    allowed = set(map(norm, spec.labels))
    for where, output in outputs:
        if norm(output) not in allowed:
            raise ValueError(f"{where}: field 'output' is {output[:80]!r}, not one of the task spec's labels "
                             f"{list(spec.labels)} (compared trimmed and case-folded)")


def majority_answer(outputs: Sequence[str]) -> str:
    """The most frequent gold answer (normalized; ties: the first in sorted order): the majority baseline."""
    counts = Counter(norm(o) for o in outputs)
    return min(counts, key=lambda a: (-counts[a], a))
