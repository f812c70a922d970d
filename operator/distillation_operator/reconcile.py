"""Reconcile: (a Distillation, what exists now) -> what to create, stop and report. Pure.

Observe -> decide -> report: ``observed`` holds what exists, this module decides, ``report``
turns the decision into status and Events.

Level-based: every call derives the whole decision from the object, its observed RayJobs and
InferenceService, the artifacts the operator could read and the clock, never from the event that
triggered it. So a repeated call, an operator restart or a missed event changes nothing: RayJob
names are deterministic (create is create-or-get), a finished stage is recognised from its
RayJob or its artifact, and events are emitted for status *changes* only.

The spec is parsed and planned once (``understand``); the same per-stage classification decides
each stage and which artifacts are worth reading from storage (``artifacts_to_probe``).

Each stage is a small state machine over KubeRay's states (``Situation``): stages run as soon as
their inputs are done (prune and generate together; quantize beside evaluate); a failed attempt
is retried as a new RayJob after ``backoffSeconds * 2**(failures-1)`` until ``policy.retries``
is spent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from distillation_operator import report
from distillation_operator.actions import Actions, Event
from distillation_operator.api import (
    DeadlineClock,
    DistillationSpec,
    DistillationStatus,
    EventReason,
    Reason,
    ServeSpec,
    ServingAPI,
    ServingStatus,
    StageProgress,
    StageState,
    StageStatus,
)
from distillation_operator.builders.common import ANNOTATION_SPEC_HASH, LABEL_STAGE, Images
from distillation_operator.builders.inference_service import (
    INFERENCE_SERVICE_API,
    build_inference_service,
)
from distillation_operator.builders.llm_inference_service import (
    LLM_INFERENCE_SERVICE_API,
    build_llm_inference_service,
)
from distillation_operator.builders.rayjob import (
    KUEUE_GROUP,
    RAYJOB_API,
    build_rayjob,
    stage_workers,
)
from distillation_operator.observed import MESSAGE_LIMIT, Artifact, Job, Observed, parse_jobs
from distillation_runtime.plan import Plan, Stage, make_plan
from distillation_runtime.progress import progress_uri
from distillation_runtime.spec import GenerateBackend
from distillation_runtime.stages import MODEL_DIR, ImageKind, Role, spec_problems

__all__ = [
    "Understanding",
    "artifacts_to_probe",
    "feasibility_problems",
    "progress_to_probe",
    "reconcile",
    "retry_delay",
    "understand",
]

MANIFEST_RETRY_SECONDS = 60.0
"""How soon to look again for a manifest the operator could not read."""
MISSING_API_POLL_SECONDS = 15.0
"""How soon to look again for an API the spec needs (installed meanwhile: resume by itself)."""
PROGRESS_POLL_SECONDS = 30.0
"""How often a running stage's progress record is read again (so at most one status write per
stage per 30 s for progress alone)."""
SHARED_CLUSTER_POLL_SECONDS = 5.0
"""How soon to look again for a stopped driver on a shared RayCluster (its deletion event
wakes the operator anyway; this is the fallback)."""


# --------------------------------------------------------------------------------------------
# The spec, parsed and planned once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Understanding:
    """A Distillation's spec parsed and planned, its old status, and its RayJobs parsed."""

    spec: DistillationSpec
    plan: Plan
    old: DistillationStatus
    jobs: list[Job]
    generation: int

    def record(self, stage: Stage) -> StageStatus | None:
        """The old status's record of this (stage, fingerprint), if any."""
        for record in self.old.stages or []:
            if record.name == stage.name and record.fingerprint == stage.fingerprint:
                return record
        return None

    def jobs_of(self, stage: Stage) -> list[Job]:
        """This stage's RayJobs for its current fingerprint, oldest attempt first."""
        mine = [
            j for j in self.jobs if j.stage == stage.name and j.fingerprint == stage.fingerprint
        ]
        return sorted(mine, key=lambda j: j.attempt)


@dataclass(frozen=True)
class SpecProblem:
    """Why a spec the schema let through cannot run."""

    old: DistillationStatus
    jobs: list[Job]
    generation: int
    message: str


