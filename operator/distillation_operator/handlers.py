"""kopf wiring: the only module with kopf decorators. Keep it thin.

Run with ``kopf run --standalone -m distillation_operator.handlers --all-namespaces`` (the Helm
chart does). This module configures kopf so that it keeps its own bookkeeping out of ``status``
(``status`` is the Distillation's API); the reconcile handlers arrive with the operator issue.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import kopf

from distillation_runtime.spec import API_GROUP

ANNOTATION_PREFIX = API_GROUP


def scanning_enabled(environ: Mapping[str, str]) -> bool:
    """Whether kopf may watch CRDs and namespaces (needs cluster-wide RBAC; off when the chart
    runs the operator in namespaced mode)."""
    return environ.get("DISTILLATION_KOPF_SCANNING", "true").lower() not in {"false", "0", "no"}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Progress and diff-base in annotations, never in status; scanning as RBAC allows."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    settings.scanning.disabled = not scanning_enabled(os.environ)
