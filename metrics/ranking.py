"""Ranking metrics: HR@1 for Sequential_Recommendation and eCeLLM's NDCG for Query_Product_Rank.

QPR item i lists 2-4 products A, B, C, (D); `qpr_label.json` (eCeLLM's `data_label/label.json`)
holds their ESCI labels in option order, e.g. ["C", "S", "E"] for A, B, C. A prediction is the
option letters in ranked order, e.g. "C,B,A". eCeLLM's gains and normalisation are reproduced
exactly (they are what the published numbers use); `ndcg_full_ideal` is the textbook variant,
reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from .classification import accuracy

# eCeLLM's gain of each ESCI label: Exact, Substitute, Complement, Irrelevant.
ESCI_GAINS: dict[str, float] = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}


def hit_rate_at_1(gold_letters: Sequence[Hashable], predicted_letters: Sequence[Hashable]) -> float:
    """HR@1 = #{i : the one predicted item is the gold next item} / n (= accuracy on letters)."""
    return accuracy(gold_letters, predicted_letters)


def dcg(gains: Sequence[float]) -> float:
    """DCG = sum_i (2^gain_i - 1) / log2(i + 2), with i = 0 for the top-ranked item."""
    return sum((2.0**gain - 1.0) / math.log2(rank + 2) for rank, gain in enumerate(gains))


def option_gains(ranked_letters: Sequence[str], option_labels: Sequence[str]) -> tuple[list[float], int]:
    """Gains of the ranked letters that name an option of this item, and how many did not.

    Letter k of the alphabet ('A' = 0) names option k; its gain is ESCI_GAINS[option_labels[k]].
    A letter that names no option (lower case, beyond the item's options, punctuation, a space)
    is skipped and counted, as eCeLLM's `try/except: skipped += 1` does. Repeated letters are
    kept (eCeLLM keeps them too).
    """
    gains, n_unknown = [], 0
    for letter in ranked_letters:
        k = ord(letter) - ord("A") if isinstance(letter, str) and len(letter) == 1 else -1
        if 0 <= k < len(option_labels) and option_labels[k] in ESCI_GAINS:
            gains.append(ESCI_GAINS[option_labels[k]])
        else:
            n_unknown += 1
    return gains, n_unknown


def ndcg_ecellm(ranked_letters: Sequence[str], option_labels: Sequence[str]) -> float:
    """eCeLLM's NDCG of one ranking:  NDCG = DCG(g) / (DCG(sorted(g, descending)) + 1e-6).

    g = gains of the predicted letters in predicted order (unknown letters skipped, see
    `option_gains`). Note the ideal DCG is that of the *predicted* list re-sorted, not of all the
    item's options: a ranking that names only the best option scores 1 - O(1e-6), and one whose
    gains are all 0 (or that names no option) scores 0. The 1e-6 keeps an all-zero list defined;
    it also makes a perfect ranking score slightly below 1 (by about 1e-6 / DCG).
    The task score is the mean over *all* items, including those with no valid letter.
    """
    gains, _ = option_gains(ranked_letters, option_labels)
    return dcg(gains) / (dcg(sorted(gains, reverse=True)) + 1e-6)


def ndcg_full_ideal(ranked_letters: Sequence[str], option_labels: Sequence[str]) -> float:
    """Textbook NDCG of one ranking: DCG(g) / IDCG, with IDCG over *all* the item's options.

    g = gains of the predicted letters in order, each option counted at its first mention only
    (repeats and unknown letters skipped); IDCG = DCG of every option's gain sorted descending.
    0.0 when IDCG = 0. Unlike `ndcg_ecellm`, leaving out a relevant option costs score.
    """
    seen, kept = set(), []
    for letter in ranked_letters:
        if letter not in seen:
            seen.add(letter)
            kept.append(letter)
    gains, _ = option_gains(kept, option_labels)
    ideal = dcg(sorted((ESCI_GAINS.get(label, 0.0) for label in option_labels), reverse=True))
    return dcg(gains) / ideal if ideal else 0.0
