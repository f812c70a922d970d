"""Runs reconcile for one Distillation at a time and carries out its actions.

Every trigger (the Distillation created, edited or resumed after a restart; one of its RayJobs
or its InferenceService changed; a backoff timer) ends in ``Controller.reconcile(ns, name)``.
Calls for the same object are serialised and coalesced: while one runs, any number of new
triggers add exactly one more run, which reads the newest state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from kubernetes.client.exceptions import ApiException

from distillation_operator import metrics, report
from distillation_operator.actions import Actions, WriteFailure
from distillation_operator.api import DistillationStatus, EventReason
from distillation_operator.artifacts import read_artifacts, read_progress_records
from distillation_operator.builders.common import Images
from distillation_operator.builders.inference_service import inference_service_name
from distillation_operator.cache import ChildCache
from distillation_operator.k8s import Cluster, ForeignChildError, api_error_message
from distillation_operator.observed import Observed, parse_job
from distillation_operator.reconcile import (
    SERVING_KINDS,
    artifacts_to_probe,
    progress_to_probe,
    reconcile,
    understand,
)

log = logging.getLogger(__name__)
Key = tuple[str, str]
DISCOVERY_SECONDS = 10.0
"""How long the list of served APIs is trusted (KServe or Kueue installed later: noticed then)."""
WRITE_RETRY_SECONDS = 30.0
"""How soon a refused child write is tried again (a quota may have room by then)."""

DEFAULT_IMAGES = Images(
    runtime="ghcr.io/distillation-dev/distillation-runtime:0.1.0",
    quantize="ghcr.io/distillation-dev/distillation-quantize:0.1.0",
    vllm="vllm/vllm-openai:v0.33.0",
    runtime_vllm="ghcr.io/distillation-dev/distillation-runtime-vllm:0.1.0",
)


def images_from_env(environ: Mapping[str, str]) -> Images:
    """The stage images the chart configures (DISTILLATION_*_IMAGE), else the defaults."""
    return Images(
        runtime=environ.get("DISTILLATION_RUNTIME_IMAGE") or DEFAULT_IMAGES.runtime,
        quantize=environ.get("DISTILLATION_QUANTIZE_IMAGE") or DEFAULT_IMAGES.quantize,
        vllm=environ.get("DISTILLATION_VLLM_IMAGE") or DEFAULT_IMAGES.vllm,
        runtime_vllm=environ.get("DISTILLATION_RUNTIME_VLLM_IMAGE") or DEFAULT_IMAGES.runtime_vllm,
    )


def child_signature(child: Mapping[str, Any]) -> tuple[str, ...]:
    """The parts of a child that reconcile reads (status, suspend, and the generations that
    tell whether KServe has seen our latest spec), as a comparable tuple."""
    status, spec = child.get("status") or {}, child.get("spec") or {}
    return (
        str(child.get("metadata", {}).get("generation", "")),
        str(status.get("observedGeneration", "")),
        str(status.get("jobDeploymentStatus", "")),
        str(status.get("jobStatus", "")),
        str(status.get("reason", "")),
        str(bool(spec.get("suspend"))),
        str(status.get("url", "")),
        str(status.get("conditions", "")),
    )


def controller_owner(obj: Mapping[str, Any]) -> str | None:
    """Name of the Distillation that controls a child, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "Distillation" and ref.get("controller"):
            return str(ref["name"])
    return None


