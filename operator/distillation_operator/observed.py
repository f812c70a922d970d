"""What the operator sees: a Distillation, its RayJobs as KubeRay reports them, its
InferenceService and the artifacts it could read. Value types and their parsers only; no
decision is taken here (that is ``reconcile``), so ``k8s``, ``artifacts`` and the controller can
use them without importing the decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from distillation_operator.builders.common import (
    ANNOTATION_FINGERPRINT,
    LABEL_ATTEMPT,
    LABEL_STAGE,
)
from distillation_operator.builders.rayjob import KUEUE_QUEUE_LABEL

MESSAGE_LIMIT = 2000
"""Longest message copied from a child into status (a failing driver's log can be huge)."""

# KubeRay's RayJob states (``status.jobDeploymentStatus`` and Ray's ``status.jobStatus``).
DEPLOYMENT_COMPLETE = "Complete"
FAILED_DEPLOYMENT = frozenset({"Failed", "ValidationFailed"})
HELD_DEPLOYMENT = frozenset({"Suspended", "Suspending"})
JOB_SUCCEEDED = "SUCCEEDED"
FAILED_JOB = frozenset({"FAILED", "STOPPED"})


@dataclass(frozen=True)
class Artifact:
    """What the operator read at an artifact URI: its manifest, or why it could not."""

    manifest: Mapping[str, Any] | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def metrics(self) -> Mapping[str, Any] | None:
        """The stage's metrics from its manifest; None when not read (yet)."""
        if self.manifest is None:
            return None
        found = self.manifest.get("metrics")
        return found if isinstance(found, Mapping) else {}


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at."""

    body: Mapping[str, Any]
    rayjobs: Sequence[Mapping[str, Any]] = field(default_factory=list)
    serving: Sequence[Mapping[str, Any]] = field(default_factory=list)
    """Its serving children (InferenceService, LLMInferenceService; two while switching APIs),
    each with its ``kind``."""
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
    progress: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Running stages' progress records (``progress.progress_uri`` of the artifact -> record)."""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    served: frozenset[str] | None = None
    """The ``group/version`` pairs the cluster serves; None when unknown (then every API the
    spec needs is taken to be there)."""


@dataclass(frozen=True)
class Job:
    """One observed RayJob of this Distillation, as KubeRay reports it."""

    name: str
    stage: str
    attempt: int
    fingerprint: str
    deployment: str
    job_status: str
    reason: str
    message: str
    suspend: bool
    kueue: bool
    start: datetime | None
    end: datetime | None
    created: datetime | None
    deleting: bool = False
    """Deletion requested; KubeRay's finalizer is still stopping it."""

    @property
    def succeeded(self) -> bool:
        return self.deployment == DEPLOYMENT_COMPLETE and self.job_status == JOB_SUCCEEDED

    @property
    def failed(self) -> bool:
        """KubeRay's terminal failures, plus ValidationFailed (KubeRay retries it forever)."""
        return self.deployment in FAILED_DEPLOYMENT or (
            self.deployment == DEPLOYMENT_COMPLETE and self.job_status in FAILED_JOB
        )

    @property
    def finished(self) -> bool:
        return self.succeeded or self.failed

    @property
    def held(self) -> bool:
        """Suspended (by Kueue or by us) or on its way there."""
        return self.deployment in HELD_DEPLOYMENT

    def why(self) -> str:
        reason = self.reason or self.deployment or "Failed"
        text = f"{reason}: {self.message}" if self.message else reason
        return text[:MESSAGE_LIMIT]


def parse_time(value: Any) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339, ``Z`` for UTC); None when absent."""
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def parse_job(obj: Mapping[str, Any]) -> Job | None:
    """A RayJob as reconcile sees it; None when it lacks the operator's labels."""
    meta = obj.get("metadata", {})
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    try:
        attempt = int(labels[LABEL_ATTEMPT])
        stage = labels[LABEL_STAGE]
        fingerprint = annotations[ANNOTATION_FINGERPRINT]
    except (KeyError, ValueError):
        return None
    return Job(
        name=meta.get("name", ""),
        stage=stage,
        attempt=attempt,
        fingerprint=fingerprint,
        deployment=status.get("jobDeploymentStatus") or "",
        job_status=status.get("jobStatus") or "",
        reason=status.get("reason") or "",
        message=status.get("message") or "",
        suspend=bool(spec.get("suspend")),
        kueue=KUEUE_QUEUE_LABEL in labels,
        start=parse_time(status.get("startTime")),
        end=parse_time(status.get("endTime")),
        created=parse_time(meta.get("creationTimestamp")),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def parse_jobs(objs: Sequence[Mapping[str, Any]]) -> list[Job]:
    """The RayJobs that carry the operator's labels, parsed."""
    return [job for job in (parse_job(obj) for obj in objs) if job is not None]
