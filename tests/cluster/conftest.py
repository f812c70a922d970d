"""Cluster tests: a real kube-apiserver for the session, a fresh namespace per test.

Set DISTILL_TEST_KUBECONFIG to reuse a control plane you started yourself
(``testcluster up --dir /tmp/tc``) for fast local loops.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cluster import ControlPlane, control_plane, require_tools


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    require_tools()
    with control_plane(tmp_path_factory.mktemp("controlplane")) as running:
        yield running


@pytest.fixture(scope="session")
def api(plane: ControlPlane) -> Any:
    return plane.api_client()


@pytest.fixture
def namespace(plane: ControlPlane, api: Any) -> Iterator[str]:
    """A namespace of the test's own, deleted afterwards (without waiting)."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)
