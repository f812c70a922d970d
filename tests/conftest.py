"""Shared fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from support.cluster import ControlPlane, control_plane, require_tools
from support.corpus import SAMPLES, load_sample


@pytest.fixture(scope="session")
def samples() -> dict[str, dict[str, Any]]:
    return {p.stem: load_sample(p.stem) for p in sorted(SAMPLES.glob("*.yaml"))}


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real kube-apiserver for the session (cluster and image tests)."""
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