def feasibility_problems(spec: DistillationSpec, plan: Plan) -> list[str]:
    """What the schema allows but no cluster can run (reported, never retried)."""
    problems = []
    quantize_image = [s.name for s in plan.stages if s.definition.image is ImageKind.QUANTIZE]
    if spec.placement.cluster_selector and quantize_image:
        problems.append(
            f"spec.quantize needs the quantize image (stages {', '.join(quantize_image)}: "
            "llm-compressor's pins conflict with the runtime's), but spec.placement."
            "clusterSelector runs every stage on one existing RayCluster: remove quantize or "
            "clusterSelector"
        )
    generate_gpus = stage_workers(spec, "generate").gpus or 0
    if spec.generate.backend is GenerateBackend.VLLM and generate_gpus == 0:
        problems.append(
            "spec.generate.backend is vllm but the generate stage's pods have no GPUs "
            "(placement.stages.generate.gpus, else placement.workers.gpus, is 0): vLLM runs on "
            "GPUs only; give the generate stage GPUs, or set generate.backend to transformers "
            "or auto"
        )
    problems += training_problems(spec)
    if spec.serve is not None and spec.serve.gpus == 0 and spec.serve.args:
        problems.append(
            f"spec.serve.args {list(spec.serve.args)} are vLLM flags, but with spec.serve.gpus 0 "
            "the student is served by `distill serve` (transformers on the CPU), which takes "
            "none: remove serve.args or give serve.gpus >= 1"
        )
    return problems


def training_problems(spec: DistillationSpec) -> list[str]:
    """Ray Train settings no cluster runs: its workers on separate disks, or fewer pods than
    workers (Ray Train would wait for the missing ones forever)."""
    workers = spec.train.workers
    if workers <= 1 or spec.placement.cluster_selector:
        return []
    problems = []
    if not spec.output.startswith("pvc://"):
        problems.append(
            f"spec.train.workers is {workers} with spec.output {spec.output}: Ray Train's rank 0 "
            "saves checkpoints and the model where every Ray pod can read them, so the output "
            "must be a pvc:// claim every pod mounts (ReadWriteMany); use a pvc:// output or "
            "train.workers: 1"
        )
    pods = stage_workers(spec, "train").replicas
    if pods is not None and pods < workers:
        problems.append(
            f"spec.train.workers is {workers} but the train stage has {pods} worker pod(s) "
            "(placement.stages.train.replicas, else placement.workers.replicas): Ray Train puts "
            "one worker on each pod; give it at least train.workers pods"
        )
    return problems


def spec_error(err: Exception) -> str:
    """A spec problem as one message naming each field."""
    if isinstance(err, ValidationError):
        parts = []
        for problem in err.errors():
            where = ".".join(str(p) for p in problem["loc"])
            parts.append(f"spec.{where}: {problem['msg']}" if where else problem["msg"])
        return ("; ".join(parts))[:MESSAGE_LIMIT]
    return str(err)[:MESSAGE_LIMIT]


def understand(
    body: Mapping[str, Any], rayjobs: Sequence[Mapping[str, Any]]
) -> Understanding | SpecProblem:
    """Parse and plan the spec once for this reconcile (or say why it cannot run)."""
    generation = int(body.get("metadata", {}).get("generation") or 0)
    old = DistillationStatus.model_validate(body.get("status") or {})
    jobs = parse_jobs(rayjobs)
    try:
        spec = DistillationSpec.model_validate(body.get("spec") or {})
        plan = make_plan(spec.pipeline())
        problems = feasibility_problems(spec, plan)
        if problems:
            raise ValueError("; ".join(problems))
    except (ValidationError, ValueError) as err:
        return SpecProblem(old, jobs, generation, spec_error(err))
    return Understanding(spec, plan, old, jobs, generation)


# --------------------------------------------------------------------------------------------
# One stage: where it is, as a state machine over KubeRay's states
# --------------------------------------------------------------------------------------------


class Situation(StrEnum):
    """Where a stage is, from its old record, its RayJobs, its artifact and its inputs."""

    RECORDED = "recorded"
    """The status already says Succeeded."""
    SUCCEEDED = "succeeded"
    """Its latest RayJob succeeded, or a complete artifact is there (reused, no RayJob)."""
    ACTIVE = "active"
    """Its latest RayJob is under way (running, queued, suspended)."""
    WAITING = "waiting"
    """An input is not done."""
    EXHAUSTED = "exhausted"
    """Its latest RayJob failed and no retry is left."""
    BACKING_OFF = "backing-off"
    """Its latest RayJob failed; the next attempt waits for the backoff (or for a resume)."""
    RETRY = "retry"
    """Its latest RayJob failed and the backoff is over: a new attempt starts."""
    HELD = "held"
    """It could start, but spec.policy.suspend holds it."""
    START = "start"
    """No RayJob yet and its inputs are done: the first attempt starts."""
    UNNEEDED = "unneeded"
    """A ``first`` stage (the preflight) whose every other stage is already done: nothing left
    to check for (a pipeline finished before the operator had a preflight)."""


PROBED = frozenset({Situation.SUCCEEDED, Situation.HELD, Situation.START})
"""Situations whose artifact is worth reading: a succeeded RayJob's metrics, and a stage about to
start that may already be complete (reused without a RayJob). Running stages are KubeRay's to
report; finished ones are in status."""


