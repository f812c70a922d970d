"""Shared fixtures."""

from __future__ import annotations

from typing import Any

import pytest

from support.corpus import SAMPLES, load_sample


@pytest.fixture(scope="session")
def samples() -> dict[str, dict[str, Any]]:
    return {p.stem: load_sample(p.stem) for p in sorted(SAMPLES.glob("*.yaml"))}
