"""Quality metrics and the gate. Pure functions of strings and numbers.

Text metrics compare a prediction with a reference answer (the teacher's answer, or the dataset's
expected answer when there is one): exact match, token F1 (bag of whitespace tokens, as in
SQuAD) and ROUGE-L (F-measure of the longest common subsequence of tokens). Retention is the
student's score over the teacher's; for perplexity, where lower is better, it is the teacher's
over the student's.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def normalize(text: str) -> str:
    """Whitespace-insensitive form: answers differing only in spacing are equal."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of tokens). Two empty answers agree."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over whitespace tokens."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


TEXT_METRICS = {"exactMatch": exact_match, "tokenF1": token_f1, "rougeL": rouge_l}
LOWER_IS_BETTER = {"perplexity"}


def mean_score(metric: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus score of a text metric: the mean over pairs (0 for no pairs)."""
    score = TEXT_METRICS[metric]
    pairs = list(zip(predictions, references, strict=True))
    return sum(score(p, r) for p, r in pairs) / len(pairs) if pairs else 0.0


def retention(metric: str, student: float, teacher: float) -> float | None:
    """How much of the teacher's quality the student keeps; None when it is undefined."""
    if metric in LOWER_IS_BETTER:
        return teacher / student if student > 0 else None
    return student / teacher if teacher > 0 else None


@dataclass(frozen=True)
class GateResult:
    """The quality gate's verdict, with the numbers behind it."""

    passed: bool
    metric: str
    retention: float | None
    threshold: float
    message: str


def check_gate(metric: str, threshold: float, retentions: dict[str, float | None]) -> GateResult:
    """Pass when the gate metric's retention reaches the threshold."""
    value = retentions.get(metric)
    if value is None:
        return GateResult(
            False,
            metric,
            None,
            threshold,
            f"retention on {metric} could not be computed (no teacher score): the gate fails",
        )
    passed = value >= threshold
    verdict = "passes" if passed else "fails"
    return GateResult(
        passed,
        metric,
        value,
        threshold,
        f"{metric} retention {value:.4f} {'>=' if passed else '<'} {threshold:.4f}: the student "
        f"{verdict} the gate",
    )


def pattern_pass_rate(answers: Sequence[str], pattern: str) -> float:
    """Share of answers the regular expression matches whole (after trimming whitespace)."""
    compiled = re.compile(pattern)
    hits = sum(compiled.fullmatch(a.strip()) is not None for a in answers)
    return hits / len(answers) if answers else 0.0


def json_pass_rate(answers: Sequence[str]) -> float:
    """Share of answers that parse as JSON."""

    def parses(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    return sum(parses(a) for a in answers) / len(answers) if answers else 0.0


def token_agreement(ours: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Share of the reference answers' tokens that ``ours`` repeats at the same position: how
    closely a changed model (quantised, served by another engine) answers like the original.
    A shorter answer counts its missing positions as different."""
    if len(ours) != len(reference):
        raise ValueError(f"{len(ours)} answers to compare with {len(reference)} references")
    pairs = zip(ours, reference, strict=True)
    same = sum(sum(a == b for a, b in zip(x, y, strict=False)) for x, y in pairs)
    return same / max(1, sum(len(y) for y in reference))