@dataclass(frozen=True)
class StageView:
    """Everything known about one planned stage in this reconcile."""

    stage: Stage
    previous: StageStatus | None
    jobs: list[Job]
    artifact: Artifact | None
    waiting_for: list[str]
    guards_done: bool = False
    """For a ``first`` stage: every stage it guards is already recorded done."""

    @property
    def refused(self) -> list[str]:
        """Why its artifact says the spec cannot run (the preflight's findings)."""
        return spec_problems(self.artifact.metrics) if self.artifact is not None else []

    @property
    def latest(self) -> Job | None:
        return self.jobs[-1] if self.jobs else None

    @property
    def failed_attempts(self) -> list[int]:
        """Every failed attempt at this fingerprint: those the status recorded (their RayJobs
        may be gone: TTL, or a person) and those failed now."""
        recorded = set(self.previous.failed_attempts or []) if self.previous else set()
        return sorted(recorded | {j.attempt for j in self.jobs if j.failed})

    @property
    def failures(self) -> int:
        return len(self.failed_attempts)

    @property
    def last_attempt(self) -> int:
        recorded = self.previous.attempts if self.previous else 0
        return max(recorded, self.latest.attempt if self.latest else 0)

    @property
    def newest(self) -> Job | None:
        """The RayJob of the newest attempt, while it exists and is not being deleted (a deleted
        one was stopped on purpose: suspended, replaced)."""
        latest = self.latest
        if latest is None or latest.deleting or latest.attempt < self.last_attempt:
            return None
        return latest

    @property
    def last_failed(self) -> bool:
        """Whether the newest attempt failed (its RayJob may be gone since)."""
        newest = self.newest
        if newest is not None:
            return newest.failed
        return self.last_attempt in self.failed_attempts

    def failure(self) -> str:
        """What failed, in KubeRay's words while its RayJob exists."""
        newest = self.newest
        if newest is not None:
            return f"{newest.name} failed ({newest.why()})"
        job = self.previous.ray_job if self.previous else None
        return f"{job or 'attempt ' + str(self.last_attempt)} failed"

    @property
    def failed_at(self) -> datetime | None:
        newest = self.newest
        if newest is not None and newest.end is not None:
            return newest.end
        return self.previous.completion_time if self.previous else None


def retry_delay(backoff_seconds: int, failures: int) -> float:
    """Exponential backoff: the first retry waits ``backoff_seconds``, each next one twice that."""
    return float(backoff_seconds * 2 ** max(failures - 1, 0))


def retry_at(view: StageView, spec: DistillationSpec, now: datetime) -> datetime:
    """When the next attempt after a failed one may start."""
    failed_at = view.failed_at or now
    return failed_at + timedelta(seconds=retry_delay(spec.policy.backoff_seconds, view.failures))


def classify(view: StageView, spec: DistillationSpec, now: datetime) -> Situation:
    """The stage's situation (first match wins)."""
    newest, artifact = view.newest, view.artifact
    reusable = artifact is not None and artifact.complete
    if view.previous is not None and view.previous.state is StageState.SUCCEEDED:
        return Situation.RECORDED
    if view.guards_done and newest is None and not reusable:
        return Situation.UNNEEDED
    if newest is not None and newest.succeeded:
        return Situation.SUCCEEDED
    if reusable and not view.last_failed:
        return Situation.SUCCEEDED
    if newest is not None and not newest.failed:
        return Situation.ACTIVE
    if view.waiting_for:
        return Situation.WAITING
    if view.last_failed:
        if view.failures > spec.policy.retries:
            return Situation.EXHAUSTED
        if spec.policy.suspend or now < retry_at(view, spec, now):
            return Situation.BACKING_OFF
        return Situation.RETRY
    return Situation.HELD if spec.policy.suspend else Situation.START


@dataclass
class Decision:
    """The decision under way: what the transitions add to."""

    understood: Understanding
    observed: Observed
    images: Images
    actions: Actions
    refused: list[str] = field(default_factory=list)
    """Why a stage found the spec cannot run (the preflight): the Distillation's InvalidSpec."""

    @property
    def spec(self) -> DistillationSpec:
        return self.understood.spec

    @property
    def now(self) -> datetime:
        return self.observed.now


def running_message(job: str, attempt: int, deployment: str) -> str:
    """The message of a running stage: the same text from creation until KubeRay reports
    progress, so a RayJob's own creation event changes nothing in status."""
    return f"{job} (attempt {attempt}): {deployment or 'created'}"


def success_message(record: StageStatus, artifact: Artifact | None) -> str:
    """How a stage succeeded, and why its metrics are missing if the operator cannot read them
    (no access to the store, say): the person fixing it reads the store's own error here."""
    done = (
        f"{record.ray_job} succeeded"
        if record.ray_job
        else f"reused complete artifact {record.artifact}"
    )
    if record.metrics is None and artifact is not None and artifact.error:
        return f"{done}; {report.UNREADABLE_MANIFEST}: {artifact.error}"
    return done


