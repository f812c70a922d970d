"""Reconcile: (a Distillation, what exists now) -> what to create, stop and report. Pure.

Level-based: every call derives the whole decision from the object, its observed RayJobs and
InferenceService, the artifacts the operator could read and the clock, never from the event that
triggered it. So a repeated call, an operator restart or a missed event changes nothing: RayJob
names are deterministic (create is create-or-get), a finished stage is recognised from its
RayJob or its artifact, and events are emitted for status *changes* only.

Stages run as soon as their inputs are done (prune and generate together; quantize beside
evaluate). A failed attempt is retried as a new RayJob after ``backoffSeconds * 2**(failures-1)``
until ``policy.retries`` is spent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from distillation_operator.api import (
    CONDITION_READY,
    CONDITION_RECONCILING,
    CONDITION_STALLED,
    Condition,
    ConditionStatus,
    DistillationSpec,
    DistillationStatus,
    Phase,
    ServingStatus,
    StageState,
    StageStatus,
)
from distillation_operator.builders.common import (
    ANNOTATION_FINGERPRINT,
    ANNOTATION_SPEC_HASH,
    LABEL_ATTEMPT,
    LABEL_STAGE,
    Images,
)
from distillation_operator.builders.inference_service import build_inference_service
from distillation_operator.builders.rayjob import KUEUE_QUEUE_LABEL, build_rayjob
from distillation_runtime.plan import Plan, StageName, make_plan

STAGE_CONDITIONS: dict[StageName, str] = {
    StageName.PRUNE: "Pruned",
    StageName.GENERATE: "TeacherDataGenerated",
    StageName.TRAIN: "StudentTrained",
    StageName.EVALUATE: "Evaluated",
    StageName.QUANTIZE: "Quantized",
    StageName.EVALUATE_QUANTIZED: "QuantizedEvaluated",
}
CONDITION_SERVED = "Served"
MANIFEST_RETRY_SECONDS = 60.0
"""How soon to look again for a manifest the operator could not read."""
FAILED_DEPLOYMENT = {"Failed", "ValidationFailed"}
FAILED_JOB = {"FAILED", "STOPPED"}
MESSAGE_LIMIT = 2000


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """What the operator read at an artifact URI: its manifest, or why it could not."""

    manifest: Mapping[str, Any] | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.manifest is not None


@dataclass(frozen=True)
class Observed:
    """Everything reconcile looks at."""

    body: Mapping[str, Any]
    rayjobs: Sequence[Mapping[str, Any]] = field(default_factory=list)
    inference_service: Mapping[str, Any] | None = None
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event on the Distillation."""

    type: str
    reason: str
    message: str


@dataclass
class Actions:
    """What to do: children to create or update, RayJobs to stop or suspend, the new status."""

    create: list[dict[str, Any]] = field(default_factory=list)
    apply: list[dict[str, Any]] = field(default_factory=list)
    delete_rayjobs: list[str] = field(default_factory=list)
    delete_inference_services: list[str] = field(default_factory=list)
    suspend_rayjobs: dict[str, bool] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        """Ask to be called again within ``seconds`` (the earliest request wins)."""
        seconds = max(seconds, 0.5)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )


# --------------------------------------------------------------------------------------------
# RayJob status, as KubeRay writes it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One observed RayJob of this Distillation."""

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

    @property
    def succeeded(self) -> bool:
        return self.deployment == "Complete" and self.job_status == "SUCCEEDED"

    @property
    def failed(self) -> bool:
        """KubeRay's terminal failures, plus ValidationFailed (KubeRay retries it forever)."""
        return self.deployment in FAILED_DEPLOYMENT or (
            self.deployment == "Complete" and self.job_status in FAILED_JOB
        )

    @property
    def finished(self) -> bool:
        return self.succeeded or self.failed

    @property
    def held(self) -> bool:
        """Suspended (by Kueue or by us) or on its way there."""
        return self.deployment in {"Suspended", "Suspending"}

    def why(self) -> str:
        reason = self.reason or self.deployment or "Failed"
        text = f"{reason}: {self.message}" if self.message else reason
        return text[:MESSAGE_LIMIT]


