"""The operator on the real control plane: one RayJob per stage, exact status, events, children.

Where KubeRay would run the job (no pods run here), the tests play its part by writing the
RayJob status fields it writes; the real KubeRay operator judges every RayJob we build in
``test_kuberay.py``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distillation_operator.api import DistillationStatus
from support.cluster import ControlPlane, install_kueue_stand_in
from support.operator import (
    Kube,
    OperatorProcess,
    distillation_manifest,
    fail,
    local_path,
    running,
    succeed,
    wait_for,
)

EVAL_METRICS = {
    "gatePassed": True,
    "gateMetric": "tokenF1",
    "retention": 0.97,
    "student.tokenF1": 0.61,
    "teacher.tokenF1": 0.63,
}


def manifest(name: str, **spec_overrides: Any) -> dict[str, Any]:
    policy = {"policy": {"retries": 1, "backoffSeconds": 0}}
    return distillation_manifest(name, policy | spec_overrides)


@pytest.fixture
def kube(api: Any, namespace: str) -> Kube:
    return Kube(api, namespace)


@pytest.fixture
def pvc_root(tmp_path: Path) -> Path:
    root = tmp_path / "pvc"
    root.mkdir()
    return root


@pytest.fixture
def operator(
    plane: ControlPlane, namespace: str, tmp_path: Path, pvc_root: Path
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(plane, namespace, tmp_path, pvc_root)
    process.start()
    yield process
    process.stop()


def status(kube: Kube, name: str) -> dict[str, Any]:
    return kube.distillation(name).get("status") or {}


def stage(kube: Kube, name: str, stage_name: str) -> dict[str, Any]:
    return next(s for s in status(kube, name).get("stages", []) if s["name"] == stage_name)


def jobs_of(kube: Kube, stage_name: str) -> list[dict[str, Any]]:
    return [
        j for j in kube.rayjobs() if j["metadata"]["labels"]["distillation.dev/stage"] == stage_name
    ]


def wait_job(
    kube: Kube, stage_name: str, attempt: int = 1, timeout: float = 30.0
) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for job in jobs_of(kube, stage_name):
            if job["metadata"]["labels"]["distillation.dev/attempt"] == str(attempt):
                return job
        return None

    return wait_for(f"the {stage_name} RayJob (attempt {attempt})", find, timeout=timeout)


def wait_state(kube: Kube, name: str, stage_name: str, state: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        for record in status(kube, name).get("stages", []):
            if record["name"] == stage_name and record["state"] == state:
                return dict(record)
        return None

    return wait_for(f"stage {stage_name} to be {state}", probe)


def wait_condition(
    kube: Kube,
    name: str,
    type_: str,
    value: str,
    reason: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = kube.condition(name, type_)
        if found and found["status"] == value and (reason is None or found["reason"] == reason):
            return found
        return None

    return wait_for(f"condition {type_}={value} ({reason})", probe, timeout=timeout)


def event_reasons(kube: Kube, name: str) -> list[str]:
    return [e.reason for e in kube.events(name)]


def complete_stage(
    kube: Kube, pvc_root: Path, stage_name: str, metrics: dict[str, Any] | None = None
) -> str:
    job = wait_job(kube, stage_name)
    running(kube, job["metadata"]["name"])
    succeed(kube, pvc_root, job["metadata"]["name"], metrics or {"seconds": 1})
    return str(job["metadata"]["name"])


PREFLIGHT_PASSED = {"specProblems": [], "teacherLayers": 2, "studentLayers": 1}
"""The manifest metrics of a preflight that found nothing wrong."""


def create_checked(kube: Kube, pvc_root: Path, body: dict[str, Any]) -> None:
    """Create the Distillation and play its preflight passing (what most tests start from)."""
    kube.create_distillation(body)
    complete_stage(kube, pvc_root, "preflight", PREFLIGHT_PASSED)


# --------------------------------------------------------------------------------------------


def test_happy_path_every_stage_then_served(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "happy"
    kube.create_distillation(
        manifest(
            name,
            student={"prune": {"from": "teacher", "hiddenSize": 64}},
            quantize={"scheme": "W4A16"},
            serve={"gpus": 1, "replicas": 2},
        )
    )
    # the preflight first, alone, on the head; prune and generate wait for it
    preflight = wait_job(kube, "preflight")
    assert "workerGroupSpecs" not in preflight["spec"]["rayClusterSpec"]
    time.sleep(0.5)
    assert jobs_of(kube, "prune") == jobs_of(kube, "generate") == []
    complete_stage(kube, pvc_root, "preflight", PREFLIGHT_PASSED)
    wait_condition(kube, name, "SpecChecked", "True")
    # prune and generate have no inputs: both start at once
    wait_job(kube, "prune")
    generate = wait_job(kube, "generate")
    assert jobs_of(kube, "train") == []
    record = wait_state(kube, name, "generate", "Running")
    assert record["rayJob"] == generate["metadata"]["name"]
    assert record["attempts"] == 1
    ready_before = wait_condition(kube, name, "Ready", "False", "StageRunning")
    assert status(kube, name)["observedGeneration"] == 1
    assert status(kube, name)["progress"] == "1/7"

    complete_stage(kube, pvc_root, "prune", {"teacherParameters": 4000, "studentParameters": 1000})
    complete_stage(kube, pvc_root, "generate", {"records": 90})
    complete_stage(kube, pvc_root, "train", {"steps": 12, "finalLoss": 0.5})
    complete_stage(kube, pvc_root, "evaluate", EVAL_METRICS | {"retention": 0.99})
    complete_stage(kube, pvc_root, "quantize", {"scheme": "W4A16", "minComputeCapability": "8.0"})
    complete_stage(kube, pvc_root, "evaluate-quantized", EVAL_METRICS)

    # the gate passed: the InferenceService appears; we play KServe making it ready
    service = wait_for("the InferenceService", lambda: kube.inference_services())[0]
    predictor = service["spec"]["predictor"]
    assert predictor["minReplicas"] == 2
    container = predictor["containers"][0]
    assert container["image"] == "registry.test/vllm:test"
    storage = next(e["value"] for e in container["env"] if e["name"] == "STORAGE_URI")
    assert storage == stage(kube, name, "quantize")["artifact"] + "/model"
    assert "affinity" in predictor  # INT4 needs compute capability 8.0+
    wait_condition(kube, name, "Ready", "False", "Serving")
    # KServe's webhook defaults fields of the spec it stores; that is not a change to undo
    kube.custom.patch_namespaced_custom_object(
        "serving.kserve.io",
        "v1beta1",
        kube.namespace,
        "inferenceservices",
        service["metadata"]["name"],
        {"spec": {"predictor": {"timeout": 60}}},
    )
    kube.set_inference_service_ready(service["metadata"]["name"], "http://happy.test")

    ready = wait_condition(kube, name, "Ready", "True", "Served")
    final = status(kube, name)
    assert final["phase"] == "Succeeded"
    assert final["progress"] == "7/7"
    assert final["serving"] == {
        "inferenceService": "happy",
        "kind": "InferenceService",
        "url": "http://happy.test",
        "ready": True,
    }
    assert final["metrics"]["retention"] == "0.97"
    assert final["metrics"]["unquantized.retention"] == "0.99"
    assert final["metrics"]["gatePassed"] == "true"
    assert final["metrics"]["parameterRatio"] == "4"
    modelled = set(DistillationStatus.model_json_schema(by_alias=True)["properties"])
    assert set(final) <= modelled  # only the modelled fields in status ...
    meta = kube.distillation(name)["metadata"]
    assert not any(k.startswith("distillation.dev/") for k in meta.get("annotations") or {})
    assert not meta.get("finalizers")  # ... and no kopf bookkeeping on the object at all
    assert final["metrics"]["scheme"] == "W4A16"
    conditions = {c["type"]: c for c in final["conditions"]}
    for type_ in (
        "SpecChecked",
        "Pruned",
        "TeacherDataGenerated",
        "StudentTrained",
        "Evaluated",
        "Quantized",
        "QuantizedEvaluated",
        "Served",
    ):
        assert conditions[type_]["status"] == "True", conditions[type_]
    assert conditions["Reconciling"]["status"] == "False"
    assert conditions["Stalled"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in final["conditions"])
    assert ready["lastTransitionTime"] >= ready_before["lastTransitionTime"]
    assert {s["name"]: s["state"] for s in final["stages"]} == dict.fromkeys(
        ["preflight", "prune", "generate", "train", "evaluate", "quantize", "evaluate-quantized"],
        "Succeeded",
    )
    assert stage(kube, name, "train")["metrics"] == {"steps": "12", "finalLoss": "0.5"}
    assert len(kube.rayjobs()) == 7  # exactly one RayJob per stage
    reasons = event_reasons(kube, name)
    assert reasons.count("StageStarted") == 7
    assert reasons.count("StageSucceeded") == 7
    assert "Served" in reasons
    # the defaulted field was left alone: nothing was re-applied over it
    assert kube.inference_services()[0]["spec"]["predictor"]["timeout"] == 60
    # an edit of serve (no stage changes) updates the InferenceService in place
    kube.patch_spec(name, {"serve": {"gpus": 1, "replicas": 3}})
    wait_for(
        "the InferenceService updated",
        lambda: kube.inference_services()[0]["spec"]["predictor"]["minReplicas"] == 3,
    )
    assert len(kube.rayjobs()) == 7
    # until KServe reports the new generation Ready, the old revision's Ready does not count
    wait_condition(kube, name, "Ready", "False", "Serving")
    kube.set_inference_service_ready(service["metadata"]["name"], "http://happy.test")
    wait_condition(kube, name, "Ready", "True", "Served")
    text = operator.metrics()
    assert 'distillation_reconciles_total{outcome="ok"}' in text
    assert 'distillation_distillations{phase="Succeeded"} 1.0' in text


def test_served_with_llminferenceservice_when_asked(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    """serve.api LLMInferenceService: the operator (through its own RBAC and watches) makes
    one, follows KServe's readiness of it, and reports it served."""
    name = "llm"
    serve = {"api": "LLMInferenceService", "gpus": 2, "replicas": 2}
    create_checked(kube, pvc_root, manifest(name, serve=serve))
    complete_stage(kube, pvc_root, "generate", {"records": 9})
    complete_stage(kube, pvc_root, "train", {"steps": 3, "finalLoss": 0.5})
    complete_stage(kube, pvc_root, "evaluate", EVAL_METRICS)
    service = wait_for("the LLMInferenceService", lambda: kube.inference_services(llm=True))[0]
    assert kube.inference_services() == []  # one serving child, of the kind asked for
    assert service["spec"]["replicas"] == 2
    assert service["spec"]["parallelism"] == {"tensor": 2}
    assert service["spec"]["model"]["uri"] == stage(kube, name, "train")["artifact"] + "/model"
    wait_condition(kube, name, "Ready", "False", "Serving")
    kube.set_inference_service_ready(service["metadata"]["name"], "http://llm.test", llm=True)
    wait_condition(kube, name, "Ready", "True", "Served")
    assert status(kube, name)["serving"] == {
        "inferenceService": "llm",
        "kind": "LLMInferenceService",
        "url": "http://llm.test",
        "ready": True,
    }