def keep_recorded(d: Decision, view: StageView, record: StageStatus) -> None:
    """Succeeded before: keep it; fill in metrics an earlier read could not get."""
    if record.metrics is None and view.artifact is not None:
        if view.artifact.complete:
            record.metrics = report.metric_strings(view.artifact.metrics)
        record.message = success_message(record, view.artifact)


def record_success(d: Decision, view: StageView, record: StageStatus) -> None:
    """Its RayJob succeeded (or its artifact was already complete): Succeeded, with the
    manifest's metrics when readable (else looked for again soon)."""
    latest, artifact = view.newest, view.artifact
    record.state = StageState.SUCCEEDED
    record.completion_time = (latest.end if latest and latest.end else None) or d.now
    record.start_time = record.start_time or (latest.start if latest else None) or d.now
    record.ray_job = latest.name if latest is not None else None
    if artifact is not None and artifact.complete:
        record.metrics = report.metric_strings(artifact.metrics)
    else:
        record.metrics = None
        d.actions.requeue(MANIFEST_RETRY_SECONDS)
    record.message = success_message(record, artifact)
    record.progress = None  # done: the metrics say the rest
    if view.refused:
        record.state = StageState.FAILED
        record.message = (f"{SPEC_REFUSED}: " + "; ".join(view.refused))[:MESSAGE_LIMIT]
        d.refused.append(record.message)
    elif view.stage.definition.first and record.metrics is None:
        # its verdict is in the manifest: nothing it guards starts before it is read
        record.state = StageState.RUNNING
        record.message += "; the stages after it wait until its result is read"


SPEC_REFUSED = "the spec cannot run with these models and data"


def skip_unneeded(d: Decision, view: StageView, record: StageStatus) -> None:
    """Nothing left to check for: Succeeded without a RayJob."""
    record.state = StageState.SUCCEEDED
    record.completion_time = record.start_time = d.now
    record.message = "not run: every stage after it was already done"


def follow_active(d: Decision, view: StageView, record: StageStatus) -> None:
    """Report a RayJob under way; suspend or resume it to match spec.policy.suspend."""
    latest = view.newest
    assert latest is not None
    record.ray_job = latest.name
    record.start_time = record.start_time or latest.start or latest.created or d.now
    if d.spec.policy.suspend:
        hold_active(d, latest, record)
    elif latest.held and latest.kueue and not latest.suspend:
        record.state = StageState.RUNNING  # Kueue has just admitted it
        record.message = running_message(latest.name, latest.attempt, latest.deployment)
    elif latest.held and latest.kueue:
        record.state = StageState.QUEUED
        record.message = f"{latest.name} waits for Kueue to admit it"
    else:
        if latest.suspend and not latest.kueue:
            d.actions.suspend_rayjobs[latest.name] = False
        record.state = StageState.RUNNING
        record.message = running_message(latest.name, latest.attempt, latest.deployment)
        uri = progress_uri(d.understood.plan.artifact(view.stage.name))
        written = stage_progress(d.observed.progress.get(uri)) or record.progress
        record.progress = this_attempts_progress(written, latest.created)
        d.actions.requeue(PROGRESS_POLL_SECONDS)


def hold_active(d: Decision, job: Job, record: StageStatus) -> None:
    """Suspend a running stage: KubeRay tears its cluster down and re-submits on resume.
    Kueue owns ``suspend`` of the jobs it manages, and KubeRay refuses ``suspend`` on a job
    that runs on an existing RayCluster (clusterSelector), so those are stopped instead."""
    if job.kueue or d.spec.placement.cluster_selector:
        d.actions.stop(job.name)
    elif not job.suspend:
        d.actions.suspend_rayjobs[job.name] = True
    record.state = StageState.SUSPENDED
    record.message = f"{job.name} suspended (spec.policy.suspend)"


def wait_for_inputs(d: Decision, view: StageView, record: StageStatus) -> None:
    record.state = StageState.PENDING
    record.message = "waits for " + ", ".join(view.waiting_for)


def fail_stage(d: Decision, view: StageView, record: StageStatus) -> None:
    """Out of retries: Failed with KubeRay's reason and message."""
    if view.newest is not None:
        record.ray_job = view.newest.name
    record.state = StageState.FAILED
    record.completion_time = record.completion_time or view.failed_at or d.now
    record.message = (
        f"{view.failure()}; {view.failures} attempt(s) failed, "
        f"policy.retries is {d.spec.policy.retries}"
    )