def _time(value: Any) -> datetime | None:
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
        start=_time(status.get("startTime")),
        end=_time(status.get("endTime")),
        created=_time(meta.get("creationTimestamp")),
    )


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


def retry_delay(backoff_seconds: int, failures: int) -> float:
    """Exponential backoff: the first retry waits ``backoff_seconds``, each next one twice that."""
    return float(backoff_seconds * 2 ** max(failures - 1, 0))


def decimal(value: Any) -> str | None:
    """A metric as a decimal string (status has no floats); None for what is not a number."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, str) and value:
        return value[:256]
    return None


def metric_strings(metrics: Mapping[str, Any] | None) -> dict[str, str] | None:
    if not metrics:
        return None
    converted = {k: decimal(v) for k, v in metrics.items()}
    return {k: v for k, v in converted.items() if v is not None} or None


def _conditions_by_type(status: DistillationStatus) -> dict[str, Condition]:
    return {c.type: c for c in status.conditions or []}


def set_condition(
    old: Mapping[str, Condition],
    new: dict[str, Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> None:
    """Add a condition; ``lastTransitionTime`` moves only when its status changes."""
    previous = old.get(type_)
    changed = previous is None or previous.status != status
    new[type_] = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:MESSAGE_LIMIT],
        last_transition_time=now if changed or previous is None else previous.last_transition_time,
        observed_generation=generation,
    )


def _old_stage(old: DistillationStatus, name: StageName, fingerprint: str) -> StageStatus | None:
    for record in old.stages or []:
        if record.name == name.value and record.fingerprint == fingerprint:
            return record
    return None


@dataclass
class _Context:
    observed: Observed
    spec: DistillationSpec
    plan: Plan
    images: Images
    old: DistillationStatus
    actions: Actions
    jobs: list[Job]

    @property
    def now(self) -> datetime:
        return self.observed.now


def _stage_record(ctx: _Context, name: StageName, done: set[StageName]) -> StageStatus:
    """Decide one stage: keep it, record its finish, start it, retry it or fail it."""
    stage = ctx.plan[name]
    uri = ctx.plan.artifact(name)
    previous = _old_stage(ctx.old, name, stage.fingerprint)
    record = (
        previous.model_copy(deep=True)
        if previous is not None
        else StageStatus(name=name.value, state=StageState.PENDING, fingerprint=stage.fingerprint)
    )
    record.artifact = uri
    artifact = ctx.observed.artifacts.get(uri)
    if record.state is StageState.SUCCEEDED:
        if record.metrics is None and artifact is not None and artifact.complete:
            record.metrics = metric_strings(artifact.manifest.get("metrics"))  # type: ignore[union-attr]
        return record

    jobs = sorted(
        (j for j in ctx.jobs if j.stage == name.value and j.fingerprint == stage.fingerprint),
        key=lambda j: j.attempt,
    )
    latest = jobs[-1] if jobs else None
    failures = sum(1 for j in jobs if j.failed)
    record.attempts = max(record.attempts, latest.attempt if latest else 0)
    policy = ctx.spec.policy

    if (latest is not None and latest.succeeded) or (
        artifact is not None and artifact.complete and (latest is None or not latest.failed)
    ):
        record.state = StageState.SUCCEEDED
        record.completion_time = (latest.end if latest and latest.end else None) or ctx.now
        record.start_time = record.start_time or (latest.start if latest else None) or ctx.now
        record.message = (
            f"{latest.name} succeeded" if latest is not None else f"reused complete artifact {uri}"
        )
        if artifact is not None and artifact.complete:
            record.metrics = metric_strings(artifact.manifest.get("metrics"))  # type: ignore[union-attr]
        else:
            record.metrics = None
            ctx.actions.requeue(MANIFEST_RETRY_SECONDS)
        return record

    if latest is not None and not latest.failed:
        record.ray_job = latest.name
        record.start_time = record.start_time or latest.start or latest.created or ctx.now
        if policy.suspend:
            _hold(ctx, latest, record)
        elif latest.held and latest.kueue and not latest.suspend:
            record.state = StageState.RUNNING  # Kueue has just admitted it
            record.message = running_message(latest.name, latest.attempt, latest.deployment)
        elif latest.held and latest.kueue:
            record.state = StageState.QUEUED
            record.message = f"{latest.name} waits for Kueue to admit it"
        else:
            if latest.suspend and not latest.kueue:
                ctx.actions.suspend_rayjobs[latest.name] = False
            record.state = StageState.RUNNING
            record.message = running_message(latest.name, latest.attempt, latest.deployment)
        return record

    inputs_done = all(i in done for i in stage.inputs)
    if not inputs_done:
        record.state = StageState.PENDING
        record.message = "waits for " + ", ".join(i.value for i in stage.inputs if i not in done)
        return record
    if latest is not None:  # the latest attempt failed
        record.ray_job = latest.name
        if failures > policy.retries:
            record.state = StageState.FAILED
            record.completion_time = record.completion_time or latest.end or ctx.now
            record.message = (
                f"{latest.name} failed ({latest.why()}); {failures} attempt(s) failed, "
                f"policy.retries is {policy.retries}"
            )
            return record
        failed_at = latest.end or (previous.completion_time if previous else None) or ctx.now
        wait_until = failed_at + timedelta(seconds=retry_delay(policy.backoff_seconds, failures))
        if ctx.now < wait_until or policy.suspend:
            record.state = StageState.RETRYING if not policy.suspend else StageState.SUSPENDED
            record.completion_time = failed_at
            record.message = (
                f"{latest.name} failed ({latest.why()}); attempt {latest.attempt + 1} of "
                f"{policy.retries + 1} starts at {wait_until.isoformat(timespec='seconds')}"
            )
            if not policy.suspend:
                ctx.actions.requeue((wait_until - ctx.now).total_seconds())
            return record
    if policy.suspend:
        record.state = StageState.SUSPENDED
        record.message = "suspended (spec.policy.suspend); starts when resumed"
        return record
    # Numbered across fingerprints: a replaced stage's new RayJob never reuses a name that
    # may still be terminating.
    attempt = max([record.attempts, *(j.attempt for j in ctx.jobs if j.stage == name.value)]) + 1
    rayjob = build_rayjob(dict(ctx.observed.body), ctx.spec, ctx.plan, name, attempt, ctx.images)
    ctx.actions.create.append(rayjob)
    record.attempts = attempt
    record.ray_job = rayjob["metadata"]["name"]
    record.state = StageState.RUNNING
    record.start_time = record.start_time or ctx.now
    record.completion_time = None
    record.message = running_message(record.ray_job, attempt, "")
    return record


def running_message(job: str, attempt: int, deployment: str) -> str:
    """The message of a running stage: the same text from creation until KubeRay reports
    progress, so a RayJob's own creation event changes nothing in status."""
    return f"{job} (attempt {attempt}): {deployment or 'created'}"