def test_a_failed_attempt_is_retried_after_the_backoff(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "retry"
    create_checked(kube, pvc_root, manifest(name, policy={"retries": 2, "backoffSeconds": 3}))
    first = wait_job(kube, "generate")
    fail(kube, first["metadata"]["name"], "AppFailed", "CUDA out of memory")
    failed_at = time.monotonic()
    record = wait_state(kube, name, "generate", "Retrying")
    assert "AppFailed: CUDA out of memory" in record["message"]
    assert "attempt 2 of 3" in record["message"]
    second = wait_job(kube, "generate", attempt=2)
    assert (
        time.monotonic() - failed_at >= 2.0
    )  # backoffSeconds=3 from KubeRay's endTime (1 s resolution)
    assert second["metadata"]["name"] == "retry-generate-2"
    running(kube, second["metadata"]["name"])
    succeed(kube, pvc_root, second["metadata"]["name"], {"records": 5})
    record = wait_state(kube, name, "generate", "Succeeded")
    assert record["attempts"] == 2
    wait_job(kube, "train")
    assert "StageRetrying" in event_reasons(kube, name)


def test_failing_past_the_retry_limit_fails_with_kuberays_reason(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "doomed"
    create_checked(kube, pvc_root, manifest(name, policy={"retries": 0, "backoffSeconds": 0}))
    job = wait_job(kube, "generate")
    fail(
        kube,
        job["metadata"]["name"],
        "DeadlineExceeded",
        "The RayJob has passed the activeDeadlineSeconds",
    )
    stalled = wait_condition(kube, name, "Stalled", "True", "StageFailed")
    assert "DeadlineExceeded: The RayJob has passed the activeDeadlineSeconds" in stalled["message"]
    ready = kube.condition(name, "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "StageFailed"
    assert status(kube, name)["phase"] == "Failed"
    assert wait_state(kube, name, "generate", "Failed")["attempts"] == 1
    time.sleep(1.5)
    assert len(jobs_of(kube, "generate")) == 1  # never retried
    assert "StageFailed" in event_reasons(kube, name)


def test_validation_failed_counts_as_a_failure(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "invalid-job"
    create_checked(kube, pvc_root, manifest(name, policy={"retries": 0, "backoffSeconds": 0}))
    job = wait_job(kube, "generate")
    message = "The RayJob spec is invalid: RAY_REDIS_ADDRESS is set (implies GCS fault tolerance)"
    kube.set_rayjob_status(
        job["metadata"]["name"], {"jobDeploymentStatus": "ValidationFailed", "message": message}
    )
    stalled = wait_condition(kube, name, "Stalled", "True", "StageFailed")
    assert "ValidationFailed" in stalled["message"]
    assert "RAY_REDIS_ADDRESS" in stalled["message"]


def test_operator_killed_in_every_stage_runs_nothing_twice(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "restarts"
    kube.create_distillation(manifest(name))
    for stage_name in ("preflight", "generate", "train", "evaluate"):
        job = wait_job(kube, stage_name)
        wait_state(kube, name, stage_name, "Running")
        # (Events are written after status: wait for this one so that the count below is exact.)
        wait_for(
            f"the StageStarted event of {stage_name}",
            lambda s=stage_name: any(
                e.reason == "StageStarted" and e.message.startswith(f"{s}:")
                for e in kube.events(name)
            ),
        )
        operator.kill()
        running(kube, job["metadata"]["name"])
        operator.start()
        time.sleep(1.0)
        assert len(jobs_of(kube, stage_name)) == 1
        operator.kill()  # killed again, this time while KubeRay finishes the job
        succeed(
            kube,
            pvc_root,
            job["metadata"]["name"],
            {"evaluate": EVAL_METRICS, "preflight": PREFLIGHT_PASSED}.get(stage_name, {"x": 1}),
        )
        operator.start()
        wait_state(kube, name, stage_name, "Succeeded")
    wait_condition(kube, name, "Ready", "True", "Succeeded")
    assert sorted(j["metadata"]["name"] for j in kube.rayjobs()) == [
        "restarts-evaluate-1",
        "restarts-generate-1",
        "restarts-preflight-1",
        "restarts-train-1",
    ]
    started = [e for e in kube.events(name) if e.reason == "StageStarted"]
    assert len(started) == 4, [e.message for e in started]


def test_a_spec_edit_reruns_only_the_changed_stages(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "edited"
    create_checked(kube, pvc_root, manifest(name))
    complete_stage(kube, pvc_root, "generate", {"records": 10})
    train = wait_job(kube, "train")
    running(kube, train["metadata"]["name"])
    generate_before = wait_state(kube, name, "generate", "Succeeded")
    spec = copy.deepcopy(kube.distillation(name)["spec"])
    spec["train"]["learningRate"] = "3e-4"
    kube.patch_spec(name, {"train": spec["train"]})

    def replaced() -> list[dict[str, Any]] | None:
        jobs = jobs_of(kube, "train")
        names = [j["metadata"]["name"] for j in jobs]
        return jobs if train["metadata"]["name"] not in names and len(jobs) == 1 else None

    new_train = wait_for("the running train RayJob replaced", replaced)[0]
    assert (
        new_train["metadata"]["annotations"]["distillation.dev/fingerprint"]
        != train["metadata"]["annotations"]["distillation.dev/fingerprint"]
    )
    assert len(jobs_of(kube, "generate")) == 1
    assert len(jobs_of(kube, "preflight")) == 1  # a learning rate needs no new check
    after = wait_for(
        "status of generation 2", lambda: status(kube, name).get("observedGeneration") == 2
    )
    assert after
    assert stage(kube, name, "generate")["completionTime"] == generate_before["completionTime"]
    assert stage(kube, name, "generate")["state"] == "Succeeded"
    assert "StageReplaced" in event_reasons(kube, name)


def test_suspend_holds_the_running_stage_and_resume_continues_it(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "paused"
    create_checked(kube, pvc_root, manifest(name))
    job = wait_job(kube, "generate")
    running(kube, job["metadata"]["name"])
    kube.patch_spec(name, {"policy": {"suspend": True}})
    wait_for(
        "the RayJob suspended",
        lambda: kube.rayjob(job["metadata"]["name"])["spec"].get("suspend") is True,
    )
    kube.set_rayjob_status(
        job["metadata"]["name"], {"jobDeploymentStatus": "Suspended", "jobStatus": ""}
    )
    wait_condition(kube, name, "Ready", "False", "Suspended")
    assert status(kube, name)["phase"] == "Suspended"
    assert wait_state(kube, name, "generate", "Suspended")
    kube.patch_spec(name, {"policy": {"suspend": False}})
    wait_for(
        "the RayJob resumed",
        lambda: kube.rayjob(job["metadata"]["name"])["spec"].get("suspend") is False,
    )
    running(kube, job["metadata"]["name"])
    wait_state(kube, name, "generate", "Running")
    assert len(jobs_of(kube, "generate")) == 1  # the same RayJob continues: nothing re-runs
    succeed(kube, pvc_root, job["metadata"]["name"], {"records": 1})
    wait_job(kube, "train")


def test_a_kueue_queued_rayjob_shows_as_queued(
    kube: Kube, operator: OperatorProcess, plane: ControlPlane, tmp_path: Path, pvc_root: Path
) -> None:
    install_kueue_stand_in(plane, tmp_path)  # the operator checks that Kueue's API is served
    name = "queued"
    placement = {"queueName": "ml-team"}
    create_checked(kube, pvc_root, manifest(name, placement=placement))
    job = wait_job(kube, "generate")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-team"
    assert "suspend" not in job["spec"]  # Kueue owns it
    # Kueue's webhook suspends it; KubeRay reports Suspended until Kueue admits it
    kube.custom.patch_namespaced_custom_object(
        "ray.io",
        "v1",
        kube.namespace,
        "rayjobs",
        job["metadata"]["name"],
        {"spec": {"suspend": True}},
    )
    kube.set_rayjob_status(job["metadata"]["name"], {"jobDeploymentStatus": "Suspended"})
    wait_state(kube, name, "generate", "Queued")
    wait_condition(kube, name, "Ready", "False", "Queued")
    kube.custom.patch_namespaced_custom_object(
        "ray.io",
        "v1",
        kube.namespace,
        "rayjobs",
        job["metadata"]["name"],
        {"spec": {"suspend": False}},
    )
    running(kube, job["metadata"]["name"])
    wait_state(kube, name, "generate", "Running")
    assert kube.rayjob(job["metadata"]["name"])["spec"]["suspend"] is False


def test_an_impossible_spec_is_stalled_not_retried(kube: Kube, operator: OperatorProcess) -> None:
    name = "impossible"
    kube.create_distillation(
        manifest(
            name,
            placement={"clusterSelector": {"ray.io/cluster": "shared"}},
            quantize={"scheme": "FP8_DYNAMIC"},
        )
    )
    stalled = wait_condition(kube, name, "Stalled", "True", "InvalidSpec")
    assert "spec.quantize" in stalled["message"]
    assert "clusterSelector" in stalled["message"]
    assert status(kube, name)["phase"] == "Failed"
    time.sleep(1.0)
    assert kube.rayjobs() == []
    assert "InvalidSpec" in event_reasons(kube, name)


def test_deleting_collects_children_and_keeps_artifacts(
    kube: Kube, operator: OperatorProcess, pvc_root: Path
) -> None:
    name = "deleted"
    create_checked(kube, pvc_root, manifest(name))
    complete_stage(kube, pvc_root, "generate", {"records": 3})
    wait_job(kube, "train")
    artifact = local_path(pvc_root, stage(kube, name, "generate")["artifact"])
    kube.delete_distillation(name)
    wait_for("the RayJobs collected", lambda: kube.rayjobs() == [], timeout=90)
    assert (artifact / "_COMPLETE").exists()

    # and the operator's gauges no longer count them or it
    def counted() -> list[str]:
        prefixes = ("distillation_rayjobs{", "distillation_distillations{")
        return [line for line in operator.metrics().splitlines() if line.startswith(prefixes)]

    deadline = time.monotonic() + 30
    while counted() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counted() == []


# ------------------------------------------------------- a refused write is a status


def test_a_name_taken_by_a_foreign_rayjob_is_reported_not_adopted(
    kube: Kube, operator: OperatorProcess
) -> None:
    """409 on create is "already exists" only when the object is ours (ownerReference)."""
    name = "taken"
    foreign = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": f"{name}-preflight-1"},
        "spec": {"entrypoint": "python other.py", "clusterSelector": {"ray.io/cluster": "x"}},
    }
    kube.custom.create_namespaced_custom_object("ray.io", "v1", kube.namespace, "rayjobs", foreign)
    kube.create_distillation(manifest(name))
    ready = wait_condition(kube, name, "Ready", "False", "ChildWriteFailed")
    assert "does not own" in ready["message"]
    assert f"{name}-preflight-1" in ready["message"]
    stalled = wait_condition(kube, name, "Stalled", "True", "ChildWriteFailed")
    assert stalled["message"] == ready["message"]
    assert stage(kube, name, "preflight")["state"] == "Pending"
    assert "does not own" in stage(kube, name, "preflight")["message"]
    wait_for("a ChildWriteFailed event", lambda: "ChildWriteFailed" in event_reasons(kube, name))
    assert kube.rayjob(f"{name}-preflight-1")["spec"]["entrypoint"] == "python other.py"


def rayjob_refused(kube: Kube) -> bool:
    """Whether the API server refuses a RayJob now (a dry run: nothing is created)."""
    from kubernetes.client.exceptions import ApiException

    probe = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "quota-probe"},
        "spec": {"entrypoint": "true", "clusterSelector": {"ray.io/cluster": "x"}},
    }
    try:
        kube.custom.create_namespaced_custom_object(
            "ray.io", "v1", kube.namespace, "rayjobs", probe, dry_run="All"
        )
    except ApiException as err:
        return err.status in (403, 422)
    return False


def test_a_quota_refusal_reaches_status_and_clears_when_the_quota_does(
    kube: Kube, operator: OperatorProcess
) -> None:
    """The API server refuses the RayJob (403, a ResourceQuota): its message is in status;
    once the quota is gone the next try creates the RayJob."""
    from kubernetes import client

    core = client.CoreV1Api(kube.custom.api_client)
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-rayjobs"),
        spec=client.V1ResourceQuotaSpec(hard={"count/rayjobs.ray.io": "0"}),
    )
    core.create_namespaced_resource_quota(kube.namespace, quota)
    # What the quota controller (not part of this control plane) would write: admission
    # enforces a quota once its status says what is used.
    counted = {"count/rayjobs.ray.io": "0"}
    core.patch_namespaced_resource_quota_status(
        "no-rayjobs", kube.namespace, {"status": {"hard": counted, "used": counted}}
    )
    wait_for("the quota to be enforced", lambda: rayjob_refused(kube))
    name = "quota"
    kube.create_distillation(manifest(name))
    ready = wait_condition(kube, name, "Ready", "False", "ChildWriteFailed")
    assert "quota" in ready["message"]
    assert "(403)" in ready["message"]
    assert status(kube, name)["stages"][0]["state"] == "Pending"
    assert kube.rayjobs() == []
    core.delete_namespaced_resource_quota("no-rayjobs", kube.namespace)
    wait_for("the quota to be gone", lambda: not rayjob_refused(kube))
    wait_job(kube, "preflight", 1, timeout=75)  # the operator tries again every 30 s
    wait_condition(kube, name, "Ready", "False", "StageRunning", timeout=60)


def test_an_admission_policy_refusal_reaches_status_with_its_message(
    kube: Kube, operator: OperatorProcess
) -> None:
    """An admission check refuses the RayJob with 422 (a ValidatingAdmissionPolicy, the API
    server's own webhook-free admission, with reason Invalid): the policy's message is in the
    Distillation's status; once the policy is lifted the next try creates the RayJob."""
    from kubernetes import client

    admission = client.AdmissionregistrationV1Api(kube.custom.api_client)
    policy = f"rayjobs-need-a-team-{kube.namespace}"
    admission.create_validating_admission_policy(
        {
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["ray.io"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["rayjobs"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": "'team' in object.metadata.?labels.orValue({})",
                        "message": "RayJobs here need a team label for chargeback",
                        "reason": "Invalid",
                    }
                ],
            },
        }
    )
    selector = {"matchLabels": {"kubernetes.io/metadata.name": kube.namespace}}
    admission.create_validating_admission_policy_binding(
        {
            "metadata": {"name": policy},
            "spec": {
                "policyName": policy,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": selector},
            },
        }
    )
    try:
        wait_for("the policy to be enforced", lambda: rayjob_refused(kube), timeout=60)
        name = "admission"
        kube.create_distillation(manifest(name))
        ready = wait_condition(kube, name, "Ready", "False", "ChildWriteFailed")
        assert "need a team label for chargeback" in ready["message"]
        assert "(422)" in ready["message"]
        # kopf posts events after the status patch, on its own time
        wait_for(
            "the ChildWriteFailed event",
            lambda: "ChildWriteFailed" in event_reasons(kube, name),
            timeout=30,
        )
        assert kube.rayjobs() == []
    finally:
        admission.delete_validating_admission_policy_binding(policy)
        admission.delete_validating_admission_policy(policy)
    wait_for("the policy to be lifted", lambda: not rayjob_refused(kube), timeout=60)
    wait_job(kube, "preflight", 1, timeout=75)  # the operator tries again every 30 s