def back_off(d: Decision, view: StageView, record: StageStatus) -> None:
    """A failed attempt whose retry waits for the backoff (Retrying) or for a resume
    (Suspended)."""
    suspended = d.spec.policy.suspend
    wait_until = retry_at(view, d.spec, d.now)
    if view.newest is not None:
        record.ray_job = view.newest.name
    record.state = StageState.SUSPENDED if suspended else StageState.RETRYING
    record.completion_time = view.failed_at or d.now
    record.message = (
        f"{view.failure()}; attempt {view.last_attempt + 1} of "
        f"{d.spec.policy.retries + 1} starts at {wait_until.isoformat(timespec='seconds')}"
    )
    if not suspended:
        d.actions.requeue((wait_until - d.now).total_seconds())


def hold_new(d: Decision, view: StageView, record: StageStatus) -> None:
    record.state = StageState.SUSPENDED
    record.message = "suspended (spec.policy.suspend); starts when resumed"


def still_running_on_shared_cluster(d: Decision, stage: str) -> Job | None:
    """On an existing RayCluster (clusterSelector) a stopped RayJob's driver may still run
    until KubeRay's finalizer stops it: the stage's RayJob that is not finished yet, if any."""
    if not d.spec.placement.cluster_selector:
        return None
    live = [j for j in d.understood.jobs if j.stage == stage and (j.deleting or not j.finished)]
    return live[0] if live else None


def running_stages(d: Decision) -> list[str]:
    """Stages with a RayJob running now or created by this decision, in plan order: what
    ``policy.maxParallelStages`` counts (a stopping or finished RayJob's cluster is on its way
    out, so it does not count)."""
    live = {j.stage for j in d.understood.jobs if not j.finished and not j.deleting}
    live |= {
        child["metadata"]["labels"][LABEL_STAGE]
        for child in d.actions.create
        if child.get("kind") == "RayJob"
    }
    return [s.name for s in d.understood.plan.stages if s.name in live]


def parallel_limit_message(d: Decision) -> str | None:
    """Why no further stage may start now (``policy.maxParallelStages`` reached), or None."""
    limit = d.spec.policy.max_parallel_stages
    running = running_stages(d)
    if limit is None or len(running) < limit:
        return None
    return f"waits for {', '.join(running)} to finish (spec.policy.maxParallelStages is {limit})"


def start_attempt(d: Decision, view: StageView, record: StageStatus) -> None:
    """Create the next attempt's RayJob. Attempts are numbered across fingerprints, so a
    replaced stage's new RayJob never reuses a name that may still be terminating; on a shared
    RayCluster it waits until the previous driver is gone; it waits, too, while
    ``policy.maxParallelStages`` stages run (the RayJob event of one finishing wakes it)."""
    name = view.stage.name
    blocking = still_running_on_shared_cluster(d, name)
    if blocking is not None:
        record.state = StageState.PENDING
        record.message = f"waits for {blocking.name} to stop on the shared RayCluster"
        d.actions.requeue(SHARED_CLUSTER_POLL_SECONDS)
        return
    if (full := parallel_limit_message(d)) is not None:
        record.state = StageState.PENDING
        record.message = full
        return
    earlier = [j.attempt for j in d.understood.jobs if j.stage == name]
    attempt = max([record.attempts, *earlier]) + 1
    u = d.understood
    rayjob = build_rayjob(dict(d.observed.body), u.spec, u.plan, name, attempt, d.images)
    d.actions.create.append(rayjob)
    record.attempts = attempt
    record.ray_job = rayjob["metadata"]["name"]
    record.state = StageState.RUNNING
    record.start_time = record.start_time or d.now
    record.completion_time = None
    record.message = running_message(record.ray_job, attempt, "")


Transition = Callable[[Decision, StageView, StageStatus], None]
TRANSITIONS: dict[Situation, Transition] = {
    Situation.RECORDED: keep_recorded,
    Situation.SUCCEEDED: record_success,
    Situation.ACTIVE: follow_active,
    Situation.WAITING: wait_for_inputs,
    Situation.EXHAUSTED: fail_stage,
    Situation.BACKING_OFF: back_off,
    Situation.RETRY: start_attempt,
    Situation.HELD: hold_new,
    Situation.START: start_attempt,
    Situation.UNNEEDED: skip_unneeded,
}


def stage_view(
    understood: Understanding, stage: Stage, artifacts: Mapping[str, Artifact], done: set[str]
) -> StageView:
    """What is known of ``stage``, with ``done`` the stages that count as succeeded."""
    guards_done = False
    if stage.definition.first:
        recorded = recorded_done(understood)
        guarded = [s.name for s in understood.plan.stages if stage.name in s.after]
        guards_done = all(name in recorded for name in guarded)
    return StageView(
        stage=stage,
        previous=understood.record(stage),
        jobs=understood.jobs_of(stage),
        artifact=artifacts.get(understood.plan.artifact(stage.name)),
        waiting_for=[i for i in stage.waits_for if i not in done],
        guards_done=guards_done,
    )


