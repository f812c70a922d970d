"""What Argo CD and Flux show for a Distillation, judged by their own code.

Every status below is written by the operator's own reconcile (a body and played RayJobs,
InferenceService and manifests in, status out, as in test_reconcile.py); Argo CD's health code
runs the chart's health script from the argocd-cm the chart's README tells a user to apply, and
kstatus's ``status.Compute`` reads the same object (``hack/gitops-health``, built by
``support.gitops``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillation_operator.api import API_VERSION, KIND
from distillation_operator.builders.common import (
    ANNOTATION_ARTIFACT,
    LABEL_STAGE,
    Images,
)
from distillation_operator.observed import Artifact, Observed
from distillation_operator.reconcile import reconcile
from distillation_runtime.spec import API_GROUP
from distillation_runtime.stages import STAGES, Role, definition
from distillation_runtime.stages.base import SPEC_PROBLEMS
from support import gitops

IMAGES = Images("reg/runtime:1", "reg/quantize:1", "reg/vllm:1")
START = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
HEALTH_KEY = f"resource.customizations.health.{API_GROUP}_{KIND}"
PASSED = {"gatePassed": True, "retention": 0.97}
FAILED_GATE = {"gatePassed": False, "retention": 0.41}
FINISHED = frozenset({"Complete", "Failed"})


def manifest(**spec: Any) -> dict[str, Any]:
    """A Distillation as the API server returns it right after ``kubectl apply``."""
    base: dict[str, Any] = {
        "teacher": {"model": "hf://org/teacher"},
        "student": {"model": "hf://org/student"},
        "dataset": {"prompts": "s3://b/prompts.jsonl"},
        "output": "s3://b/out",
        "policy": {"retries": 0},
    }
    base.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": base,
    }


@dataclass
class Play:
    """One Distillation and what the operator observes of it: ``step`` runs a real reconcile
    and writes its status into the object, as the controller does; the other methods play
    KubeRay's, KServe's and the stages' part. Stage-agnostic: whatever the stage table plans
    runs, so a new stage changes no case here."""

    obj: dict[str, Any]
    served: frozenset[str] | None = None
    now: datetime = START
    rayjobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    inference_service: dict[str, Any] | None = None

    def step(self) -> Play:
        observed = Observed(
            self.obj,
            list(self.rayjobs.values()),
            serving=[self.inference_service] if self.inference_service else [],
            artifacts=self.artifacts,
            now=self.now,
            served=self.served,
        )
        actions = reconcile(observed, IMAGES)
        for child in actions.create + actions.apply:
            if child["kind"] == "RayJob":
                self.rayjobs[child["metadata"]["name"]] = copy.deepcopy(child)
            else:
                self.inference_service = copy.deepcopy(child)
        for name in actions.delete_rayjobs:
            self.rayjobs.pop(name, None)
        self.obj["status"] = actions.status
        self.now += timedelta(minutes=1)
        return self

    def live(self) -> list[dict[str, Any]]:
        """The RayJobs KubeRay has not finished."""
        return [
            job
            for job in self.rayjobs.values()
            if job.get("status", {}).get("jobDeploymentStatus") not in FINISHED
        ]

    def kuberay(self, **status: Any) -> Play:
        """KubeRay reports ``status`` on every live RayJob."""
        for job in self.live():
            job["status"] = dict(status)
        return self

    def complete(self, gate: dict[str, Any], **metrics: dict[str, Any]) -> Play:
        """Every live RayJob completes and its stage's artifact is written; its manifest's
        metrics: a number every stage reports, ``gate`` for a stage whose metrics decide the
        gate, and ``metrics[stage]``."""
        for job in self.live():
            stage = job["metadata"]["labels"][LABEL_STAGE]
            found = {"seconds": 12, **(gate if Role.GATE in definition(stage).roles else {})}
            found.update(metrics.get(stage, {}))
            uri = job["metadata"]["annotations"][ANNOTATION_ARTIFACT]
            self.artifacts[uri] = Artifact(manifest={"metrics": found})
            job["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
        return self.step()

    def fail(self, message: str) -> Play:
        """Every live RayJob fails (policy.retries is 0: no retry)."""
        end = self.now.isoformat().replace("+00:00", "Z")
        self.kuberay(
            jobDeploymentStatus="Failed",
            jobStatus="FAILED",
            reason="AppFailed",
            message=message,
            endTime=end,
        )
        return self.step()

    def until_live(self) -> Play:
        """Reconcile until a RayJob is live: the stages after the preflight start one reconcile
        after its result is read."""
        for _ in range(3):
            if self.live():
                break
            self.step()
        return self

    def through_all_stages(self, gate: dict[str, Any]) -> Play:
        """Every planned stage runs and succeeds; ``gate``: the gate stages' metrics."""
        self.step()
        for _ in range(3 * len(STAGES)):
            if self.live():
                self.complete(gate)
            else:
                self.step()
        stages = self.obj["status"]["stages"]
        assert all(s["state"] == "Succeeded" for s in stages), stages
        return self

    def edit(self, **spec: Any) -> Play:
        """A spec edit: the API server bumps ``metadata.generation``."""
        self.obj["spec"].update(spec)
        self.obj["metadata"]["generation"] += 1
        return self

    def kserve_ready(self) -> Play:
        """KServe reports the operator's InferenceService Ready."""
        assert self.inference_service is not None, "no InferenceService was created"
        self.inference_service["status"] = {
            "url": "http://demo.ml.example.com",
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        return self.step()


# ------------------------------------------------------------------------------ the cases


def created() -> dict[str, Any]:
    return manifest()


def queued() -> dict[str, Any]:
    play = Play(manifest(placement={"queueName": "team"})).step()
    for job in play.live():
        job["spec"]["suspend"] = True  # Kueue holds it: nothing has run yet
    return play.kuberay(jobDeploymentStatus="Suspended").step().obj


def running() -> dict[str, Any]:
    """The first stage done, the next one running."""
    play = Play(manifest()).step().complete(PASSED).until_live()
    return play.kuberay(jobDeploymentStatus="Running", jobStatus="RUNNING").step().obj


def serving() -> dict[str, Any]:
    """The student passed; its InferenceService is created but not answering yet."""
    return Play(manifest(serve={"gpus": 1})).through_all_stages(PASSED).obj


def served() -> dict[str, Any]:
    return Play(manifest(serve={"gpus": 1})).through_all_stages(PASSED).kserve_ready().obj


def gate_failed() -> dict[str, Any]:
    return Play(manifest()).through_all_stages(FAILED_GATE).obj


def stage_failed() -> dict[str, Any]:
    """The stage after the first fails its only attempt (policy.retries is 0)."""
    play = Play(manifest()).step().complete(PASSED).until_live()
    return play.fail("CUDA out of memory").obj


def invalid_spec() -> dict[str, Any]:
    """A spec no cluster can run (quantize on an existing RayCluster), refused before any
    RayJob."""
    placement = {"clusterSelector": {"ray.io/cluster": "c"}}
    return Play(manifest(placement=placement, quantize={"scheme": "W8A8"})).step().obj


def preflight_refused() -> dict[str, Any]:
    """The first stage (the preflight) found the spec cannot run on these models."""
    play = Play(manifest()).step()
    problems = {SPEC_PROBLEMS: ["train.features: the teacher has 4 layers, not 12"]}
    return play.complete(PASSED, **{next(s.name for s in STAGES if s.first): problems}).obj


def missing_api() -> dict[str, Any]:
    """A cluster without KubeRay."""
    return Play(manifest(), served=frozenset({"v1", "apps/v1"})).step().obj


def suspended() -> dict[str, Any]:
    play = Play(manifest()).step().kuberay(jobDeploymentStatus="Running")
    return play.edit(policy={"retries": 0, "suspend": True}).step().obj


def spec_edited() -> dict[str, Any]:
    """Served at generation 1, then the learning rate changes: the status still describes
    generation 1 until the operator's next reconcile."""
    play = Play(manifest(serve={"gpus": 1})).through_all_stages(PASSED).kserve_ready()
    return play.edit(train={"learningRate": "1e-5"}).obj


def spec_edit_reconciled() -> dict[str, Any]:
    play = Play(manifest(serve={"gpus": 1})).through_all_stages(PASSED).kserve_ready()
    return play.edit(train={"learningRate": "1e-5"}).step().obj


@dataclass(frozen=True)
class Case:
    build: Callable[[], dict[str, Any]]
    argocd: str
    kstatus: str
    message_from: str | None = None
    """The condition whose message both tools show; None: each tool says ``says`` of its own."""
    says: tuple[str, str] = ("", "")
    """(Argo CD's, kstatus's) message contains these, when ``message_from`` is None."""


BEHIND = ("waiting for the operator to observe generation 2", "latest observed generation is 1")

CASES = {
    # kstatus's own limit: an object without status counts as Current (the README says so)
    "created, no status yet": Case(
        created, "Progressing", "Current", says=("waiting for the distillation operator", "")
    ),
    "queued by Kueue": Case(queued, "Progressing", "InProgress", "Ready"),
    "a stage running": Case(running, "Progressing", "InProgress", "Ready"),
    "gate passed, InferenceService not ready": Case(serving, "Progressing", "InProgress", "Ready"),
    "gate passed and served": Case(served, "Healthy", "Current", "Ready"),
    "gate failed": Case(gate_failed, "Degraded", "Failed", "Stalled"),
    "a stage out of retries": Case(stage_failed, "Degraded", "Failed", "Stalled"),
    "invalid spec": Case(invalid_spec, "Degraded", "Failed", "Stalled"),
    "preflight refused the spec": Case(preflight_refused, "Degraded", "Failed", "Stalled"),
    "missing API": Case(missing_api, "Degraded", "Failed", "Stalled"),
    "suspended": Case(suspended, "Suspended", "InProgress", "Ready"),
    "spec edited, not yet observed": Case(spec_edited, "Progressing", "InProgress", says=BEHIND),
    "spec edited, stages re-running": Case(
        spec_edit_reconciled, "Progressing", "InProgress", "Ready"
    ),
}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


@pytest.fixture(scope="module")
def tool() -> Path:
    return gitops.binary()


@pytest.fixture(scope="module")
def argocd_cm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's argocd-cm, written where the tool reads it."""
    path = tmp_path_factory.mktemp("argocd") / "argocd-cm.yaml"
    path.write_text(yaml.safe_dump(gitops.readme_argocd_cm()))
    return path


def test_the_readme_snippet_carries_the_charts_script_under_argo_cds_key() -> None:
    cm = gitops.readme_argocd_cm()
    assert (cm["metadata"]["namespace"], cm["metadata"]["name"]) == ("argocd", "argocd-cm")
    assert list(cm["data"]) == [HEALTH_KEY]
    assert cm["data"][HEALTH_KEY] == gitops.HEALTH_LUA.read_text()


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_argo_cd_and_kstatus_health(case: Case, tool: Path, argocd_cm: Path) -> None:
    obj = case.build()
    health = gitops.judge(tool, argocd_cm, obj)
    assert (health.argocd.status, health.kstatus.status) == (case.argocd, case.kstatus), health
    if case.message_from is None:
        assert case.says[0] in health.argocd.message
        assert case.says[1] in health.kstatus.message
        return
    message = condition(obj, case.message_from)["message"]
    assert message
    assert health.argocd.message == message
    if case.kstatus != "Current":  # Current: kstatus says "Resource is Ready"
        assert health.kstatus.message == message
