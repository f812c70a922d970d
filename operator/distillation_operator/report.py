"""Report: the status and Events of one reconcile, built from its outcome. Pure.

Reconcile decides each stage and the serving; this module turns that one ``Outcome`` into what a
person and a GitOps tool read: ``phase``, the conditions (Ready, kstatus's Reconciling/Stalled
pair, one per stage, Served), the final metrics and the Events. Events come from differences
between the old and the new status, so a repeated reconcile or a restart never repeats them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from distillation_operator.actions import Actions, Event, WriteFailure
from distillation_operator.api import (
    CONDITION_READY,
    CONDITION_RECONCILING,
    CONDITION_SERVED,
    CONDITION_STALLED,
    STALLING_REASONS,
    Condition,
    ConditionStatus,
    DeadlineClock,
    DistillationSpec,
    DistillationStatus,
    EventReason,
    Phase,
    Reason,
    ServingStatus,
    StageState,
    StageStatus,
    stage_condition,
)
from distillation_operator.observed import MESSAGE_LIMIT
from distillation_runtime.plan import Plan
from distillation_runtime.stages import Role

UNREADABLE_MANIFEST = "the operator cannot read its manifest"
"""How a succeeded stage's message says why its metrics are missing (GateUnknown repeats it)."""

STAGE_EVENTS: dict[StageState, tuple[str, EventReason]] = {
    StageState.RUNNING: ("Normal", EventReason.STAGE_STARTED),
    StageState.QUEUED: ("Normal", EventReason.STAGE_QUEUED),
    StageState.RETRYING: ("Warning", EventReason.STAGE_RETRYING),
    StageState.SUSPENDED: ("Normal", EventReason.STAGE_SUSPENDED),
    StageState.SUCCEEDED: ("Normal", EventReason.STAGE_SUCCEEDED),
    StageState.FAILED: ("Warning", EventReason.STAGE_FAILED),
}
"""The Event of a stage entering each state (Pending has none)."""


# --------------------------------------------------------------------------------------------
# Metrics as status strings
# --------------------------------------------------------------------------------------------


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
    """A manifest's metrics as status values; None when there are none."""
    if not metrics:
        return None
    converted = {k: decimal(v) for k, v in metrics.items()}
    return {k: v for k, v in converted.items() if v is not None} or None


def final_metrics(plan: Plan, stages: Sequence[StageStatus]) -> dict[str, str] | None:
    """The final evaluation's metrics (the plan's last gate stage: of the quantised student when
    quantised), plus every other stage's ``exports`` from the stage table (unquantised
    retention, scheme and sizes, parameter counts) and the teacher/student parameter ratio."""
    final = plan.last(Role.GATE)
    by_name = {s.name: s for s in stages}
    record = by_name.get(final.name) if final is not None else None
    if record is None or record.metrics is None:
        return None
    metrics = dict(record.metrics)
    for stage in plan.stages:
        source = by_name.get(stage.name)
        if stage.name == record.name or source is None or not source.metrics:
            continue
        for key, metric in stage.definition.exports.items():
            if metric in source.metrics:
                metrics[key] = source.metrics[metric]
    if "teacherParameters" in metrics and "studentParameters" in metrics:
        teacher, student = int(metrics["teacherParameters"]), int(metrics["studentParameters"])
        metrics["parameterRatio"] = format(teacher / max(student, 1), ".4g")
    return metrics


# --------------------------------------------------------------------------------------------
# The outcome of one reconcile, and its summary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Everything reconcile decided that the status reports."""

    spec: DistillationSpec
    old: DistillationStatus
    generation: int
    now: datetime
    stages: list[StageStatus]
    start_time: datetime | None
    deadline_clock: DeadlineClock | None
    overdue: bool
    metrics: dict[str, str] | None
    serving: ServingStatus | None
    served: bool

    @property
    def done(self) -> int:
        return sum(1 for s in self.stages if s.state is StageState.SUCCEEDED)

    @property
    def all_done(self) -> bool:
        return self.done == len(self.stages)

    @property
    def failed(self) -> list[StageStatus]:
        return [s for s in self.stages if s.state is StageState.FAILED]

    @property
    def gate(self) -> str | None:
        """ "true"/"false" once every stage is done and the final metrics are read; else None."""
        return (self.metrics or {}).get("gatePassed") if self.all_done else None