def decide_stage(d: Decision, view: StageView) -> StageStatus:
    """The stage's new record: its old one carried on through the transition of its situation."""
    previous = view.previous
    record = (
        previous.model_copy(deep=True)
        if previous is not None
        else StageStatus(
            name=view.stage.name, state=StageState.PENDING, fingerprint=view.stage.fingerprint
        )
    )
    record.artifact = d.understood.plan.artifact(view.stage.name)
    situation = classify(view, d.spec, d.now)
    if situation is not Situation.RECORDED:
        record.attempts = view.last_attempt
        record.failed_attempts = view.failed_attempts or None
    TRANSITIONS[situation](d, view, record)
    return record


def recorded_done(understood: Understanding) -> set[str]:
    """The stages the old status already records as Succeeded (at their current fingerprint)."""
    return {
        stage.name
        for stage in understood.plan.stages
        if (record := understood.record(stage)) is not None and record.state is StageState.SUCCEEDED
    }


def probed(view: StageView, spec: DistillationSpec, now: datetime) -> bool:
    """Whether this stage's artifact is worth reading before deciding (see ``PROBED``); a
    recorded stage only when its metrics are missing."""
    if view.previous is not None and view.previous.state is StageState.SUCCEEDED:
        return not view.previous.metrics
    return classify(view, spec, now) in PROBED


def progress_to_probe(understood: Understanding | SpecProblem, now: datetime) -> list[str]:
    """Where the stages under way write how far they are (read at most every
    ``PROGRESS_POLL_SECONDS``: reconcile looks again that often while one runs)."""
    if isinstance(understood, SpecProblem):
        return []
    done = recorded_done(understood)
    views = [stage_view(understood, stage, {}, done) for stage in understood.plan.stages]
    return [
        progress_uri(understood.plan.artifact(view.stage.name))
        for view in views
        if classify(view, understood.spec, now) is Situation.ACTIVE
    ]


def stage_progress(record: Mapping[str, Any] | None) -> StageProgress | None:
    """A stage's progress record as status (None when there is none or it is not readable)."""
    if not record:
        return None
    try:
        return StageProgress(
            done=int(record["done"]),
            total=int(record["total"]) if record.get("total") is not None else None,
            unit=str(record.get("unit", ""))[:32],
            percent=report.decimal(record.get("percent")),
            eta_seconds=int(record["etaSeconds"]) if record.get("etaSeconds") is not None else None,
            loss=report.decimal(record.get("loss")),
            updated=record.get("updated"),
        )
    except (KeyError, TypeError, ValueError):
        return None


def this_attempts_progress(
    progress: StageProgress | None, attempt_created: datetime | None
) -> StageProgress | None:
    """``progress`` unless an earlier attempt wrote it: the record is named by stage and
    fingerprint, not by attempt, so a retry finds the failed attempt's last record (train 100%,
    say) until its own first write; one updated before this attempt's RayJob was created is
    not shown."""
    if progress is None or progress.updated is None or attempt_created is None:
        return progress
    return None if progress.updated < attempt_created else progress


def artifacts_to_probe(understood: Understanding | SpecProblem, now: datetime) -> list[str]:
    """The artifacts whose manifests this reconcile can use, so storage is read only then: the
    same classification that decides the stages, taken before anything is read (the stages done
    are those the status records)."""
    if isinstance(understood, SpecProblem):
        return []
    done = recorded_done(understood)
    views = [stage_view(understood, stage, {}, done) for stage in understood.plan.stages]
    return [
        understood.plan.artifact(view.stage.name)
        for view in views
        if probed(view, understood.spec, now)
    ]


# --------------------------------------------------------------------------------------------
# The whole Distillation
# --------------------------------------------------------------------------------------------


def stop_replaced(d: Decision) -> None:
    """Stop RayJobs whose (stage, fingerprint) the plan no longer has: a spec edit replaced
    them, and running them on would only write an artifact nobody reads."""
    planned = {(s.name, s.fingerprint) for s in d.understood.plan.stages}
    for job in d.understood.jobs:
        if (job.stage, job.fingerprint) not in planned and not job.finished and not job.deleting:
            d.actions.stop(job.name)
            d.actions.events.append(
                Event(
                    "Normal",
                    EventReason.STAGE_REPLACED,
                    f"{job.name} stopped: the spec changed its stage",
                )
            )


def decide_stages(d: Decision) -> list[StageStatus]:
    """Every planned stage, in plan order; a stage succeeded now counts as done for the next."""
    done: set[str] = set()
    records = []
    for stage in d.understood.plan.stages:
        view = stage_view(d.understood, stage, d.observed.artifacts, done)
        record = decide_stage(d, view)
        if record.state is StageState.SUCCEEDED:
            done.add(stage.name)
        records.append(record)
    return records