def _hold(ctx: _Context, job: Job, record: StageStatus) -> None:
    """Suspend a running stage: KubeRay tears its cluster down and re-submits on resume;
    Kueue owns ``suspend`` of the jobs it manages, so those are stopped instead."""
    if job.kueue:
        ctx.actions.delete_rayjobs.append(job.name)
        record.attempts = max(record.attempts, job.attempt)
    elif not job.suspend:
        ctx.actions.suspend_rayjobs[job.name] = True
    record.state = StageState.SUSPENDED
    record.message = f"{job.name} suspended (spec.policy.suspend)"


def _stop_stale(ctx: _Context) -> None:
    """Stop RayJobs whose (stage, fingerprint) the plan no longer has: a spec edit replaced
    them, and running them on would only write an artifact nobody reads."""
    planned = {(s.name.value, s.fingerprint) for s in ctx.plan.stages}
    for job in ctx.jobs:
        if (job.stage, job.fingerprint) not in planned and not job.finished:
            ctx.actions.delete_rayjobs.append(job.name)
            ctx.actions.events.append(
                Event("Normal", "StageReplaced", f"{job.name} stopped: the spec changed its stage")
            )


FINAL_METRICS_FROM: dict[StageName, tuple[str, ...]] = {
    StageName.QUANTIZE: ("scheme", "sizeBytesBefore", "sizeBytesAfter", "compression"),
    StageName.PRUNE: ("teacherParameters", "studentParameters"),
}


