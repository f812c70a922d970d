"""What every child of a Distillation shares: names, labels and the owner reference."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from distillation_runtime.spec import API_GROUP

MANAGED_BY = "distillation-operator"
LABEL_NAME = f"{API_GROUP}/name"
LABEL_STAGE = f"{API_GROUP}/stage"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
ANNOTATION_FINGERPRINT = f"{API_GROUP}/fingerprint"
ANNOTATION_ARTIFACT = f"{API_GROUP}/artifact"
ANNOTATION_SPEC_HASH = f"{API_GROUP}/spec-hash"
"""Hash of the spec the operator wrote: servers and webhooks add defaults to a child's spec, so
"is it what we want" compares this, never the spec itself."""
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
"""Label selector of every child the operator creates (what it watches)."""


@dataclass(frozen=True)
class Images:
    """The operator's configured default images (Helm values images.*)."""

    runtime: str
    quantize: str
    vllm: str


def fit_name(name: str, max_length: int) -> str:
    """``name`` if it fits, else its head plus a short hash (deterministic, still unique)."""
    if len(name) <= max_length:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: max_length - 9].rstrip('-.')}-{digest}"


def label_value(value: str) -> str:
    """A label value (at most 63 characters) standing for ``value``."""
    return fit_name(value, 63)


def labels(distillation: str, component: str) -> dict[str, str]:
    """The standard ``app.kubernetes.io`` labels plus the owning Distillation's name."""
    return {
        "app.kubernetes.io/name": "distillation",
        "app.kubernetes.io/instance": label_value(distillation),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "distillation-operator",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_NAME: label_value(distillation),
    }


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """Controller reference to the Distillation: deleting it garbage-collects the child."""
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(
    body: dict[str, Any], name: str, component: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """metadata of a child: its name, the Distillation's namespace, labels, owner."""
    return {
        "name": name,
        "namespace": body["metadata"]["namespace"],
        "labels": labels(body["metadata"]["name"], component) | (extra_labels or {}),
        "ownerReferences": [owner_reference(body)],
    }


def container_resources(
    cpu: str | None, memory: str | None, gpus: int | None, gpu_resource: str
) -> dict[str, Any]:
    """requests == limits (Guaranteed QoS for GPU pods); GPUs only when asked for."""
    amounts: dict[str, Any] = {}
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    if gpus:
        amounts[gpu_resource] = gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def spec_hash(spec: Any) -> str:
    """A short hash of a child's desired spec (canonical JSON)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
