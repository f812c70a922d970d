"""Every RayJob the operator builds, judged by the real KubeRay operator (v1.6.2, built from its Go
module by ``make tools``): it must reach ``Initializing`` (never ``ValidationFailed``), and the
pods KubeRay makes from it must carry what the Distillation asked for. A RayJob KubeRay refuses
is followed through to the Distillation's Stalled condition with KubeRay's own message.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillation_operator.api import DistillationSpec
from distillation_operator.builders.common import Images
from distillation_operator.builders.rayjob import build_rayjob
from distillation_runtime.plan import make_plan
from support.cluster import (
    OLDEST_KUBERAY_CRDS,
    OUR_CRD,
    REPO,
    ControlPlane,
    require_tools,
    server_dry_run,
    start_control_plane,
)
from support.operator import Kube, OperatorProcess, start_kuberay, wait_for

IMAGES = Images("registry.test/runtime:1", "registry.test/quantize:1", "registry.test/vllm:1")
EVERYTHING = {
    "teacher": {"model": "hf://org/teacher", "tensorParallelSize": 2},
    "student": {"prune": {"from": "teacher", "hiddenSize": 64}},
    "dataset": {"prompts": "pvc://data/prompts.jsonl"},
    "quantize": {"scheme": "FP8_DYNAMIC"},
    "output": "s3://bucket/out",
    "placement": {
        "head": {"cpu": "1", "memory": "2Gi"},
        "workers": {"cpu": "2", "memory": "4Gi", "gpus": 2, "replicas": 2},
        "stages": {"quantize": {"gpus": 1, "replicas": 1, "image": "registry.test/q:2"}},
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "ml-batch",
        "serviceAccountName": "stage-runner",
        "env": [{"name": "AWS_REGION", "value": "eu-west-1"}],
    },
    "secrets": {
        "huggingFaceToken": {"name": "hub", "key": "token"},
        "objectStore": {"name": "s3-keys"},
    },
}


@pytest.fixture(scope="module")
def kuberay(
    plane: ControlPlane, api: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A namespace the real KubeRay operator watches (only it: other tests write RayJob status
    themselves), with the PriorityClass and ServiceAccount the pods name."""
    from kubernetes import client

    namespace = f"kuberay-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="stage-runner"))
    )
    scheduling = client.SchedulingV1Api(api)
    try:
        scheduling.create_priority_class(
            client.V1PriorityClass(metadata=client.V1ObjectMeta(name="ml-batch"), value=1000)
        )
    except client.ApiException as err:
        if err.status != 409:
            raise
    log = tmp_path_factory.mktemp("kuberay") / "kuberay.log"
    process = start_kuberay(plane, [namespace], log)
    try:
        yield namespace
    finally:
        process.terminate()
        process.wait(timeout=30)
        core.delete_namespace(namespace)


def samples() -> list[tuple[str, dict[str, Any]]]:
    found = [
        (path.stem, yaml.safe_load(path.read_text())["spec"])
        for path in sorted((REPO / "crds" / "samples").glob("*.yaml"))
    ]
    return [*found, ("everything", EVERYTHING)]