def _final_metrics(ctx: _Context, stages: list[StageStatus]) -> dict[str, str] | None:
    """The final evaluation (of the quantised student when quantised): scores, retention and
    gate; plus the unquantised retention, the scheme and sizes, and the parameter counts and
    their ratio when the student was pruned."""
    by_name = {s.name: s for s in stages}
    final = by_name.get(StageName.EVALUATE_QUANTIZED.value) or by_name.get(StageName.EVALUATE.value)
    if final is None or final.metrics is None:
        return None
    metrics = dict(final.metrics)
    unquantized = by_name.get(StageName.EVALUATE.value)
    quantized = final.name != StageName.EVALUATE.value
    if quantized and unquantized and "retention" in (unquantized.metrics or {}):
        metrics["unquantized.retention"] = (unquantized.metrics or {})["retention"]
    for source, keys in FINAL_METRICS_FROM.items():
        record = by_name.get(source.value)
        for key in keys:
            if record is not None and record.metrics and key in record.metrics:
                metrics[key] = record.metrics[key]
    if "teacherParameters" in metrics and "studentParameters" in metrics:
        teacher, student = int(metrics["teacherParameters"]), int(metrics["studentParameters"])
        metrics["parameterRatio"] = format(teacher / max(student, 1), ".4g")
    return metrics


