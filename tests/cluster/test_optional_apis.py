"""A cluster with KubeRay but without KServe or Kueue (serving and queueing are optional): a
Distillation that needs neither runs; one that needs a missing API says which, Stalled, and
resumes by itself once the API is installed.

These tests start a control plane of their own, without the KServe CRDs, so the session's plane
(which has them) is left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cluster import (
    KSERVE_CRDS,
    KUBERAY_CRDS,
    OUR_CRD,
    ControlPlane,
    install_kueue_stand_in,
    require_tools,
    start_control_plane,
)
from support.operator import Kube, OperatorProcess, distillation_manifest, wait_for

pytestmark = pytest.mark.cluster


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    """A Distillation on pvc:// storage (never read here: no stage finishes)."""
    return distillation_manifest(name, spec)


@pytest.fixture(scope="module")
def bare_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """KubeRay's CRDs and ours; no KServe, no Kueue."""
    require_tools()
    plane = start_control_plane(tmp_path_factory.mktemp("bare-plane"))
    try:
        plane.apply_server_side(KUBERAY_CRDS, OUR_CRD)
        plane.wait_established("rayjobs.ray.io", "distillations.distillation.dev")
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube(bare_plane: ControlPlane) -> Kube:
    from kubernetes import client

    api = bare_plane.api_client()
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name="ml"))
    )
    return Kube(api, "ml")


@pytest.fixture
def operator(bare_plane: ControlPlane, kube: Kube, tmp_path: Path) -> Iterator[OperatorProcess]:
    (tmp_path / "pvc").mkdir()
    process = OperatorProcess(bare_plane, kube.namespace, tmp_path, tmp_path / "pvc")
    process.start()
    yield process
    process.stop()


def stalled_reason(kube: Kube, name: str) -> tuple[str, str] | None:
    found = kube.condition(name, "Stalled")
    return (found["reason"], found["message"]) if found and found["status"] == "True" else None


def ready_reason(kube: Kube, name: str) -> str | None:
    found = kube.condition(name, "Ready")
    return str(found["reason"]) if found else None


def jobs_of(kube: Kube, name: str) -> list[str]:
    return [
        j["metadata"]["name"]
        for j in kube.rayjobs()
        if j["metadata"]["labels"].get("distillation.dev/name") == name
    ]


def test_serving_and_queueing_wait_for_their_apis_and_resume_once_installed(
    kube: Kube, operator: OperatorProcess, bare_plane: ControlPlane, tmp_path: Path
) -> None:
    kube.create_distillation(manifest("plain"))
    kube.create_distillation(manifest("served", serve={"gpus": 1}))
    kube.create_distillation(manifest("queued", placement={"queueName": "ml-team"}))

    # Without serve or a queue, the stages run: KServe is optional.
    wait_for("the plain Distillation's first RayJob", lambda: jobs_of(kube, "plain"))
    wait_for("plain to be running", lambda: ready_reason(kube, "plain") == "StageRunning")

    reason, message = wait_for("served to stall", lambda: stalled_reason(kube, "served"))
    assert reason == "MissingAPI"
    assert "serving.kserve.io/v1beta1" in message
    assert "install KServe" in message
    reason, message = wait_for("queued to stall", lambda: stalled_reason(kube, "queued"))
    assert reason == "MissingAPI"
    assert "kueue.x-k8s.io" in message
    assert "ml-team" in message
    assert jobs_of(kube, "served") == []  # nothing started that could never be served
    assert jobs_of(kube, "queued") == []
    events = [e.reason for e in kube.events("served")]
    assert events.count("MissingAPI") == 1  # said once, not at every look

    bare_plane.apply_server_side(KSERVE_CRDS)
    bare_plane.wait_established("inferenceservices.serving.kserve.io")
    install_kueue_stand_in(bare_plane, tmp_path)
    wait_for("served to resume", lambda: jobs_of(kube, "served"), timeout=90)
    wait_for("queued to resume", lambda: jobs_of(kube, "queued"), timeout=90)
    # The RayJob is created before the status patch that clears Stalled lands.
    wait_for("served's Stalled to clear", lambda: stalled_reason(kube, "served") is None)
    queued = next(j for j in kube.rayjobs() if j["metadata"]["name"] in jobs_of(kube, "queued"))
    assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-team"
