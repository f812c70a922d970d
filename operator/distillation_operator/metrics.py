"""Prometheus metrics of the operator (served on ``--metrics-port``, see the chart)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "distillation_reconciles_total", "Reconciles of Distillations, by outcome.", ["outcome"]
)
STAGE_SECONDS = Histogram(
    "distillation_stage_duration_seconds",
    "Wall time of finished stages (RayJob start to end).",
    ["stage", "state"],
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800),
)
RAYJOBS = Gauge(
    "distillation_rayjobs", "RayJobs of Distillations, by KubeRay deployment status.", ["state"]
)
DISTILLATIONS = Gauge("distillation_distillations", "Distillations by phase.", ["phase"])
API_WRITES = Counter(
    "distillation_api_writes_total", "Writes to the API server, by kind.", ["kind"]
)
