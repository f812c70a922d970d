"""Test tiers that run only when asked for by their marker (``-m images``, ``-m e2e_node``):
they need what ``make test`` builds first, so a plain ``pytest`` leaves them out and says so."""

from __future__ import annotations

from pathlib import Path

import pytest


def deselect_unless_asked(
    config: pytest.Config, items: list[pytest.Item], folder: Path, marker: str
) -> int:
    """Mark the tests under ``folder`` with ``marker``; unless ``-m`` names it, deselect them.
    Returns how many were deselected (for the summary line)."""
    ours = [item for item in items if folder in Path(str(item.fspath)).parents]
    for item in ours:
        item.add_marker(getattr(pytest.mark, marker))
    if not ours or marker in (config.getoption("markexpr") or ""):
        return 0
    config.hook.pytest_deselected(items=ours)
    items[:] = [item for item in items if item not in ours]
    return len(ours)
