"""W4A16's group size follows the model's widths (no llm-compressor needed for the choice)."""

from __future__ import annotations

import pytest

from distillation_runtime.stages.quantize import int4_group_size


def test_real_widths_get_the_preset_group_of_128() -> None:
    assert int4_group_size({"q_proj": 4096, "down_proj": 14336}) == 128


def test_small_or_pruned_widths_get_the_largest_group_that_divides_them() -> None:
    assert int4_group_size({"q_proj": 96, "down_proj": 256}) == 32
    assert int4_group_size({"q_proj": 192, "down_proj": 320}) == 64


def test_widths_no_group_divides_are_refused_naming_the_layer() -> None:
    with pytest.raises(ValueError, match=r"spec.quantize.scheme W4A16.*'up_proj': 100"):
        int4_group_size({"q_proj": 128, "up_proj": 100})