@dataclass(frozen=True)
class Summary:
    """The Ready condition's verdict, and whether it needs a person (Stalled)."""

    ready: bool
    reason: Reason
    message: str
    stalled: bool


def _first_active_reason(state: StageState) -> Reason:
    return {
        StageState.QUEUED: Reason.QUEUED,
        StageState.RETRYING: Reason.RETRYING,
        StageState.RUNNING: Reason.STAGE_RUNNING,
    }.get(state, Reason.PENDING)


def gate_failure(outcome: Outcome) -> str:
    """Why the gate refused the student: the metric, the retention it kept, the threshold."""
    metrics = outcome.metrics or {}
    gate = outcome.spec.evaluate.gate
    metric = metrics.get("gateMetric") or gate.metric.value
    kept = metrics.get("retention")
    measured = f"kept {kept} of the teacher's {metric}" if kept else f"{metric} was not measured"
    return (
        f"the student did not pass evaluate.gate: it {measured}, below minRetention "
        f"{gate.min_retention}"
    )


def summarize(outcome: Outcome) -> Summary:
    """Where the whole Distillation is, in one reason (first match wins)."""
    spec = outcome.spec
    if outcome.overdue:
        deadline = spec.policy.deadline_seconds
        message = f"not finished within policy.deadlineSeconds={deadline}"
        return Summary(False, Reason.DEADLINE_EXCEEDED, message, True)
    if outcome.failed:
        first = outcome.failed[0]
        message = f"stage {first.name} failed: {first.message}"
        return Summary(False, Reason.STAGE_FAILED, message, True)
    if spec.policy.suspend and not outcome.all_done:
        return Summary(False, Reason.SUSPENDED, "spec.policy.suspend is true: no stage runs", False)
    if not outcome.all_done:
        first = next(s for s in outcome.stages if s.state is not StageState.SUCCEEDED)
        message = f"stage {first.name}: {first.message}"
        return Summary(False, _first_active_reason(first.state), message, False)
    if outcome.gate is None:
        message = "the final evaluation's metrics could not be read yet"
        unreadable = [s.message for s in outcome.stages if s.metrics is None and s.message]
        reasons = [m for m in unreadable if UNREADABLE_MANIFEST in m]
        if reasons:
            message = f"{message}: {reasons[-1]}"
        return Summary(False, Reason.GATE_UNKNOWN, message, False)
    if outcome.gate != "true":
        return Summary(False, Reason.GATE_FAILED, gate_failure(outcome), True)
    if spec.serve is not None and not outcome.served:
        kind = (outcome.serving.kind if outcome.serving else None) or "InferenceService"
        message = f"waiting for the {kind} to become ready"
        return Summary(False, Reason.SERVING, message, False)
    reason = Reason.SUCCEEDED if spec.serve is None else Reason.SERVED
    return Summary(True, reason, "the student passed its gate", False)


def phase(outcome: Outcome, summary: Summary) -> Phase:
    gate_failed = outcome.gate is not None and outcome.gate != "true"
    if outcome.overdue or outcome.failed or gate_failed:
        return Phase.FAILED
    if summary.ready:
        return Phase.SUCCEEDED
    if outcome.spec.policy.suspend and not outcome.all_done:
        return Phase.SUSPENDED
    return Phase.RUNNING


# --------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------


