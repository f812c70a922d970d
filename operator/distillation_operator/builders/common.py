"""What every child of a Distillation shares: names, labels and the owner reference."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
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
    """The vLLM server the InferenceService runs."""
    runtime_vllm: str | None = None
    """The runtime image with vLLM: a stage that generates with vLLM on GPU pods (generate);
    None: the runtime image."""


def fit_name(name: str, max_length: int) -> str:
    """``name`` if it fits, else its head plus a short hash (deterministic, still unique)."""
    if len(name) <= max_length:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: max_length - 9].rstrip('-.')}-{digest}"


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
"""What Kubernetes, KubeRay and KServe accept as a name (RFC 1035 label, length aside)."""
HASH_MARK = "--"
"""Separates a rewritten name from the hash of the original. A name kept as it is never contains
it, a rewritten one exactly once: so no rewritten name equals a kept one."""
HASH_LENGTH = 8
"""Base-36 characters of the original name's SHA-256 (about 41 bits)."""
PREFIX = "d-"
"""Put before a name that does not start with a letter (``7b-chat``)."""
_PART = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _short_hash(name: str) -> str:
    """``HASH_LENGTH`` base-36 characters of the SHA-256 of ``name``: more bits per character
    than hex, and every character is valid in a label."""
    number = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    digits = ""
    for _ in range(HASH_LENGTH):
        number, digit = divmod(number, 36)
        digits += "0123456789abcdefghijklmnopqrstuvwxyz"[digit]
    return digits


def keeps_name(name: str) -> bool:
    """Whether ``name`` is used as it is: a DNS-1035 label that does not contain ``HASH_MARK``."""
    return bool(DNS_1035.match(name)) and HASH_MARK not in name


def _readable(name: str) -> str:
    """``name`` in label characters: lower case, every run of other characters (and of ``-``)
    one ``-``, starting with a letter."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return text if text[:1].isalpha() else f"{PREFIX}{text}".rstrip("-")


def child_name(name: str, suffix: Sequence[str | int], max_length: int) -> str:
    """The DNS-1035 label (at most ``max_length`` characters) naming a child of Distillation
    ``name``: ``<name>-<suffix...>``.

    A valid name that fits is kept as it is (``demo-train-1``). Any other is rewritten (a
    character replaced, ``PREFIX`` added, or shortened) and then carries the hash of the original
    after ``HASH_MARK`` (``llama-v2--<hash>-train-1``), so distinct names never map to the same
    child name: ``llama.v2`` and ``llama-v2`` differ by the mark, two rewritten ones by the
    hash. The suffix parts are the caller's (stage, attempt): label parts without the mark."""
    parts = [str(part) for part in suffix]
    bad = [part for part in parts if not _PART.match(part) or HASH_MARK in part]
    if bad:
        raise ValueError(f"name suffix parts must be label parts without {HASH_MARK!r}: {bad}")
    tail = "".join(f"-{part}" for part in parts)
    if keeps_name(name) and len(name) + len(tail) <= max_length:
        return f"{name}{tail}"
    room = max_length - len(tail) - len(HASH_MARK) - HASH_LENGTH
    if room < 1:
        raise ValueError(f"no room for a name in {max_length} characters with suffix {tail!r}")
    head = _readable(name)[:room].rstrip("-")
    return f"{head}{HASH_MARK}{_short_hash(name)}{tail}"


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
