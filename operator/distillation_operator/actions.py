"""What reconcile decided: children to create, update, suspend or delete, the new status, the
Events to emit and when to look again. Plain values; the controller carries them out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIN_REQUEUE_SECONDS = 0.5
TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504})
"""API server answers that pass by themselves (a retry is the fix, not a person)."""


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
    delete_serving: list[tuple[str, str]] = field(default_factory=list)
    """(kind, name) of serving children to delete (serve removed, or replaced by the other API
    once that one is ready)."""
    suspend_rayjobs: dict[str, bool] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        """Ask to be called again within ``seconds`` (the earliest request wins)."""
        seconds = max(seconds, MIN_REQUEUE_SECONDS)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )

    def stop(self, job: str) -> None:
        """Delete a RayJob (once, however many reasons there are to)."""
        if job not in self.delete_rayjobs:
            self.delete_rayjobs.append(job)


@dataclass(frozen=True)
class WriteFailure:
    """A write of a child that the API server refused, with its own words."""

    verb: str
    kind: str
    name: str
    code: int | None
    message: str

    @property
    def transient(self) -> bool:
        """Whether it passes by itself (throttling, a restarting server); else it needs a person
        (RBAC, a quota, a webhook, a name taken by someone else's object)."""
        return self.code is None or self.code in TRANSIENT_CODES

    def describe(self) -> str:
        code = f" ({self.code})" if self.code is not None else ""
        return f"{self.verb} {self.kind} {self.name} failed{code}: {self.message}"