def deadline_clock(
    old: DeadlineClock | None, generation: int, suspended: bool, finished: bool, now: datetime
) -> DeadlineClock | None:
    """The clock ``policy.deadlineSeconds`` runs on: it starts with the work of each new
    generation (an edit weeks later is not overdue at once) and stops while suspended."""
    if finished:
        return old
    clock = (
        old.model_copy()
        if old is not None and old.generation == generation
        else DeadlineClock(generation=generation, started=now)
    )
    if suspended and clock.suspended_since is None:
        clock.suspended_since = now
    elif not suspended and clock.suspended_since is not None:
        clock.suspended_seconds += int((now - clock.suspended_since).total_seconds())
        clock.suspended_since = None
    return clock


def seconds_left(clock: DeadlineClock | None, deadline: int | None, now: datetime) -> float | None:
    """Working time left before ``policy.deadlineSeconds``; None when there is no deadline or the
    clock stands (suspended)."""
    if clock is None or deadline is None or clock.suspended_since is not None:
        return None
    used = (now - clock.started).total_seconds() - clock.suspended_seconds
    return deadline - used


def enforce_deadline(d: Decision, stages: list[StageStatus]) -> None:
    """Past the deadline: stop the running RayJobs, start none, fail what is unfinished."""
    for job in d.understood.jobs:
        if not job.finished:
            d.actions.stop(job.name)
    d.actions.create = [c for c in d.actions.create if c["kind"] != "RayJob"]
    for record in stages:
        if record.state is not StageState.SUCCEEDED:
            record.state, record.message = StageState.FAILED, "policy.deadlineSeconds passed"


SERVING_KINDS = ("InferenceService", "LLMInferenceService")
"""The kinds a student is served by (``serve.api``)."""
SERVING_API_VERSIONS = {
    ServingAPI.INFERENCE_SERVICE: INFERENCE_SERVICE_API,
    ServingAPI.LLM_INFERENCE_SERVICE: LLM_INFERENCE_SERVICE_API,
}


def serving_api(serve: ServeSpec, served: frozenset[str] | None) -> ServingAPI:
    """``serve.api``, else the one the cluster serves (InferenceService when it serves both, or
    when it is unknown or serves neither: then ``missing_apis`` says so)."""
    if serve.api is not None:
        return serve.api
    only_llm = (
        served is not None
        and INFERENCE_SERVICE_API not in served
        and LLM_INFERENCE_SERVICE_API in served
    )
    return ServingAPI.LLM_INFERENCE_SERVICE if only_llm else ServingAPI.INFERENCE_SERVICE


