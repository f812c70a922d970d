"""Cluster tests: a real kube-apiserver for the session, a fresh namespace per test.

Set DISTILL_TEST_KUBECONFIG to reuse a control plane you started yourself
(``testcluster up --dir /tmp/tc``) for fast local loops.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)
