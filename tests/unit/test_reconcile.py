"""The pure core of the operator: RayJob builder and reconcile decisions, tested as data."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from distillation_operator.api import DeadlineClock, DistillationSpec
from distillation_operator.builders.common import Images
from distillation_operator.builders.rayjob import (
    MAX_RAYJOB_NAME,
    SPEC_ENV,
    build_rayjob,
    rayjob_name,
)
from distillation_operator.observed import Artifact, Observed
from distillation_operator.reconcile import (
    artifacts_to_probe,
    reconcile,
    retry_delay,
    seconds_left,
    understand,
)
from distillation_runtime.cli import main as distill
from distillation_runtime.plan import make_plan
from distillation_runtime.spec import load_pipeline_spec
from support.cluster import REPO
from support.statuses import preflight_passed

IMAGES = Images("reg/runtime:1", "reg/quantize:1", "reg/vllm:1")
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def body(
    name: str = "demo", status: dict[str, Any] | None = None, *, fresh: bool = False, **spec: Any
) -> dict[str, Any]:
    """A Distillation; with no status given, one whose preflight passed (``fresh``: none)."""
    base: dict[str, Any] = {
        "teacher": {"model": "hf://org/teacher"},
        "student": {"model": "hf://org/student"},
        "dataset": {"prompts": "s3://b/prompts.jsonl"},
        "output": "s3://b/out",
        "policy": {"retries": 1, "backoffSeconds": 60},
    }
    base.update(spec)
    if status is None:
        status = {} if fresh else preflight_passed(base)
    return {
        "apiVersion": "distillation.dev/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": name, "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": base,
        "status": status,
    }


def job_status(rayjob: dict[str, Any], **status: Any) -> dict[str, Any]:
    return rayjob | {"status": status}


def step(obj: dict[str, Any], jobs: list[dict[str, Any]], now: datetime = NOW, **kw: Any) -> Any:
    actions = reconcile(Observed(obj, jobs, now=now, **kw), IMAGES)
    obj["status"] = actions.status
    return actions


def probe(obj: dict[str, Any], jobs: list[dict[str, Any]]) -> list[str]:
    return artifacts_to_probe(understand(obj, jobs), NOW)


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


# -------------------------------------------------------------------------------- builder


@pytest.mark.parametrize("name", ["demo", "7up", "a.b.c", "x" * 200])
def test_rayjob_names_are_dns_1035_labels_kuberay_accepts(name: str) -> None:
    built = rayjob_name(name, "evaluate-quantized", 12)
    assert len(built) <= MAX_RAYJOB_NAME
    assert DNS_1035.match(built), built
    assert built == rayjob_name(name, "evaluate-quantized", 12)
    assert built != rayjob_name(name, "evaluate-quantized", 13)


def test_the_rayjob_carries_the_exact_pipeline_spec_distill_run_reads() -> None:
    obj = body(train={"workers": 3, "learningRate": "2e-5"})
    spec = DistillationSpec.model_validate(obj["spec"])
    plan = make_plan(spec.pipeline())
    rayjob = build_rayjob(obj, spec, plan, "train", 1, IMAGES)
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]
    assert load_pipeline_spec(env[SPEC_ENV]) == spec.pipeline()
    assert rayjob["spec"]["entrypoint"] == (
        f"distill stage train --config-env {SPEC_ENV} --artifact train={plan.artifact('train')} "
        f"--artifact preflight={plan.artifact('preflight')} "
        f"--artifact generate={plan.artifact('generate')}"
    )
    meta = rayjob["metadata"]
    assert meta["annotations"]["distillation.dev/fingerprint"] == plan["train"].fingerprint
    assert meta["ownerReferences"][0]["uid"] == "u-1"
    assert meta["ownerReferences"][0]["controller"] is True
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 3  # one pod per Ray Train worker by default
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["backoffLimit"] == 0  # retries are the operator's new attempts


def test_the_ray_cluster_names_the_images_ray_version_so_kuberay_probes_over_http() -> None:
    """KubeRay gives Ray pods exec probes (wget in the container) unless rayVersion is 2.53 or
    later; with the version named they are HTTP checks of the dashboard agent."""
    obj = body()
    spec = DistillationSpec.model_validate(obj["spec"])
    rayjob = build_rayjob(obj, spec, make_plan(spec.pipeline()), "generate", 1, IMAGES)
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    locked = next(p["version"] for p in lock["package"] if p["name"] == "ray")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == locked
    assert tuple(int(part) for part in locked.split(".")[:2]) >= (2, 53)


def test_secrets_reach_pods_only_as_secret_key_refs() -> None:
    obj = body(secrets={"huggingFaceToken": {"name": "hub"}, "objectStore": {"name": "s3"}})
    spec = DistillationSpec.model_validate(obj["spec"])
    rayjob = build_rayjob(obj, spec, make_plan(spec.pipeline()), "generate", 1, IMAGES)
    for group in [
        rayjob["spec"]["rayClusterSpec"]["headGroupSpec"],
        *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"],
    ]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        for var in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[var]
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] in {"hub", "s3"}


def test_existing_cluster_kueue_deadline_and_quantize_image() -> None:
    obj = body(
        placement={"clusterSelector": {"ray.io/cluster": "shared"}},
        policy={"stageDeadlineSeconds": 3600},
    )
    spec = DistillationSpec.model_validate(obj["spec"])
    rayjob = build_rayjob(obj, spec, make_plan(spec.pipeline()), "generate", 1, IMAGES)
    assert rayjob["spec"]["clusterSelector"] == {"ray.io/cluster": "shared"}
    assert "rayClusterSpec" not in rayjob["spec"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is False  # never tear down theirs
    assert "ttlSecondsAfterFinished" not in rayjob["spec"]
    assert rayjob["spec"]["activeDeadlineSeconds"] == 3600

    obj = body(placement={"queueName": "team"}, quantize={"scheme": "W4A16"})
    spec = DistillationSpec.model_validate(obj["spec"])
    rayjob = build_rayjob(obj, spec, make_plan(spec.pipeline()), "quantize", 1, IMAGES)
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"
    assert "suspend" not in rayjob["spec"]  # Kueue owns it
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "reg/quantize:1"


SAMPLED = {"losses": {"logits": {"sparsity": "sampled", "temperature": "1.0"}}}


@pytest.mark.parametrize(
    ("backend", "gpus", "train", "image"),
    [
        ("auto", 1, {}, "reg/runtime-vllm:1"),
        ("vllm", 2, {}, "reg/runtime-vllm:1"),
        ("auto", 0, {}, "reg/runtime:1"),  # no GPU: auto means transformers, no vLLM needed
        ("transformers", 1, {}, "reg/runtime:1"),
        ("auto", 1, SAMPLED, "reg/runtime:1"),  # draws need the distribution: transformers
    ],
)
def test_generate_on_gpus_runs_the_runtime_image_with_vllm(
    backend: str, gpus: int, train: dict[str, Any], image: str
) -> None:
    images = Images("reg/runtime:1", "reg/quantize:1", "reg/vllm:1", "reg/runtime-vllm:1")
    obj = body(
        generate={"backend": backend, "topLogprobs": 8},
        train=train,
        placement={"workers": {"gpus": gpus}},
    )
    spec = DistillationSpec.model_validate(obj["spec"])
    plan = make_plan(spec.pipeline())
    images_of = {
        name: build_rayjob(obj, spec, plan, name, 1, images)["spec"]["rayClusterSpec"][
            "workerGroupSpecs"
        ][0]["template"]["spec"]["containers"][0]["image"]
        for name in ("generate", "train")
    }
    assert images_of == {"generate": image, "train": "reg/runtime:1"}


def test_distill_stage_reads_the_spec_from_the_named_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOT_SET", raising=False)
    assert distill(["stage", "generate", "--config-env", "NOT_SET"]) == 2
    assert "NOT_SET is empty or not set" in capsys.readouterr().err
    monkeypatch.setenv("BAD_SPEC", "teacher: {}\n")
    assert distill(["stage", "generate", "--config-env", "BAD_SPEC"]) == 2
    assert "$BAD_SPEC" in capsys.readouterr().err


# -------------------------------------------------------------------------------- reconcile


def test_retry_delay_doubles() -> None:
    assert [retry_delay(30, n) for n in (1, 2, 3)] == [30.0, 60.0, 120.0]


def test_first_reconcile_starts_the_first_stage_and_repeats_are_no_ops() -> None:
    obj = body()
    actions = step(obj, [])
    assert [c["metadata"]["name"] for c in actions.create] == ["demo-generate-1"]
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["progress"] == "1/4"  # the preflight passed
    assert conditions(obj)["Ready"]["reason"] == "StageRunning"
    assert [e.reason for e in actions.events] == ["StageStarted"]
    created = actions.create
    again = step(obj, created, now=NOW + timedelta(minutes=5))
    assert again.create == []
    assert again.events == []
    moved = conditions(obj)["Ready"]["lastTransitionTime"]
    assert datetime.fromisoformat(moved.replace("Z", "+00:00")) == NOW  # status unchanged


def test_a_failure_waits_for_the_backoff_then_retries_then_fails() -> None:
    obj = body()
    first = step(obj, []).create[0]
    failed = job_status(
        first,
        jobDeploymentStatus="Failed",
        jobStatus="FAILED",
        reason="AppFailed",
        message="boom",
        endTime="2026-11-28T12:00:00Z",
    )
    waiting = step(obj, [failed], now=NOW + timedelta(seconds=10))
    assert waiting.create == []
    assert waiting.requeue_after == pytest.approx(50.0)
    stage = obj["status"]["stages"][1]
    assert stage["state"] == "Retrying"
    assert "AppFailed: boom" in stage["message"]
    retry = step(obj, [failed], now=NOW + timedelta(seconds=61))
    assert [c["metadata"]["name"] for c in retry.create] == ["demo-generate-2"]
    second = job_status(retry.create[0], jobDeploymentStatus="ValidationFailed", message="no")
    step(obj, [failed, second], now=NOW + timedelta(seconds=70))
    assert obj["status"]["stages"][1]["state"] == "Failed"
    assert obj["status"]["phase"] == "Failed"
    assert conditions(obj)["Stalled"]["status"] == "True"


def test_success_records_metrics_and_starts_the_next_stage() -> None:
    obj = body()
    first = step(obj, []).create[0]
    done = job_status(first, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    uri = first["metadata"]["annotations"]["distillation.dev/artifact"]
    artifacts = {uri: Artifact(manifest={"metrics": {"records": 40, "tokensPerSecond": 12.5}})}
    actions = step(obj, [done], artifacts=artifacts)
    assert [c["metadata"]["name"] for c in actions.create] == ["demo-train-1"]
    assert obj["status"]["stages"][1]["metrics"] == {"records": "40", "tokensPerSecond": "12.5"}
    assert conditions(obj)["TeacherDataGenerated"]["status"] == "True"
    assert [e.reason for e in actions.events] == ["StageSucceeded", "StageStarted"]


def test_a_complete_artifact_is_reused_without_a_rayjob() -> None:
    obj = body()
    spec = DistillationSpec.model_validate(obj["spec"])
    uri = make_plan(spec.pipeline()).artifact("generate")
    actions = step(obj, [], artifacts={uri: Artifact(manifest={"metrics": {}})})
    assert [c["metadata"]["name"] for c in actions.create] == ["demo-train-1"]
    assert "reused" in obj["status"]["stages"][1]["message"]


def test_suspend_suspends_ours_and_deletes_kueues() -> None:
    obj = body()
    job = step(obj, []).create[0]
    obj["spec"]["policy"]["suspend"] = True
    actions = step(obj, [job_status(job, jobDeploymentStatus="Running")])
    assert actions.suspend_rayjobs == {"demo-generate-1": True}
    assert obj["status"]["phase"] == "Suspended"

    queued = body(placement={"queueName": "q"})
    job = step(queued, []).create[0]
    held = job | {"spec": job["spec"] | {"suspend": True}}
    step(queued, [job_status(held, jobDeploymentStatus="Suspended")])
    assert queued["status"]["stages"][1]["state"] == "Queued"
    queued["spec"]["policy"]["suspend"] = True
    actions = step(queued, [job_status(held, jobDeploymentStatus="Suspended")])
    assert actions.delete_rayjobs == ["demo-generate-1"]  # Kueue owns suspend
    assert actions.suspend_rayjobs == {}


def test_the_pipeline_deadline_stops_the_running_stage() -> None:
    obj = body(policy={"deadlineSeconds": 3600})
    job = step(obj, []).create[0]
    actions = step(
        obj, [job_status(job, jobDeploymentStatus="Running")], now=NOW + timedelta(hours=2)
    )
    assert actions.delete_rayjobs == ["demo-generate-1"]
    assert conditions(obj)["Stalled"]["reason"] == "DeadlineExceeded"


def test_a_spec_the_cluster_cannot_run_is_stalled_without_children() -> None:
    obj = body(placement={"clusterSelector": {"ray.io/cluster": "c"}}, quantize={"scheme": "W8A8"})
    actions = step(obj, [])
    assert actions.create == []
    assert actions.requeue_after is None
    ready = conditions(obj)["Ready"]
    assert ready["reason"] == "InvalidSpec"
    assert "spec.quantize" in ready["message"]
    assert [e.reason for e in actions.events] == ["InvalidSpec"]


def test_several_train_workers_need_a_shared_output_and_a_pod_each() -> None:
    obj = body(train={"workers": 2}, placement={"stages": {"train": {"replicas": 1}}})
    step(obj, [])
    message = conditions(obj)["Ready"]["message"]
    assert conditions(obj)["Ready"]["reason"] == "InvalidSpec"
    assert "spec.train.workers is 2 with spec.output s3://b/out" in message
    assert "the train stage has 1 worker pod(s)" in message
    fine = body(train={"workers": 2}, output="pvc://artifacts/run")
    assert step(fine, []).create  # the preflight passed: the first stages start


def test_a_cpu_served_student_runs_distill_serve_of_the_runtime_image() -> None:
    from distillation_operator.builders.inference_service import build_inference_service

    def container(**serve: Any) -> dict[str, Any]:
        obj = body(serve=serve)
        model = DistillationSpec.model_validate(obj["spec"])
        built = build_inference_service(obj, model, "s3://b/out/train-x/model", IMAGES)
        found: dict[str, Any] = built["spec"]["predictor"]["containers"][0]
        return found

    cpu = container(gpus=0)
    assert cpu["image"] == IMAGES.runtime
    assert cpu["command"] == ["distill", "serve"]
    assert cpu["args"][:3] == ["/mnt/models", "--host", "0.0.0.0"]
    assert cpu["args"][-2:] == ["--served-model-name", "demo"]
    assert "resources" not in cpu or "nvidia.com/gpu" not in str(cpu["resources"])
    gpu = container(gpus=1)
    assert gpu["image"] == IMAGES.vllm
    assert gpu["command"][-1] == "vllm.entrypoints.openai.api_server"
    refused = body(serve={"gpus": 0, "args": ["--enforce-eager"]})
    step(refused, [])
    assert (
        "serve.args ['--enforce-eager'] are vLLM flags" in conditions(refused)["Ready"]["message"]
    )


def test_storage_is_read_only_for_stages_that_can_use_it() -> None:
    obj = body()
    spec = DistillationSpec.model_validate(obj["spec"])
    plan = make_plan(spec.pipeline())
    generate, train = plan.artifact("generate"), plan.artifact("train")
    assert probe(obj, []) == [generate]  # may be reusable; train waits for it
    job = step(obj, []).create[0]
    assert probe(obj, [job_status(job, jobDeploymentStatus="Running")]) == []
    done = job_status(job, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert probe(obj, [done]) == [generate]  # its metrics
    step(obj, [done], artifacts={generate: Artifact(manifest={"metrics": {"records": 1}})})
    assert probe(obj, [done]) == [train]  # generate recorded; train about to start


def test_a_running_stage_shows_its_own_progress_and_is_looked_at_every_30_s() -> None:
    from distillation_runtime.progress import progress_uri

    obj = body()
    job = step(obj, []).create[0]
    running = job_status(job, jobDeploymentStatus="Running", jobStatus="RUNNING")
    uri = progress_uri(job["metadata"]["annotations"]["distillation.dev/artifact"])
    assert probe_progress(obj, [running]) == [uri]
    record = {"done": 450, "total": 1000, "unit": "records", "percent": 45.0, "etaSeconds": 4210}
    actions = step(obj, [running], progress={uri: record})
    generate = obj["status"]["stages"][1]
    assert generate["progress"]["done"] == 450
    assert generate["progress"]["percent"] == "45"
    assert obj["status"]["stageProgress"] == "generate 45% (1h10m left)"
    assert actions.requeue_after == 30.0
    quiet = step(obj, [running])  # the record unreadable for a moment: the last one stays
    assert obj["status"]["stages"][1]["progress"]["done"] == 450
    assert quiet.status == actions.status


def test_a_retry_does_not_show_the_failed_attempts_progress() -> None:
    """The progress record is per stage and fingerprint: until the new attempt writes its own,
    the file holds the failed attempt's last record, which must not be shown as the retry's."""
    from distillation_runtime.progress import progress_uri

    obj = body()  # policy.retries 1, backoff 60 s
    first = step(obj, []).create[0]
    uri = progress_uri(first["metadata"]["annotations"]["distillation.dev/artifact"])
    running = job_status(first, jobDeploymentStatus="Running", jobStatus="RUNNING")
    old = {"done": 990, "total": 1000, "unit": "records", "updated": "2026-11-28T12:00:30Z"}
    step(obj, [running], progress={uri: old}, now=NOW + timedelta(seconds=40))
    assert obj["status"]["stages"][1]["progress"]["done"] == 990
    step(obj, [failed_job(first, "2026-11-28T12:00:45Z")], now=NOW + timedelta(seconds=50))
    retry = step(obj, [], now=NOW + timedelta(seconds=120)).create[0]
    created = {"creationTimestamp": "2026-11-28T12:02:00Z"}
    retry = job_status(
        retry | {"metadata": retry["metadata"] | created},
        jobDeploymentStatus="Running",
        jobStatus="RUNNING",
    )
    step(obj, [retry], progress={uri: old}, now=NOW + timedelta(seconds=130))
    generate = obj["status"]["stages"][1]
    assert generate["state"] == "Running"
    assert "progress" not in generate or generate["progress"] is None
    assert obj["status"].get("stageProgress") in (None, "")
    new = old | {"done": 10, "updated": "2026-11-28T12:02:20Z"}
    step(obj, [retry], progress={uri: new}, now=NOW + timedelta(seconds=145))
    assert obj["status"]["stages"][1]["progress"]["done"] == 10


def probe_progress(obj: dict[str, Any], jobs: list[dict[str, Any]]) -> list[str]:
    from distillation_operator.reconcile import progress_to_probe

    return progress_to_probe(understand(obj, jobs), NOW)


# ------------------------------------------------------- the preflight guards every stage


def preflight_done(obj: dict[str, Any], first: Any, metrics: dict[str, Any]) -> Any:
    """The preflight's RayJob succeeded and its manifest says ``metrics``."""
    uri = first["metadata"]["annotations"]["distillation.dev/artifact"]
    done = job_status(first, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    return step(obj, [done], artifacts={uri: Artifact({"metrics": metrics})})


def test_a_new_distillation_starts_only_its_preflight_on_the_head_without_gpus() -> None:
    obj = body(fresh=True, placement={"workers": {"gpus": 8}}, student={"prune": {"numLayers": 2}})
    actions = step(obj, [])
    assert [c["metadata"]["labels"]["distillation.dev/stage"] for c in actions.create] == [
        "preflight"
    ]
    cluster = actions.create[0]["spec"]["rayClusterSpec"]
    assert "workerGroupSpecs" not in cluster  # the driver runs on the head
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert {s["name"]: s["message"] for s in obj["status"]["stages"]}["prune"] == (
        "waits for preflight"
    )


def test_a_passed_preflight_starts_the_first_stages() -> None:
    obj = body(fresh=True, student={"prune": {"numLayers": 2}})
    first = step(obj, []).create[0]
    actions = preflight_done(obj, first, {"specProblems": [], "teacherLayers": 4})
    started = {c["metadata"]["labels"]["distillation.dev/stage"] for c in actions.create}
    assert started == {"prune", "generate"}
    assert conditions(obj)["SpecChecked"]["status"] == "True"


def test_max_parallel_stages_holds_a_ready_stage_until_a_running_one_finishes() -> None:
    """On a tight quota two stage clusters started together can each hold part of it and wait
    for the other forever (KubeRay does not gang-schedule): with the limit, generate waits for
    prune, says so, and starts when prune's RayJob has finished."""
    obj = body(student={"prune": {"numLayers": 2}}, policy={"maxParallelStages": 1})
    prune = step(obj, []).create
    assert [c["metadata"]["labels"]["distillation.dev/stage"] for c in prune] == ["prune"]
    records = {s["name"]: s for s in obj["status"]["stages"]}
    assert records["generate"]["state"] == "Pending"
    assert records["generate"]["message"] == (
        "waits for prune to finish (spec.policy.maxParallelStages is 1)"
    )
    running = job_status(prune[0], jobDeploymentStatus="Running", jobStatus="RUNNING")
    assert step(obj, [running]).create == []
    done = job_status(prune[0], jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    uri = prune[0]["metadata"]["annotations"]["distillation.dev/artifact"]
    then = step(obj, [done], artifacts={uri: Artifact({"metrics": {}})}).create
    assert [c["metadata"]["labels"]["distillation.dev/stage"] for c in then] == ["generate"]


def test_max_parallel_stages_of_two_starts_independent_stages_together() -> None:
    obj = body(student={"prune": {"numLayers": 2}}, policy={"maxParallelStages": 2})
    started = {c["metadata"]["labels"]["distillation.dev/stage"] for c in step(obj, []).create}
    assert started == {"prune", "generate"}


def test_a_refused_spec_is_invalid_and_starts_no_gpu_stage() -> None:
    obj = body(fresh=True)
    first = step(obj, []).create[0]
    problem = "student.prune.numLayers is 9 but the teacher's num_hidden_layers is 2"
    actions = preflight_done(obj, first, {"specProblems": [problem]})
    assert actions.create == []
    assert obj["status"]["phase"] == "Failed"
    for kind in ("Ready", "Stalled"):
        assert conditions(obj)[kind]["reason"] == "InvalidSpec"
        assert problem in conditions(obj)[kind]["message"]
    assert conditions(obj)["Stalled"]["status"] == "True"
    record = obj["status"]["stages"][0]
    assert record["state"] == "Failed"
    assert problem in record["message"]
    assert {e.reason for e in actions.events} >= {"InvalidSpec"}
    again = preflight_done(obj, first, {"specProblems": [problem]})
    assert again.create == []
    assert again.events == []


def test_nothing_it_guards_starts_while_the_preflight_verdict_is_unreadable() -> None:
    obj = body(fresh=True)
    first = step(obj, []).create[0]
    done = job_status(first, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    uri = first["metadata"]["annotations"]["distillation.dev/artifact"]
    actions = step(obj, [done], artifacts={uri: Artifact(error="AccessDenied")})
    assert actions.create == []
    assert actions.requeue_after is not None
    assert "AccessDenied" in obj["status"]["stages"][0]["message"]


def test_a_pipeline_finished_before_the_preflight_existed_runs_nothing_new() -> None:
    obj = finished(body(fresh=True))
    obj["status"]["stages"] = [s for s in obj["status"]["stages"] if s["name"] != "preflight"]
    actions = step(obj, [])
    assert actions.create == []
    assert obj["status"]["phase"] == "Succeeded"
    preflight = next(s for s in obj["status"]["stages"] if s["name"] == "preflight")
    assert preflight["state"] == "Succeeded"
    assert "not run" in preflight["message"]


def test_vllm_generation_without_gpus_is_refused_before_any_rayjob() -> None:
    obj = body(fresh=True, generate={"backend": "vllm"})
    actions = step(obj, [])
    assert actions.create == []
    assert "spec.generate.backend is vllm" in conditions(obj)["Ready"]["message"]
    obj = body(
        fresh=True, generate={"backend": "vllm"}, placement={"stages": {"generate": {"gpus": 1}}}
    )
    assert step(obj, []).create != []


# ------------------------------------------------------- outcomes survive their RayJobs


def failed_job(rayjob: dict[str, Any], end: str = "2026-11-28T12:00:00Z") -> dict[str, Any]:
    return job_status(
        rayjob, jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", endTime=end
    )


def test_the_retry_budget_survives_deleted_rayjobs() -> None:
    """KubeRay's TTL deletes failed RayJobs: the failures are counted from status, so a stage
    out of retries stays Failed and a retry keeps its backoff and its attempt number."""
    obj = body()  # policy.retries 1, backoff 60 s
    first = step(obj, []).create[0]
    step(obj, [failed_job(first)], now=NOW + timedelta(seconds=10))
    assert obj["status"]["stages"][1]["failedAttempts"] == [1]
    gone = step(obj, [], now=NOW + timedelta(seconds=20))  # the TTL deleted it
    assert gone.create == []
    assert obj["status"]["stages"][1]["state"] == "Retrying"
    retry = step(obj, [], now=NOW + timedelta(seconds=61))
    assert [c["metadata"]["name"] for c in retry.create] == ["demo-generate-2"]
    step(obj, [failed_job(retry.create[0], "2026-11-28T12:02:00Z")], now=NOW + timedelta(minutes=3))
    assert obj["status"]["stages"][1]["state"] == "Failed"
    for minutes in (10, 60, 600):  # both RayJobs gone: still Failed, nothing restarts
        later = step(obj, [], now=NOW + timedelta(minutes=minutes))
        assert later.create == []
        assert obj["status"]["stages"][1]["state"] == "Failed"
        assert obj["status"]["stages"][1]["failedAttempts"] == [1, 2]
    assert conditions(obj)["Stalled"]["status"] == "True"


def test_a_succeeded_stage_stays_succeeded_when_its_rayjob_is_deleted() -> None:
    obj = body()
    generate = step(obj, []).create[0]
    artifact = {generate["metadata"]["annotations"]["distillation.dev/artifact"]: Artifact({})}
    complete = job_status(generate, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    train = step(obj, [complete], artifacts=artifact).create[0]
    after = step(obj, [train], now=NOW + timedelta(hours=2))  # generate's RayJob is gone
    assert after.create == []
    assert obj["status"]["stages"][1]["state"] == "Succeeded"
    assert obj["status"]["stages"][2]["state"] == "Running"


# ------------------------------------------------------- clusterSelector and suspend


def test_suspend_on_a_shared_cluster_deletes_and_never_runs_two_drivers() -> None:
    """KubeRay refuses ``suspend`` in clusterSelector mode: the RayJob is deleted instead, and
    on resume no new attempt starts while the stopped driver is still terminating."""
    obj = body(placement={"clusterSelector": {"ray.io/cluster": "shared"}})
    first = job_status(step(obj, []).create[0], jobDeploymentStatus="Running")
    obj["spec"]["policy"]["suspend"] = True
    held = step(obj, [first])
    assert held.suspend_rayjobs == {}
    assert held.delete_rayjobs == [first["metadata"]["name"]]
    assert obj["status"]["stages"][1]["state"] == "Suspended"
    obj["spec"]["policy"]["suspend"] = False
    terminating = first | {
        "metadata": first["metadata"] | {"deletionTimestamp": "2026-11-28T12:00:01Z"}
    }
    waiting = step(obj, [terminating], now=NOW + timedelta(seconds=5))
    assert waiting.create == []
    assert "waits for demo-generate-1" in obj["status"]["stages"][1]["message"]
    resumed = step(obj, [], now=NOW + timedelta(seconds=10))
    assert [c["metadata"]["name"] for c in resumed.create] == ["demo-generate-2"]


# ------------------------------------------------------- status holds what is true now


def test_the_status_patch_removes_nested_keys_the_new_status_dropped() -> None:
    """Removing spec.quantize drops quantize's final metrics: the merge patch must delete them
    (a plain merge patch of the new status would keep nested keys it no longer has)."""
    from distillation_operator.k8s import merge_patch

    old = {"phase": "Succeeded", "metrics": {"retention": "0.98", "scheme": "W4A16"}, "x": 1}
    new = {"phase": "Succeeded", "metrics": {"retention": "0.97"}}
    patch = merge_patch(old, new)
    assert patch == {"metrics": {"retention": "0.97", "scheme": None}, "x": None}
    assert merge_patch(new, new) == {}


def test_served_only_once_kserve_has_seen_the_current_spec() -> None:
    from distillation_operator.reconcile import inference_service_ready

    ready = {"conditions": [{"type": "Ready", "status": "True"}]}
    updated = {"metadata": {"generation": 3}, "status": ready | {"observedGeneration": 2}}
    assert not inference_service_ready(updated)  # the old revision's Ready
    seen = {"metadata": {"generation": 3}, "status": ready | {"observedGeneration": 3}}
    assert inference_service_ready(seen)


def test_the_serving_pods_read_the_student_with_the_account_given() -> None:
    """KServe's storage initializer takes the store's credentials from the predictor's
    ServiceAccount: serve.serviceAccountName, else the account the stages wrote with."""
    from distillation_operator.builders.inference_service import build_inference_service

    def account(**spec: Any) -> str | None:
        obj = body(serve={"gpus": 1, **spec.pop("serve", {})}, **spec)
        model = DistillationSpec.model_validate(obj["spec"])
        built = build_inference_service(obj, model, "s3://b/out/train-x/model", IMAGES)
        return built["spec"]["predictor"].get("serviceAccountName")

    assert account() is None  # the namespace's default account, as KServe does
    assert account(placement={"serviceAccountName": "writer"}) == "writer"
    both = {"placement": {"serviceAccountName": "writer"}, "serve": {"serviceAccountName": "r"}}
    assert account(**both) == "r"


def finished(obj: dict[str, Any]) -> dict[str, Any]:
    """The Distillation with every stage recorded Succeeded and the gate passed."""
    spec = DistillationSpec.model_validate(obj["spec"])
    plan = make_plan(spec.pipeline())
    obj["status"] = {
        "stages": [
            {
                "name": s.name,
                "state": "Succeeded",
                "fingerprint": s.fingerprint,
                "artifact": plan.artifact(s.name),
                "metrics": {"gatePassed": "true", "retention": "0.97"},
            }
            for s in plan.stages
        ]
    }
    return obj


KSERVE_LLM = frozenset({"ray.io/v1", "serving.kserve.io/v1alpha2"})
KSERVE_BOTH = KSERVE_LLM | {"serving.kserve.io/v1beta1"}


def ready(child: dict[str, Any], url: str = "http://student.test") -> dict[str, Any]:
    """KServe marks ``child`` ready for the spec it has seen."""
    generation = child["metadata"].setdefault("generation", 1)
    conditions = [{"type": "Ready", "status": "True"}]
    return child | {
        "status": {"observedGeneration": generation, "url": url, "conditions": conditions}
    }


def test_a_cluster_with_only_llminferenceservice_serves_with_it() -> None:
    obj = finished(
        body(serve={"gpus": 2, "maxModelLen": 4096, "args": ["--enable-prefix-caching"]})
    )
    actions = step(obj, [], served=KSERVE_LLM)
    (created,) = actions.create
    assert created["apiVersion"] == "serving.kserve.io/v1alpha2"
    assert created["kind"] == "LLMInferenceService"
    spec = created["spec"]
    student = next(s for s in obj["status"]["stages"] if s["name"] == "train")["artifact"]
    assert spec["model"] == {"uri": f"{student}/model", "name": "demo"}
    assert spec["parallelism"] == {"tensor": 2}  # one replica over its 2 GPUs
    main = spec["template"]["containers"][0]
    assert main["name"] == "main"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 2
    extra = {e["name"]: e["value"] for e in main["env"]}["VLLM_ADDITIONAL_ARGS"]
    assert extra == "--max-model-len 4096 --enable-prefix-caching"  # tensor: in parallelism
    assert set(spec["router"]) == {"route", "gateway", "scheduler"}
    assert obj["status"]["serving"]["kind"] == "LLMInferenceService"
    served = step(obj, [], served=KSERVE_LLM, serving=[ready(created)])
    assert served.create == served.apply == []
    assert conditions(obj)["Ready"]["reason"] == "Served"
    assert obj["status"]["serving"]["url"] == "http://student.test"


def test_an_api_the_cluster_does_not_serve_is_named() -> None:
    obj = finished(body(serve={"api": "LLMInferenceService"}))
    actions = step(obj, [], served=frozenset({"ray.io/v1", "serving.kserve.io/v1beta1"}))
    assert actions.create == []
    stalled = conditions(obj)["Stalled"]
    assert stalled["reason"] == "MissingAPI"
    assert "spec.serve.api is serving.kserve.io/v1alpha2 LLMInferenceService" in stalled["message"]


def test_switching_the_api_keeps_the_old_one_serving_until_the_new_one_is_ready() -> None:
    obj = finished(body(serve={"gpus": 1}))
    isvc = step(obj, [], served=KSERVE_BOTH).create[0]
    assert isvc["kind"] == "InferenceService"  # both served: InferenceService by default
    step(obj, [], served=KSERVE_BOTH, serving=[ready(isvc)])
    assert conditions(obj)["Ready"]["status"] == "True"

    obj["spec"]["serve"]["api"] = "LLMInferenceService"
    obj["metadata"]["generation"] = 2
    switching = step(obj, [], served=KSERVE_BOTH, serving=[ready(isvc)])
    (llm,) = switching.create
    assert llm["kind"] == "LLMInferenceService"
    assert switching.delete_serving == []  # the old one answers meanwhile
    assert conditions(obj)["Ready"]["status"] == "False"
    done = step(obj, [], served=KSERVE_BOTH, serving=[ready(isvc), ready(llm)])
    assert done.delete_serving == [("InferenceService", isvc["metadata"]["name"])]
    assert conditions(obj)["Ready"]["reason"] == "Served"


def test_a_failed_gate_leaves_the_served_student_serving_and_says_why() -> None:
    obj = finished(body(serve={"gpus": 1}, evaluate={"gate": {"minRetention": "0.95"}}))
    isvc = step(obj, [], served=KSERVE_BOTH).create[0]
    step(obj, [], served=KSERVE_BOTH, serving=[ready(isvc)])
    # a re-distillation (new generation) whose student falls short of the gate
    obj["metadata"]["generation"] = 2
    for record in obj["status"]["stages"]:
        record["metrics"] = {"gatePassed": "false", "retention": "0.81", "gateMetric": "tokenF1"}
    actions = step(obj, [], served=KSERVE_BOTH, serving=[ready(isvc)])
    assert actions.apply == actions.create == actions.delete_serving == []
    served = conditions(obj)["Served"]
    assert served["status"] == "False"
    assert served["reason"] == "GateFailed"
    assert "kept 0.81 of the teacher's tokenF1, below minRetention 0.95" in served["message"]
    assert "the student served before keeps serving" in served["message"]
    assert obj["status"]["serving"]["ready"] is True  # what answers now: the old revision
    assert conditions(obj)["Stalled"]["reason"] == "GateFailed"


def test_an_inference_service_splits_a_replica_over_its_gpus() -> None:
    from distillation_operator.builders.inference_service import build_inference_service

    obj = body(serve={"gpus": 4, "tensorParallelSize": 2})
    model = DistillationSpec.model_validate(obj["spec"])
    built = build_inference_service(obj, model, "s3://b/out/train-x/model", IMAGES)
    args = built["spec"]["predictor"]["containers"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"


@pytest.mark.parametrize(
    ("serve", "says"),
    [
        ({"gpus": 1, "tensorParallelSize": 2}, "tensorParallelSize is 2 but gpus is 1"),
        (
            {"api": "LLMInferenceService", "replicas": 1, "maxReplicas": 3},
            "workload variant autoscaler",
        ),
    ],
)
def test_serving_shapes_the_api_cannot_take_are_refused(serve: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        DistillationSpec.model_validate(body(serve=serve)["spec"])


# ------------------------------------------------------- deadlines mean what they say


def test_time_spent_suspended_does_not_count_toward_the_deadline() -> None:
    obj = body(policy={"deadlineSeconds": 3600, "retries": 1, "backoffSeconds": 60})
    running = job_status(step(obj, []).create[0], jobDeploymentStatus="Running")
    obj["spec"]["policy"]["suspend"] = True
    step(obj, [running], now=NOW + timedelta(minutes=30))  # 30 min of work, then 2 h held
    obj["spec"]["policy"]["suspend"] = False
    resumed = step(obj, [running], now=NOW + timedelta(minutes=150))
    assert resumed.delete_rayjobs == []
    clock = DeadlineClock.model_validate(obj["status"]["deadlineClock"])
    left = seconds_left(clock, 3600, NOW + timedelta(minutes=150))
    assert left == pytest.approx(30 * 60)  # 30 min of working time left
    assert resumed.requeue_after is not None
    assert resumed.requeue_after <= left  # looked at again before the deadline
    assert obj["status"]["deadlineClock"]["suspendedSeconds"] == 2 * 3600
    step(obj, [running], now=NOW + timedelta(minutes=181))
    assert conditions(obj)["Stalled"]["reason"] == "DeadlineExceeded"


def test_a_spec_edit_weeks_later_gets_the_whole_deadline() -> None:
    """The deadline counts the current generation's work, not the first run's start."""
    obj = body(policy={"deadlineSeconds": 3600})
    generate = step(obj, []).create[0]
    artifact = {generate["metadata"]["annotations"]["distillation.dev/artifact"]: Artifact({})}
    complete = job_status(generate, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    step(obj, [complete], artifacts=artifact, now=NOW + timedelta(minutes=10))
    obj["metadata"]["generation"] = 2
    obj["spec"]["train"] = {"learningRate": "1e-5"}
    weeks_later = NOW + timedelta(days=21)
    edited = step(obj, [complete], now=weeks_later)
    assert [c["metadata"]["labels"]["distillation.dev/stage"] for c in edited.create] == ["train"]
    assert conditions(obj)["Ready"]["reason"] == "StageRunning"
    assert edited.requeue_after == pytest.approx(3600)
    step(obj, [complete], now=weeks_later + timedelta(minutes=61))
    assert conditions(obj)["Stalled"]["reason"] == "DeadlineExceeded"


def test_a_manifest_the_operator_cannot_read_says_why_in_status() -> None:
    """Without access to the store the stage still advances on KubeRay's word; the store's own
    error is in the stage's message (and so in GateUnknown's), not only in the operator log."""
    obj = body()
    generate = step(obj, []).create[0]
    complete = job_status(generate, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    uri = generate["metadata"]["annotations"]["distillation.dev/artifact"]
    denied = {uri: Artifact(error="PermissionError: Access Denied (s3://b/out)")}
    actions = step(obj, [complete], artifacts=denied)
    record = obj["status"]["stages"][1]
    assert record["state"] == "Succeeded"
    assert "cannot read its manifest: PermissionError: Access Denied" in record["message"]
    assert actions.requeue_after == pytest.approx(60.0)
    step(obj, [complete], artifacts={uri: Artifact(manifest={"metrics": {"records": 3}})})
    record = obj["status"]["stages"][1]
    assert record["metrics"] == {"records": "3"}
    assert record["message"] == "demo-generate-1 succeeded"