def serve(
    d: Decision, stages: list[StageStatus], gate_passed: bool
) -> tuple[ServingStatus | None, bool]:
    """Create or update what serves a student that passed (the plan's last student stage:
    quantised when quantised); (its status, whether it is ready). A failed gate leaves the
    student already serving as it is. Switching ``serve.api`` creates the new kind and deletes
    the old one only once the new one is ready, so the student keeps answering meanwhile."""
    observed = list(d.observed.serving)
    if d.spec.serve is None:
        d.actions.delete_serving += [(o["kind"], o["metadata"]["name"]) for o in observed]
        return None, True
    api = serving_api(d.spec.serve, d.observed.served)
    current = next((o for o in observed if o.get("kind") == api.value), None)
    others = [o for o in observed if o.get("kind") != api.value]
    if not gate_passed:  # whatever served before serves on, untouched
        serving = current or (others[0] if others else None)
        if serving is None:
            return None, False
        before = ServingStatus(
            inference_service=serving["metadata"]["name"],
            kind=serving.get("kind"),
            url=(serving.get("status") or {}).get("url"),
            ready=inference_service_ready(serving),
        )
        return before, False
    student = d.understood.plan.last(Role.STUDENT)
    assert student is not None, "every plan has a student stage"
    record = next(s for s in stages if s.name == student.name)
    capability = (record.metrics or {}).get("minComputeCapability")
    build = (
        build_llm_inference_service
        if api is ServingAPI.LLM_INFERENCE_SERVICE
        else build_inference_service
    )
    desired = build(
        dict(d.observed.body), d.spec, f"{record.artifact}/{MODEL_DIR}", d.images, capability
    )
    name = desired["metadata"]["name"]
    status = ServingStatus(inference_service=name, kind=api.value)
    if current is None:
        d.actions.create.append(desired)
        return status, False
    written = (current.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    if written != desired["metadata"]["annotations"][ANNOTATION_SPEC_HASH]:
        d.actions.apply.append(desired)
        return status, False
    ready = inference_service_ready(current)
    if ready:
        d.actions.delete_serving += [(o["kind"], o["metadata"]["name"]) for o in others]
    status.url, status.ready = (current.get("status") or {}).get("url"), ready
    return status, ready


def inference_service_ready(observed: Mapping[str, Any]) -> bool:
    """KServe reports Ready for the spec it has seen: a Ready of an older generation (before our
    update reached it) is not the new revision serving."""
    status = observed.get("status") or {}
    generation = observed.get("metadata", {}).get("generation")
    if generation is not None and status.get("observedGeneration") != generation:
        return False
    conditions = status.get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def missing_apis(spec: DistillationSpec, served: frozenset[str] | None) -> list[str]:
    """What the spec needs that the cluster does not serve, each with what to do."""
    if served is None:
        return []
    groups = {group_version.split("/")[0] for group_version in served}
    missing = []
    if RAYJOB_API not in served:
        missing.append(
            f"{RAYJOB_API} RayJob is not served by this cluster: every stage runs as a RayJob; "
            "install KubeRay (v1.5 or later)"
        )
    if spec.serve is not None:
        api = serving_api(spec.serve, served)
        version = SERVING_API_VERSIONS[api]
        if version not in served:
            chosen = "spec.serve.api is" if spec.serve.api is not None else "spec.serve needs"
            missing.append(
                f"{chosen} {version} {api.value}, which this cluster does not serve: install "
                "KServe (v0.17 or later for LLMInferenceService), or remove spec.serve to distil "
                "without serving"
            )
    if spec.placement.queue_name and KUEUE_GROUP not in groups:
        missing.append(
            f"spec.placement.queueName is {spec.placement.queue_name!r} but {KUEUE_GROUP} is not "
            "served by this cluster: install Kueue, or remove placement.queueName"
        )
    return missing


def wait_for_apis(observed: Observed, understood: Understanding, missing: list[str]) -> Actions:
    """The spec needs APIs the cluster lacks: start nothing (stages already running go on),
    say which and what to do (Stalled, MissingAPI), and look again every
    ``MISSING_API_POLL_SECONDS``."""
    old = understood.old
    status = report.blocked_status(
        old, understood.generation, observed.now, Reason.MISSING_API, "; ".join(missing)
    )
    actions = Actions()
    report.write_status(actions, old, status)
    actions.requeue(MISSING_API_POLL_SECONDS)
    return actions


def reject(observed: Observed, problem: SpecProblem) -> Actions:
    """A spec that cannot run: Failed and Stalled, nothing retried, running RayJobs stopped
    (they belong to a spec that no longer exists)."""
    actions = Actions(delete_rayjobs=[j.name for j in problem.jobs if not j.finished])
    status = report.invalid_status(problem.old, problem.generation, observed.now, problem.message)
    report.write_status(actions, problem.old, status)
    return actions


def reconcile(
    observed: Observed, images: Images, understood: Understanding | SpecProblem | None = None
) -> Actions:
    """The whole decision for one Distillation (see the module docstring). ``understood`` is
    ``understand(observed.body, observed.rayjobs)`` when the caller has it already."""
    if understood is None:
        understood = understand(observed.body, observed.rayjobs)
    if isinstance(understood, SpecProblem):
        return reject(observed, understood)
    missing = missing_apis(understood.spec, observed.served)
    if missing:
        return wait_for_apis(observed, understood, missing)
    d = Decision(understood, observed, images, Actions())
    stop_replaced(d)
    stages = decide_stages(d)
    finished = all(s.state is StageState.SUCCEEDED for s in stages)
    started = [s.start_time for s in stages if s.start_time is not None]
    start_time = understood.old.start_time or (min(started) if started else None)
    clock = deadline_clock(
        understood.old.deadline_clock,
        understood.generation,
        d.spec.policy.suspend,
        finished,
        observed.now,
    )
    left = None if finished else seconds_left(clock, d.spec.policy.deadline_seconds, observed.now)
    late = left is not None and left <= 0
    if late:
        enforce_deadline(d, stages)
    elif left is not None:
        d.actions.requeue(left)
    metrics = report.final_metrics(understood.plan, stages)
    gate = (metrics or {}).get("gatePassed") if finished else None
    serving, served = serve(d, stages, gate == "true") if finished and not late else (None, False)
    outcome = report.Outcome(
        spec=d.spec,
        old=understood.old,
        generation=understood.generation,
        now=observed.now,
        stages=stages,
        start_time=start_time,
        deadline_clock=clock,
        overdue=late,
        metrics=metrics,
        serving=serving,
        served=served,
    )
    if finished and gate is None:
        d.actions.requeue(MANIFEST_RETRY_SECONDS)
    status = report.status(outcome)
    if d.refused:
        status = report.invalid_status(status, understood.generation, observed.now, d.refused[0])
    report.write_status(d.actions, understood.old, status)
    return d.actions
