"""Distillation statuses tests start from."""

from __future__ import annotations

from typing import Any

from distillation_operator.api import DistillationSpec
from distillation_runtime.plan import make_plan


def preflight_passed(spec: dict[str, Any]) -> dict[str, Any]:
    """A status whose preflight already passed: what most tests start from (the preflight's own
    tests start from nothing)."""
    plan = make_plan(DistillationSpec.model_validate(spec).pipeline())
    stage = plan["preflight"]
    record = {
        "name": "preflight",
        "state": "Succeeded",
        "fingerprint": stage.fingerprint,
        "artifact": plan.artifact("preflight"),
        "attempts": 1,
        "metrics": {"teacherLayers": "2"},
        "startTime": "2026-11-28T11:00:00Z",
        "completionTime": "2026-11-28T11:01:00Z",
    }
    return {"stages": [record]}
