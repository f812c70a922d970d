"""What a KServe stand-in reads from the operator's InferenceService and writes back: shared by
the demo's local stand-in (hack/demo/kserve_stand_in.py) and the node tier's pod stand-in
(tests/support/kserve_pods.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


def now() -> str:
    """A Kubernetes timestamp (RFC 3339 in UTC, seconds), as KubeRay and KServe write them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def predictor_container(isvc: dict[str, Any]) -> dict[str, Any]:
    """The predictor's first container: the one the operator's builder fills."""
    predictor = (isvc.get("spec") or {}).get("predictor") or {}
    containers = predictor.get("containers") or [{}]
    return dict(containers[0])


def storage_uri(container: dict[str, Any]) -> str:
    """The model the operator asked KServe to serve (the container's ``STORAGE_URI``)."""
    for entry in container.get("env") or []:
        if entry.get("name") == "STORAGE_URI" and entry.get("value"):
            return str(entry["value"])
    raise ValueError("the predictor container has no STORAGE_URI")


def served_model_name(container: dict[str, Any]) -> str | None:
    """The ``--served-model-name`` the builder passes to vLLM (requests use it as ``model``)."""
    args = [str(a) for a in container.get("args") or []]
    for i, arg in enumerate(args):
        if arg == "--served-model-name" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--served-model-name="):
            return arg.split("=", 1)[1]
    return None


def ready_status(isvc: dict[str, Any], ready: str, url: str, message: str = "") -> dict[str, Any]:
    """The status KServe writes: conditions for the generation it has seen, and the URL."""
    stamp = now()
    conditions = []
    for type_ in ("IngressReady", "PredictorReady", "Ready"):
        entry = {"type": type_, "status": ready, "lastTransitionTime": stamp}
        if message and ready != "True":
            entry |= {"reason": "ServerFailed", "message": message[-1000:]}
        conditions.append(entry)
    status: dict[str, Any] = {
        "observedGeneration": isvc["metadata"].get("generation"),
        "conditions": conditions,
    }
    if ready == "True":
        status |= {"url": url, "address": {"url": url}}
    return status
