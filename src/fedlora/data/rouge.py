"""Rouge-L (longest common subsequence F-measure), written here so that no external rouge package is needed.

Tokenisation follows the default tokenizer of Google's ``rouge_score`` without stemming: lowercase, every character
other than ASCII ``a-z``/``0-9`` becomes a space, split on whitespace.  (As in ``rouge_score``, text without ASCII
letters or digits therefore has no tokens and scores 0.)

    >>> tokenize("The cat, THE hat!")
    ['the', 'cat', 'the', 'hat']
    >>> round(rouge_l("the cat sat", "the cat was sitting"), 4)  # LCS 2: P = 2/3, R = 2/4
    0.5714
"""
from __future__ import annotations

import re
from collections.abc import Sequence

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercase, non-alphanumeric (ASCII) characters -> spaces, split on whitespace."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b``: O(len(a)·len(b)) time, O(min(len)) memory."""
    if len(a) < len(b):
        a, b = b, a  # b is the shorter: one DP row of len(b) + 1
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
            else:
                cur[j] = cur[j - 1] if cur[j - 1] > prev[j] else prev[j]
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure (β = 1) between two texts; 0 when either side has no tokens (both empty included)."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean of :func:`rouge_l` over aligned pairs (NaN for no pairs)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return float("nan")
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)