class Conditions:
    """The conditions being written; ``lastTransitionTime`` moves only when a status changes."""

    def __init__(
        self, old: DistillationStatus, generation: int, now: datetime, *, keep: bool = False
    ) -> None:
        """``keep``: start from the old conditions (amend them) rather than from none."""
        self.old = {c.type: c for c in old.conditions or []}
        self.new: dict[str, Condition] = dict(self.old) if keep else {}
        self.generation, self.now = generation, now

    def put(self, type_: str, ok: bool, reason: str, message: str) -> None:
        status = ConditionStatus.TRUE if ok else ConditionStatus.FALSE
        previous = self.old.get(type_)
        unchanged = previous is not None and previous.status == status
        since = previous.last_transition_time if previous is not None and unchanged else self.now
        self.new[type_] = Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message[:MESSAGE_LIMIT],
            last_transition_time=since,
            observed_generation=self.generation,
        )

    def summary(self, summary: Summary) -> None:
        """Ready, and kstatus's pair: Reconciling while work is under way, Stalled when it
        failed and needs a spec change."""
        ready, stalled = summary.ready, summary.stalled
        working = not ready and not stalled
        self.put(CONDITION_READY, ready, summary.reason, summary.message)
        self.put(
            CONDITION_RECONCILING,
            working,
            summary.reason if working else Reason.IDLE,
            summary.message if working else "",
        )
        self.put(
            CONDITION_STALLED,
            stalled,
            summary.reason if stalled else Reason.PROGRESSING,
            summary.message if stalled else "",
        )

    def listed(self) -> list[Condition]:
        return list(self.new.values())


def conditions(outcome: Outcome, summary: Summary) -> list[Condition]:
    written = Conditions(outcome.old, outcome.generation, outcome.now)
    written.summary(summary)
    for record in outcome.stages:
        ok = record.state is StageState.SUCCEEDED
        written.put(stage_condition(record.name), ok, record.state.value, record.message or "")
    if outcome.spec.serve is not None:
        serving = outcome.serving
        gate_failed = outcome.gate == "false"
        ok = serving is not None and serving.ready and not gate_failed  # this generation's
        why = Reason.READY if ok else (Reason.GATE_FAILED if gate_failed else Reason.NOT_READY)
        message = serving.url or "" if serving else ""
        if gate_failed:
            kept = "; the student served before keeps serving" if serving else "; nothing served"
            message = gate_failure(outcome) + kept
        written.put(CONDITION_SERVED, ok, why, message)
    return written.listed()


# --------------------------------------------------------------------------------------------
# Status and Events
# --------------------------------------------------------------------------------------------


