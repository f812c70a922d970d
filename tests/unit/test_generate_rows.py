"""Rows that come back from Ray Data: missing optional text stays missing."""

from __future__ import annotations

import math

from distillation_runtime.stages.generate import text_or_none


def test_missing_text_from_ray_data_is_none_not_nan() -> None:
    assert text_or_none(math.nan) is None  # a column of missing references, through pandas
    assert text_or_none(None) is None
    assert text_or_none("42") == "42"
