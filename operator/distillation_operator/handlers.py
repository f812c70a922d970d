"""kopf wiring: the only module with kopf decorators. Keep it thin.

Run with ``kopf run --standalone -m distillation_operator.handlers --all-namespaces`` (the Helm
chart does). Every handler ends in the same level-based reconcile (``controller.py``):
Distillations created, edited or found at start-up, and status changes of the RayJobs and
InferenceServices they own (watched by label). All are raw event handlers, so kopf writes nothing
into any object; ``status`` is the Distillation's API and only the reconcile writes it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from distillation_operator.api import PLURAL, VERSION
from distillation_operator.builders.common import MANAGED_BY
from distillation_operator.controller import Controller, controller_owner
from distillation_operator.k8s import load_config
from distillation_runtime.spec import API_GROUP

ANNOTATION_PREFIX = API_GROUP
METRICS_PORT_ENV = "DISTILLATION_METRICS_PORT"
RECONCILE_THREADS = 32
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
log = logging.getLogger(__name__)
_controller: Controller | None = None


def scanning_enabled(environ: Mapping[str, str]) -> bool:
    """Whether kopf may watch CRDs and namespaces (needs cluster-wide RBAC; off when the chart
    runs the operator in namespaced mode)."""
    return environ.get("DISTILLATION_KOPF_SCANNING", "true").lower() not in {"false", "0", "no"}


def controller() -> Controller:
    if _controller is None:
        raise RuntimeError("the operator has not started (kopf startup handler not run)")
    return _controller


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Progress and diff-base in annotations, never in status; scanning as RBAC allows;
    the API client and the metrics endpoint."""
    global _controller
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    settings.scanning.disabled = not scanning_enabled(os.environ)
    settings.posting.level = logging.WARNING  # our own Events say what happened; not kopf's
    settings.watching.server_timeout = 300
    load_config(connections=RECONCILE_THREADS)
    _controller = Controller.from_env()
    # Reconciles wait on the API server, not the CPU: more threads, more Distillations at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(RECONCILE_THREADS))
    port = os.environ.get(METRICS_PORT_ENV)
    if port:
        from prometheus_client import start_http_server

        start_http_server(int(port))
        log.info("metrics on :%s/metrics", port)


@kopf.on.event(API_GROUP, VERSION, PLURAL)
async def distillation_event(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    """Created, spec edited, or found at start-up: reconcile. Gone: forget its timers and
    gauges (its children go by ownerReferences, so no finalizer ever blocks a deletion).

    Only raw events, no create/update handlers: kopf then writes nothing into the object (no
    diff-base annotation, no finalizer), one API write less per Distillation. Reconcile is
    level-based, so what counts is whether the spec's generation is one it has not seen; our
    own status writes (same generation) are not news."""
    if type == "DELETED":
        controller().forget(namespace or "", name)
        return
    if controller().spec_news(body):
        await controller().reconcile(namespace or "", name)


@kopf.on.event("ray.io", "v1", "rayjobs", labels=MANAGED)
@kopf.on.event("serving.kserve.io", "v1beta1", "inferenceservices", labels=MANAGED)
@kopf.on.event("serving.kserve.io", "v1alpha2", "llminferenceservices", labels=MANAGED)
async def child_changed(type: str | None, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    """A RayJob or InferenceService of a Distillation changed: remember it, and reconcile its
    owner unless the change is one the last reconcile already saw (e.g. its own creation).

    ``body`` is the newest state (kopf merges a burst of events into one call)."""
    child = copy.deepcopy(dict(body))
    deleted = type == "DELETED"
    if deleted:
        controller().child_gone(child)
    else:
        controller().children.observe(child)
    owner = controller_owner(body)
    if owner is None or not namespace:
        return
    if deleted or controller().news(body):
        await controller().reconcile(namespace, owner)