def created(kube: Kube, sample: str, spec: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """The Distillation of ``spec`` as the API server stored it (defaults applied), its model and
    its plan: what the operator builds RayJobs from."""
    owner = kube.create_distillation(
        {
            "apiVersion": "distillation.dev/v1alpha1",
            "kind": "Distillation",
            "metadata": {"name": f"{sample}-{uuid.uuid4().hex[:4]}"},
            "spec": spec,
        }
    )
    model = DistillationSpec.model_validate(owner["spec"])
    return owner, model, make_plan(model.pipeline())


@pytest.fixture(scope="module")
def oldest_kuberay_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A control plane of its own with the oldest supported KubeRay's CRDs (v1.5.0) and ours."""
    require_tools()
    plane = start_control_plane(tmp_path_factory.mktemp("kuberay-oldest"))
    try:
        plane.apply_server_side(OLDEST_KUBERAY_CRDS, OUR_CRD)
        plane.wait_established("rayjobs.ray.io", "distillations.distillation.dev")
        yield plane.api_client()
    finally:
        plane.stop()


@pytest.mark.parametrize(("sample", "spec"), samples(), ids=[s for s, _ in samples()])
def test_every_built_rayjob_is_valid_under_the_oldest_supported_kuberay(
    oldest_kuberay_api: Any, sample: str, spec: dict[str, Any]
) -> None:
    """KubeRay v1.5.0's schema (strict server-side dry run) takes every RayJob too: a cluster
    that has not upgraded to the tested v1.6.2 still runs every stage."""
    kube = Kube(oldest_kuberay_api, "default")
    owner, model, plan = created(kube, sample, spec)
    refused = {
        stage.name: errors
        for stage in plan.stages
        if (
            errors := server_dry_run(
                oldest_kuberay_api,
                build_rayjob(owner, model, plan, stage.name, 1, IMAGES),
                "default",
            )
        )
    }
    assert refused == {}


def pods_of(kube: Kube, rayjob: str) -> list[Any]:
    job = kube.rayjob(rayjob)
    cluster = (job.get("status") or {}).get("rayClusterName")
    if not cluster:
        return []
    found = kube.core.list_namespaced_pod(
        kube.namespace, label_selector=f"ray.io/cluster={cluster}"
    )
    return list(found.items)


def env_of(container: Any) -> dict[str, Any]:
    return {e.name: e for e in container.env or []}


@pytest.mark.parametrize(("sample", "spec"), samples(), ids=[s for s, _ in samples()])
def test_every_built_rayjob_initializes_under_kuberay(
    api: Any, kuberay: str, sample: str, spec: dict[str, Any]
) -> None:
    kube = Kube(api, kuberay)
    spec = dict(spec)
    spec["placement"] = {k: v for k, v in spec.get("placement", {}).items() if k != "queueName"}
    owner, model, plan = created(kube, sample, spec)
    names = []
    for stage in plan.stages:
        rayjob = build_rayjob(owner, model, plan, stage.name, 1, IMAGES)
        kube.custom.create_namespaced_custom_object("ray.io", "v1", kuberay, "rayjobs", rayjob)
        names.append((stage, rayjob))

    for stage, rayjob in names:
        name = rayjob["metadata"]["name"]

        def state(name: str = name) -> str | None:
            found = (kube.rayjob(name).get("status") or {}).get("jobDeploymentStatus")
            assert found != "ValidationFailed", kube.rayjob(name)["status"]
            return found if found == "Initializing" else None

        wait_for(f"{name} Initializing under KubeRay", state, timeout=60)
        requested = rayjob["spec"]["rayClusterSpec"]
        groups = requested.get("workerGroupSpecs", [])  # none: the preflight runs on the head
        workers = groups[0]["replicas"] if groups else 0
        pods = wait_for(
            f"pods of {name}",
            lambda n=name, w=workers: (p := pods_of(kube, n)) and len(p) == w + 1 and p,
            timeout=60,
        )
        head = next(p for p in pods if p.metadata.labels.get("ray.io/node-type") == "head")
        pairs = [(head, requested["headGroupSpec"])]
        if groups:
            worker = next(p for p in pods if p.metadata.labels.get("ray.io/node-type") == "worker")
            pairs.append((worker, groups[0]))
        for pod, group in pairs:
            want = group["template"]["spec"]
            container = pod.spec.containers[0]
            assert container.image == want["containers"][0]["image"]
            limits = {k: str(v) for k, v in (container.resources.limits or {}).items()}
            assert limits == {
                k: str(v) for k, v in want["containers"][0]["resources"]["limits"].items()
            }
            assert (pod.spec.node_selector or {}) == want.get("nodeSelector", {})
            assert pod.spec.priority_class_name == want.get("priorityClassName")
            if "serviceAccountName" in want:
                assert pod.spec.service_account_name == want["serviceAccountName"]
            tolerations = {(t.key, t.operator, t.effect) for t in pod.spec.tolerations or []}
            for t in want.get("tolerations", []):
                assert (t.get("key"), t["operator"], t.get("effect")) in tolerations
            env = env_of(container)
            for var in want["containers"][0]["env"]:
                if "valueFrom" in var:
                    ref = env[var["name"]].value_from.secret_key_ref
                    assert (ref.name, ref.key) == (
                        var["valueFrom"]["secretKeyRef"]["name"],
                        var["valueFrom"]["secretKeyRef"]["key"],
                    )
                    assert env[var["name"]].value is None  # never inline
        if sample == "everything" and stage.name == "preflight":
            assert workers == 0  # a config check holds no GPU worker
            assert "nvidia.com/gpu" not in (head.spec.containers[0].resources.limits or {})
        elif sample == "everything":
            gpus = worker.spec.containers[0].resources.limits["nvidia.com/gpu"]
            assert str(gpus) == ("1" if stage.name == "quantize" else "2")
            assert (
                env_of(head.spec.containers[0])["HF_TOKEN"].value_from.secret_key_ref.name == "hub"
            )


def test_a_rayjob_kuberay_refuses_stalls_the_distillation_with_its_message(
    plane: ControlPlane, api: Any, kuberay: str, tmp_path: Path
) -> None:
    kube = Kube(api, kuberay)
    operator = OperatorProcess(plane, kuberay, tmp_path, tmp_path)
    operator.start()
    try:
        good, bad = f"good-{uuid.uuid4().hex[:4]}", f"bad-{uuid.uuid4().hex[:4]}"
        base = {
            "teacher": {"model": "pvc://models/teacher"},
            "student": {"model": "pvc://models/student"},
            "dataset": {"prompts": "pvc://data/prompts.jsonl"},
            "policy": {"retries": 0},
        }
        for name, env in (
            (good, []),
            (bad, [{"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"}]),
        ):
            kube.create_distillation(
                {
                    "apiVersion": "distillation.dev/v1alpha1",
                    "kind": "Distillation",
                    "metadata": {"name": name},
                    "spec": base | {"output": f"pvc://artifacts/{name}", "placement": {"env": env}},
                }
            )

        def stalled() -> dict[str, Any] | None:
            found = kube.condition(bad, "Stalled")
            return found if found and found["status"] == "True" else None

        condition = wait_for("the refused Distillation stalled", stalled, timeout=90)
        assert condition["reason"] == "StageFailed"
        assert "ValidationFailed" in condition["message"]
        assert "RAY_REDIS_ADDRESS" in condition["message"]  # KubeRay's words, carried through
        assert kube.distillation(bad)["status"]["phase"] == "Failed"

        def initializing() -> str | None:
            stages = (kube.distillation(good).get("status") or {}).get("stages", [])
            message = next((s.get("message", "") for s in stages if s["name"] == "preflight"), "")
            return message if "Initializing" in message else None

        wait_for("the accepted Distillation's RayJob Initializing", initializing, timeout=90)
        assert kube.condition(good, "Stalled")["status"] == "False"
    finally:
        operator.stop()