@dataclass
class Controller:
    """State shared by the handlers of one operator process."""

    cluster: Cluster
    images: Images
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    queued: set[Key] = field(default_factory=set)
    timers: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)
    phases: dict[Key, str] = field(default_factory=dict)
    job_states: dict[str, str] = field(default_factory=dict)
    seen: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """What the last reconcile knew of each child ("ns/name" -> child_signature)."""
    children: ChildCache = field(default_factory=ChildCache)
    generations: dict[Key, int] = field(default_factory=dict)
    """The spec generation each Distillation's events last triggered a reconcile for."""
    gone: set[Key] = field(default_factory=set)
    """Distillations seen deleted: a reconcile that was under way must not count them again."""
    apis: tuple[float, frozenset[str]] | None = None
    """(when looked up, the served group/versions)."""

    def spec_news(self, body: Mapping[str, Any]) -> bool:
        """Whether a Distillation's event can change a decision: first seen (created, or listed
        at start-up) or its spec's generation moved. Not the events of our own status writes
        (their generation is the one just reconciled), nor of a deletion under way (garbage
        collection takes the children)."""
        meta = body.get("metadata", {})
        key = (str(meta.get("namespace")), str(meta.get("name")))
        generation = int(meta.get("generation") or 0)
        if meta.get("deletionTimestamp"):
            return False
        self.gone.discard(key)  # created again under the same name
        if self.generations.get(key) == generation:
            return False
        self.generations[key] = generation
        return True

    def news(self, child: Mapping[str, Any]) -> bool:
        """Whether a child's event can change a decision (its status or suspend moved since the
        last reconcile saw it); our own creations and status-less updates are not news."""
        meta = child.get("metadata", {})
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        return self.seen.get(key) != child_signature(child)

    @classmethod
    def from_env(cls) -> Controller:
        return cls(Cluster(), images_from_env(os.environ))

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        lock = self.locks.setdefault(key, asyncio.Lock())
        if key in self.queued:
            return  # a run that will read the newest state is already waiting
        self.queued.add(key)
        async with lock:
            self.queued.discard(key)
            try:
                delay = await asyncio.to_thread(self.reconcile_now, namespace, name)
            except Exception:
                metrics.RECONCILES.labels("error").inc()
                log.exception("reconcile of %s/%s failed; retrying in 10 s", namespace, name)
                delay = 10.0
        self._schedule(key, delay)

    def _schedule(self, key: Key, delay: float | None) -> None:
        old = self.timers.pop(key, None)
        if old is not None:
            old.cancel()
        if delay is None:
            return
        loop = asyncio.get_running_loop()
        self.timers[key] = loop.call_later(
            delay, lambda: asyncio.ensure_future(self.reconcile(*key))
        )

    def child_gone(self, child: Mapping[str, Any]) -> None:
        """A child was deleted: drop what the operator remembered of it (cache, gauges)."""
        meta = child.get("metadata", {})
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        self.children.observe(child, deleted=True)
        self.seen.pop(key, None)
        if self.job_states.pop(key, None) is not None:
            self._update_gauges()

    def forget(self, namespace: str, name: str) -> None:
        """The Distillation is gone: drop its timers and gauges (children go by GC)."""
        key = (namespace, name)
        self._schedule(key, None)
        self.phases.pop(key, None)
        self.locks.pop(key, None)
        self.generations.pop(key, None)
        self.gone.add(key)
        self._update_gauges()

    def reconcile_now(self, namespace: str, name: str) -> float | None:
        """One reconcile: read, decide, write. Returns when to look again (seconds) or None."""
        body = self.cluster.get_distillation(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        served = self.served_apis()
        self.children.ensure_listed(namespace, lambda ns: self.cluster.managed_children(ns, served))
        uid = body["metadata"]["uid"]
        rayjobs = self.children.owned(namespace, "RayJob", uid)
        service_name = inference_service_name(name)
        serving = [
            child
            for kind in SERVING_KINDS
            for child in self.children.owned(namespace, kind, uid)
            if child["metadata"]["name"] == service_name
        ]
        understood = understand(body, rayjobs)  # the spec parsed and planned once
        now = datetime.now(UTC)
        artifacts = read_artifacts(artifacts_to_probe(understood, now))
        progress = read_progress_records(progress_to_probe(understood, now))
        observed = Observed(body, rayjobs, serving, artifacts, progress, now, served)
        actions = reconcile(observed, self.images, understood)
        for child in [*rayjobs, *serving, *actions.create, *actions.apply]:
            meta = child["metadata"]
            self.seen[f"{meta['namespace']}/{meta['name']}"] = child_signature(child)
        self.apply(body, actions)
        metrics.RECONCILES.labels("ok").inc()
        self._record(namespace, name, actions, rayjobs)
        return actions.requeue_after

    def served_apis(self) -> frozenset[str] | None:
        """The API groups/versions the cluster serves, looked up at most every
        ``DISCOVERY_SECONDS`` (an API installed meanwhile is noticed within that); None when
        discovery fails (then every API is taken to be there, as before)."""
        now = time.monotonic()
        if self.apis is None or now - self.apis[0] > DISCOVERY_SECONDS:
            try:
                self.apis = (now, self.cluster.served_apis())
            except Exception:  # discovery is best effort; the writes will tell
                log.warning("API discovery failed; assuming KubeRay, KServe and Kueue are there")
                return None
        return self.apis[1]

    def apply(self, body: Mapping[str, Any], actions: Actions) -> None:
        """Carry out the decision: child writes first, each refusal recorded (never raised), then
        the status (with the refusals in it) and the Events."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        failures: list[WriteFailure] = []

        def attempt(verb: str, kind: str, child: str, call: Callable[[], Any]) -> Any:
            try:
                return call()
            except (ApiException, ForeignChildError) as err:
                text = str(err) if isinstance(err, ForeignChildError) else api_error_message(err)
                failures.append(WriteFailure(verb, kind, child, err.status, text))
                log.warning("%s %s %s/%s refused: %s", verb, kind, namespace, child, text)
                return None

        for job in actions.delete_rayjobs:
            attempt("delete", "RayJob", job, partial(self.cluster.delete, "RayJob", namespace, job))
        for kind, service in actions.delete_serving:
            attempt("delete", kind, service, partial(self.cluster.delete, kind, namespace, service))
        for job, suspend in actions.suspend_rayjobs.items():
            patch = partial(self.cluster.suspend_rayjob, namespace, job, suspend)
            updated = attempt("patch", "RayJob", job, patch)
            if updated is not None:
                self.children.observe(updated)
        for child in actions.create:
            kind, child_name = child["kind"], child["metadata"]["name"]
            created = attempt("create", kind, child_name, partial(self.cluster.create, child))
            if created is not None:
                self.children.observe(created)
        for child in actions.apply:
            kind, child_name = child["kind"], child["metadata"]["name"]
            updated = attempt("update", kind, child_name, partial(self.cluster.update_spec, child))
            if updated is not None:
                self.children.observe(updated)
        if failures:
            self._report_failures(body, actions, failures)
        old = body.get("status") or {}
        if actions.status != old:
            self.cluster.patch_status(namespace, name, old, actions.status)
        for event in actions.events:
            self.cluster.emit(body, event)

    def _report_failures(
        self, body: Mapping[str, Any], actions: Actions, failures: list[WriteFailure]
    ) -> None:
        """Put the refused writes into the status and its Events, and look again soon."""
        old = DistillationStatus.model_validate(body.get("status") or {})
        decided = DistillationStatus.model_validate(actions.status)
        status = report.after_failed_writes(decided, failures, datetime.now(UTC))
        replaced = [e for e in actions.events if e.reason == EventReason.STAGE_REPLACED]
        actions.events = replaced
        report.write_status(actions, old, status)
        actions.requeue(WRITE_RETRY_SECONDS)

    def _record(
        self, namespace: str, name: str, actions: Actions, rayjobs: Sequence[Mapping[str, Any]]
    ) -> None:
        if (namespace, name) in self.gone:
            return  # deleted while this reconcile ran: its children go with it
        self.phases[(namespace, name)] = str(actions.status.get("phase", "Pending"))
        for obj in rayjobs:
            job = parse_job(obj)
            if job is None or self.children.deleted(obj):
                continue
            key = f"{namespace}/{job.name}"
            state = job.deployment or "New"
            if (
                job.finished
                and self.job_states.get(key) not in (None, state)
                and job.start
                and job.end
            ):
                seconds = (job.end - job.start).total_seconds()
                metrics.STAGE_SECONDS.labels(job.stage, state).observe(seconds)
            self.job_states[key] = state
        for name_ in actions.delete_rayjobs:
            self.job_states.pop(f"{namespace}/{name_}", None)
        self._update_gauges()

    def _update_gauges(self) -> None:
        for gauge, values in (
            (metrics.DISTILLATIONS, self.phases.values()),
            (metrics.RAYJOBS, self.job_states.values()),
        ):
            gauge.clear()
            counts: dict[str, int] = {}
            for value in values:
                counts[value] = counts.get(value, 0) + 1
            for value, count in counts.items():
                gauge.labels(value).set(count)
