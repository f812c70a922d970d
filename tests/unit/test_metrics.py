"""Metrics on known inputs, retention, and the gate."""

from __future__ import annotations

import pytest

from distillation_runtime.metrics import (
    check_gate,
    exact_match,
    lcs_length,
    mean_score,
    retention,
    rouge_l,
    token_agreement,
    token_f1,
)


def test_exact_match_ignores_spacing_only() -> None:
    assert exact_match(" 95 ", "95") == 1.0
    assert exact_match("the  cat", "the cat") == 1.0
    assert exact_match("95", "59") == 0.0


def test_token_f1_known_values() -> None:
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat", "the cat sat on") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "cat") == 0.0


def test_rouge_l_uses_order() -> None:
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d"]) == 3
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)  # same bag, one in order
    assert token_f1("d c b a", "a b c d") == 1.0


def test_mean_score_over_pairs() -> None:
    assert mean_score("exactMatch", ["1", "2", "3", "4"], ["1", "2", "0", "0"]) == 0.5
    assert mean_score("tokenF1", [], []) == 0.0


def test_retention_direction() -> None:
    assert retention("tokenF1", 0.9, 1.0) == pytest.approx(0.9)
    assert retention("perplexity", 4.0, 2.0) == pytest.approx(0.5)  # lower is better
    assert retention("tokenF1", 0.5, 0.0) is None


def test_gate_passes_and_fails_with_its_reason() -> None:
    passed = check_gate("tokenF1", 0.95, {"tokenF1": 0.97})
    assert passed.passed
    assert "0.9700 >= 0.9500" in passed.message
    failed = check_gate("tokenF1", 0.95, {"tokenF1": 0.90, "rougeL": 0.99})
    assert not failed.passed
    assert "fails" in failed.message
    unknown = check_gate("perplexity", 0.9, {"perplexity": None})
    assert not unknown.passed
    assert unknown.retention is None


def test_task_checks() -> None:
    from distillation_runtime.metrics import json_pass_rate, pattern_pass_rate

    assert pattern_pass_rate(["95", " 12 ", "1a"], r"[0-9]+") == pytest.approx(2 / 3)
    assert json_pass_rate(['{"a": 1}', "[1, 2]", "{a: 1}", ""]) == 0.5
    assert pattern_pass_rate([], ".*") == 0.0


def test_token_agreement_counts_positions_of_the_reference() -> None:
    reference = [[5, 6, 7, 8], [1, 2]]
    assert token_agreement(reference, reference) == 1.0
    assert token_agreement([[5, 6, 0, 8], [1, 2]], reference) == pytest.approx(5 / 6)
    assert token_agreement([[6, 7, 8, 9], [2, 1]], reference) == 0.0  # shifted by one: no match
    assert token_agreement([[5, 6], [1, 2, 3]], reference) == pytest.approx(4 / 6)  # cut short
    with pytest.raises(ValueError, match="1 answers to compare with 2 references"):
        token_agreement([[5]], reference)