def _serving(
    ctx: _Context, stages: list[StageStatus], gate_passed: bool
) -> tuple[ServingStatus | None, bool]:
    """Create or update the InferenceService for a student that passed; (status, ready)."""
    observed = ctx.observed.inference_service
    if ctx.spec.serve is None:
        if observed is not None:
            ctx.actions.delete_inference_services.append(observed["metadata"]["name"])
        return None, True
    if not gate_passed:
        return (
            ServingStatus(inference_service=observed["metadata"]["name"]) if observed else None
        ), False
    by_name = {s.name: s for s in stages}
    quantized = by_name.get(StageName.QUANTIZE.value)
    final = quantized or by_name[StageName.TRAIN.value]
    capability = (
        quantized.metrics.get("minComputeCapability") if quantized and quantized.metrics else None
    )
    desired = build_inference_service(
        dict(ctx.observed.body), ctx.spec, f"{final.artifact}/model", ctx.images, capability
    )
    name = desired["metadata"]["name"]
    if observed is None:
        ctx.actions.create.append(desired)
        return ServingStatus(inference_service=name), False
    written = (observed.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    if written != desired["metadata"]["annotations"][ANNOTATION_SPEC_HASH]:
        ctx.actions.apply.append(desired)
        return ServingStatus(inference_service=name), False
    conditions = (observed.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    url = (observed.get("status") or {}).get("url")
    return ServingStatus(inference_service=name, url=url, ready=ready), ready


def artifacts_to_probe(body: Mapping[str, Any], rayjobs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The artifacts whose manifests this reconcile can use, so storage is read only then:
    a stage whose RayJob succeeded but whose metrics are not recorded yet, and a stage about to
    start (inputs done, no RayJob yet) that may already be complete (reused, no RayJob needed).
    Running stages are KubeRay's to report; finished ones are in status."""
    try:
        plan = make_plan(DistillationSpec.model_validate(body.get("spec") or {}).pipeline())
    except ValueError:
        return []
    records = {
        (s.get("name"), s.get("fingerprint")): s
        for s in (body.get("status") or {}).get("stages") or []
    }
    jobs = [j for j in (parse_job(o) for o in rayjobs) if j is not None]
    done = {
        name
        for (name, fingerprint), record in records.items()
        if record.get("state") == StageState.SUCCEEDED.value
        and any(s.name.value == name and s.fingerprint == fingerprint for s in plan.stages)
    }
    uris = []
    for stage in plan.stages:
        record = records.get((stage.name.value, stage.fingerprint), {})
        if record.get("state") == StageState.SUCCEEDED.value and record.get("metrics"):
            continue
        mine = [
            j for j in jobs if j.stage == stage.name.value and j.fingerprint == stage.fingerprint
        ]
        succeeded = any(j.succeeded for j in mine)
        ready = not mine and all(i.value in done for i in stage.inputs)
        if succeeded or ready or stage.name.value in done:
            uris.append(plan.artifact(stage.name))
    return uris


def feasibility_problems(spec: DistillationSpec) -> list[str]:
    """What the schema allows but no cluster can run (reported, never retried)."""
    problems = []
    if spec.placement.cluster_selector and spec.quantize is not None:
        problems.append(
            "spec.quantize needs the quantize image (llm-compressor's pins conflict with the "
            "runtime's), but spec.placement.clusterSelector runs every stage on one existing "
            "RayCluster: remove quantize or clusterSelector"
        )
    if spec.serve is not None and spec.serve.gpus == 0 and spec.quantize is not None:
        scheme = spec.quantize.scheme.value
        problems.append(
            f"spec.serve.gpus is 0 but spec.quantize.scheme is {scheme}: vLLM runs "
            "compressed-tensors checkpoints on GPUs only; set serve.gpus >= 1 or drop quantize"
        )
    return problems


def reconcile(observed: Observed, images: Images) -> Actions:
    """The whole decision for one Distillation (see the module docstring)."""
    body = observed.body
    generation = int(body.get("metadata", {}).get("generation") or 0)
    old = DistillationStatus.model_validate(body.get("status") or {})
    actions = Actions()
    jobs = [j for j in (parse_job(o) for o in observed.rayjobs) if j is not None]
    try:
        spec = DistillationSpec.model_validate(body.get("spec") or {})
        plan = make_plan(spec.pipeline())
        problems = feasibility_problems(spec)
        if problems:
            raise ValueError("; ".join(problems))
    except (ValidationError, ValueError) as err:
        return _invalid(observed, old, jobs, generation, actions, err)

    ctx = _Context(observed, spec, plan, images, old, actions, jobs)
    _stop_stale(ctx)
    done: set[StageName] = set()
    stages: list[StageStatus] = []
    for stage in plan.stages:
        record = _stage_record(ctx, stage.name, done)
        if record.state is StageState.SUCCEEDED:
            done.add(stage.name)
        stages.append(record)

    started = [s.start_time for s in stages if s.start_time is not None]
    start_time = old.start_time or (min(started) if started else None)
    status = DistillationStatus(
        observed_generation=generation,
        stages=stages,
        start_time=start_time,
        progress=f"{len(done)}/{len(stages)}",
    )
    failed = [s for s in stages if s.state is StageState.FAILED]
    deadline = spec.policy.deadline_seconds
    overdue = (
        deadline is not None
        and start_time is not None
        and len(done) < len(stages)
        and observed.now >= start_time + timedelta(seconds=deadline)
    )
    if deadline is not None and start_time is not None and not overdue and len(done) < len(stages):
        actions.requeue((start_time + timedelta(seconds=deadline) - observed.now).total_seconds())
    if overdue:
        for job in jobs:
            if not job.finished and job.name not in actions.delete_rayjobs:
                actions.delete_rayjobs.append(job.name)
        actions.create = [c for c in actions.create if c["kind"] != "RayJob"]
        for record in stages:
            if record.state is not StageState.SUCCEEDED:
                record.state, record.message = StageState.FAILED, "policy.deadlineSeconds passed"

    running = [s.name for s in stages if s.state in (StageState.RUNNING, StageState.QUEUED)]
    status.current_stage = ",".join(running)[:63] or None
    status.metrics = _final_metrics(ctx, stages)
    all_done = len(done) == len(stages)
    gate = (status.metrics or {}).get("gatePassed") if all_done else None
    serving, served = (None, False)
    if all_done and not overdue:
        serving, served = _serving(ctx, stages, gate == "true")
    status.serving = serving
    if all_done:
        status.completion_time = max(
            (s.completion_time for s in stages if s.completion_time), default=observed.now
        )

    ready, reason, message, stalled = _summary(
        spec, stages, failed, bool(overdue), all_done, gate, served, deadline
    )
    status.phase = _phase(spec, failed, bool(overdue), all_done, gate, served, ready)
    conditions = _conditions(
        ctx, stages, ready, reason, message, stalled, serving, gate, generation
    )
    status.conditions = conditions
    if all_done and gate is None:
        actions.requeue(MANIFEST_RETRY_SECONDS)
    actions.status = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    actions.events.extend(_events(old, status))
    return actions


def _summary(
    spec: DistillationSpec,
    stages: list[StageStatus],
    failed: list[StageStatus],
    overdue: bool,
    all_done: bool,
    gate: str | None,
    served: bool,
    deadline: int | None,
) -> tuple[bool, str, str, bool]:
    """(ready, reason, message, stalled) of the whole Distillation."""
    if overdue:
        return (
            False,
            "DeadlineExceeded",
            f"not finished within policy.deadlineSeconds={deadline}",
            True,
        )
    if failed:
        first = failed[0]
        return False, "StageFailed", f"stage {first.name} failed: {first.message}", True
    if spec.policy.suspend and not all_done:
        return False, "Suspended", "spec.policy.suspend is true: no stage runs", False
    if not all_done:
        active = [s for s in stages if s.state is not StageState.SUCCEEDED]
        first = active[0]
        reason = {
            StageState.QUEUED: "Queued",
            StageState.RETRYING: "Retrying",
        }.get(first.state, "StageRunning" if first.state is StageState.RUNNING else "Pending")
        return False, reason, f"stage {first.name}: {first.message}", False
    if gate is None:
        return False, "GateUnknown", "the final evaluation's metrics could not be read yet", False
    if gate != "true":
        return False, "GateFailed", "the student did not pass evaluate.gate", True
    if spec.serve is not None and not served:
        return False, "Serving", "waiting for the InferenceService to become ready", False
    return (
        True,
        "Succeeded" if spec.serve is None else "Served",
        "the student passed its gate",
        False,
    )


def _phase(
    spec: DistillationSpec,
    failed: list[StageStatus],
    overdue: bool,
    all_done: bool,
    gate: str | None,
    served: bool,
    ready: bool,
) -> Phase:
    if overdue or failed or (all_done and gate is not None and gate != "true"):
        return Phase.FAILED
    if ready:
        return Phase.SUCCEEDED
    if spec.policy.suspend and not all_done:
        return Phase.SUSPENDED
    return Phase.RUNNING


def _conditions(
    ctx: _Context,
    stages: list[StageStatus],
    ready: bool,
    reason: str,
    message: str,
    stalled: bool,
    serving: ServingStatus | None,
    gate: str | None,
    generation: int,
) -> list[Condition]:
    old = _conditions_by_type(ctx.old)
    new: dict[str, Condition] = {}
    now, t, f = ctx.now, ConditionStatus.TRUE, ConditionStatus.FALSE

    def put(type_: str, ok: bool, why: str, text: str) -> None:
        set_condition(old, new, type_, t if ok else f, why, text, generation, now)

    put(CONDITION_READY, ready, reason, message)
    put(
        CONDITION_RECONCILING,
        not ready and not stalled,
        reason if not ready and not stalled else "Idle",
        message if not ready and not stalled else "",
    )
    put(
        CONDITION_STALLED, stalled, reason if stalled else "Progressing", message if stalled else ""
    )
    for record in stages:
        ok = record.state is StageState.SUCCEEDED
        put(STAGE_CONDITIONS[StageName(record.name)], ok, record.state.value, record.message or "")
    if ctx.spec.serve is not None:
        ok = serving is not None and serving.ready
        why = "Ready" if ok else ("GateFailed" if gate == "false" else "NotReady")
        put(CONDITION_SERVED, ok, why, serving.url or "" if serving else "")
    return list(new.values())


def _events(old: DistillationStatus, new: DistillationStatus) -> list[Event]:
    """Events for what changed: stage transitions and the summary."""
    before = {s.name: s for s in old.stages or []}
    events: list[Event] = []
    reasons = {
        StageState.RUNNING: ("Normal", "StageStarted"),
        StageState.QUEUED: ("Normal", "StageQueued"),
        StageState.RETRYING: ("Warning", "StageRetrying"),
        StageState.SUSPENDED: ("Normal", "StageSuspended"),
        StageState.SUCCEEDED: ("Normal", "StageSucceeded"),
        StageState.FAILED: ("Warning", "StageFailed"),
    }
    for record in new.stages or []:
        prev = before.get(record.name)
        changed = (
            prev is None
            or prev.state is not record.state
            or prev.fingerprint != record.fingerprint
            or (record.state is StageState.RUNNING and prev.ray_job != record.ray_job)
        )
        if changed and record.state in reasons:
            kind, reason = reasons[record.state]
            events.append(
                Event(kind, reason, f"{record.name}: {record.message or record.state.value}")
            )
    old_ready = _conditions_by_type(old).get(CONDITION_READY)
    new_ready = _conditions_by_type(new).get(CONDITION_READY)
    if new_ready is not None and (
        old_ready is None
        or (old_ready.status, old_ready.reason) != (new_ready.status, new_ready.reason)
    ):
        if new_ready.status is ConditionStatus.TRUE:
            events.append(Event("Normal", new_ready.reason, new_ready.message))
        elif new_ready.reason in {"GateFailed", "StageFailed", "DeadlineExceeded", "InvalidSpec"}:
            events.append(Event("Warning", new_ready.reason, new_ready.message))
    return events


def _invalid(
    observed: Observed,
    old: DistillationStatus,
    jobs: list[Job],
    generation: int,
    actions: Actions,
    err: Exception,
) -> Actions:
    """A spec the schema let through but that cannot run: Failed and Stalled, nothing retried,
    running RayJobs stopped (they belong to a spec that no longer exists)."""
    message = _spec_error(err)
    actions.delete_rayjobs = [j.name for j in jobs if not j.finished]
    old_conditions = _conditions_by_type(old)
    new: dict[str, Condition] = {}
    for type_, value, reason, text in (
        (CONDITION_READY, ConditionStatus.FALSE, "InvalidSpec", message),
        (CONDITION_RECONCILING, ConditionStatus.FALSE, "InvalidSpec", ""),
        (CONDITION_STALLED, ConditionStatus.TRUE, "InvalidSpec", message),
    ):
        set_condition(old_conditions, new, type_, value, reason, text, generation, observed.now)
    status = old.model_copy(deep=True)
    status.observed_generation = generation
    status.phase = Phase.FAILED
    status.current_stage = None
    status.conditions = list(new.values())
    actions.status = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    actions.events.extend(_events(old, status))
    return actions


def _spec_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        parts = []
        for problem in err.errors():
            where = ".".join(str(p) for p in problem["loc"])
            parts.append(f"spec.{where}: {problem['msg']}" if where else problem["msg"])
        return ("; ".join(parts))[:MESSAGE_LIMIT]
    return str(err)[:MESSAGE_LIMIT]