def duration(seconds: int) -> str:
    """``4210`` -> ``1h10m``: what a person reads in a column."""
    hours, rest = divmod(max(seconds, 0), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(stages: Sequence[StageStatus]) -> str | None:
    """The running stages' own progress in one line: ``train 45% (1h10m left)``."""
    parts = []
    for record in stages:
        progress = record.progress
        if record.state is not StageState.RUNNING or progress is None:
            continue
        amount = f"{progress.percent}%" if progress.percent else f"{progress.done} {progress.unit}"
        left = (
            f" ({duration(progress.eta_seconds)} left)" if progress.eta_seconds is not None else ""
        )
        parts.append(f"{record.name} {amount}{left}")
    return ", ".join(parts)[:128] or None


def status(outcome: Outcome) -> DistillationStatus:
    """The new status of the Distillation."""
    summary = summarize(outcome)
    running = [s.name for s in outcome.stages if s.state in (StageState.RUNNING, StageState.QUEUED)]
    completion = None
    if outcome.all_done:
        ends = [s.completion_time for s in outcome.stages if s.completion_time]
        completion = max(ends, default=outcome.now)
    return DistillationStatus(
        observed_generation=outcome.generation,
        phase=phase(outcome, summary),
        conditions=conditions(outcome, summary),
        current_stage=",".join(running)[:63] or None,
        start_time=outcome.start_time,
        completion_time=completion,
        progress=f"{outcome.done}/{len(outcome.stages)}",
        stage_progress=progress_line(outcome.stages),
        deadline_clock=outcome.deadline_clock,
        stages=outcome.stages,
        metrics=outcome.metrics,
        serving=outcome.serving,
    )


def blocked_status(
    old: DistillationStatus, generation: int, now: datetime, reason: Reason, message: str
) -> DistillationStatus:
    """Nothing can start until a person acts (an impossible spec, a missing API): Ready False
    and Stalled True with the problem, the rest of the old status kept, conditions included
    (what ran before is still true). An invalid spec is Failed; a missing API leaves a running
    phase as it was and is Pending otherwise, since the Distillation resumes by itself once the
    API is there."""
    written = Conditions(old, generation, now, keep=True)  # stage conditions stay true
    written.put(CONDITION_READY, False, reason, message)
    written.put(CONDITION_RECONCILING, False, reason, "")
    written.put(CONDITION_STALLED, True, reason, message)
    new = old.model_copy(deep=True)
    new.observed_generation = generation
    if reason is Reason.INVALID_SPEC:
        new.phase, new.current_stage = Phase.FAILED, None
    elif new.phase in (None, Phase.SUCCEEDED, Phase.FAILED):
        new.phase = Phase.PENDING  # this generation's work waits: not done, not failed

    new.conditions = written.listed()
    return new


def invalid_status(
    old: DistillationStatus, generation: int, now: datetime, message: str
) -> DistillationStatus:
    """A spec the schema let through but that cannot run: Failed and Stalled."""
    return blocked_status(old, generation, now, Reason.INVALID_SPEC, message)


def after_failed_writes(
    status: DistillationStatus, failures: Sequence[WriteFailure], now: datetime
) -> DistillationStatus:
    """The status once the API server refused some of the decided writes: the stages whose
    RayJob could not be created wait (Pending, with the server's message), and Ready and
    Stalled (or Reconciling, for what passes by itself) carry the first failure. Everything else
    reconcile decided is still reported."""
    new = status.model_copy(deep=True)
    refused = {f.name: f for f in failures if f.verb == "create" and f.kind == "RayJob"}
    waiting = []
    for record in new.stages or []:
        failure = refused.get(record.ray_job or "")
        if failure is not None and record.state is StageState.RUNNING:
            record.state = StageState.PENDING
            record.message = failure.describe()
            record.attempts = max(record.attempts - 1, 0)  # never created: the retry reuses it
            record.ray_job = None
            waiting.append(record)
    message = "; ".join(f.describe() for f in failures)[:MESSAGE_LIMIT]
    stalled = not all(f.transient for f in failures)
    written = Conditions(status, status.observed_generation or 0, now, keep=True)
    reason = Reason.CHILD_WRITE_FAILED
    written.put(CONDITION_READY, False, reason, message)
    written.put(CONDITION_RECONCILING, not stalled, reason, "" if stalled else message)
    written.put(CONDITION_STALLED, stalled, reason, message if stalled else "")
    for record in waiting:
        written.put(stage_condition(record.name), False, record.state.value, record.message or "")
    new.conditions = written.listed()
    return new


def as_data(status: DistillationStatus) -> dict[str, Any]:
    """A status as the JSON the API server stores (camelCase, no nulls)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def write_status(actions: Actions, old: DistillationStatus, new: DistillationStatus) -> None:
    """Put ``new`` into ``actions``, with the Events of what changed since ``old``."""
    actions.status = as_data(new)
    actions.events.extend(events(old, new))


def _stage_moved(before: StageStatus | None, after: StageStatus) -> bool:
    return (
        before is None
        or before.state is not after.state
        or before.fingerprint != after.fingerprint
        or (after.state is StageState.RUNNING and before.ray_job != after.ray_job)
    )


def events(old: DistillationStatus, new: DistillationStatus) -> list[Event]:
    """Events for what changed: stage transitions and the summary."""
    before = {s.name: s for s in old.stages or []}
    found: list[Event] = []
    for record in new.stages or []:
        if _stage_moved(before.get(record.name), record) and record.state in STAGE_EVENTS:
            kind, reason = STAGE_EVENTS[record.state]
            found.append(
                Event(kind, reason, f"{record.name}: {record.message or record.state.value}")
            )
    old_ready = next((c for c in old.conditions or [] if c.type == CONDITION_READY), None)
    new_ready = next((c for c in new.conditions or [] if c.type == CONDITION_READY), None)
    if new_ready is not None and (
        old_ready is None
        or (old_ready.status, old_ready.reason) != (new_ready.status, new_ready.reason)
    ):
        if new_ready.status is ConditionStatus.TRUE:
            found.append(Event("Normal", new_ready.reason, new_ready.message))
        elif new_ready.reason in STALLING_REASONS:
            found.append(Event("Warning", new_ready.reason, new_ready.message))
    return found
