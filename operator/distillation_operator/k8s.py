"""The only module that talks to the API server (the kubernetes client, synchronous).

Every call here is declared in ``permissions.py``; the chart's RBAC is tested against that list.
Writes are idempotent: create is create-or-get, delete ignores what is already gone, so a
reconcile repeated after a crash or a missed event does no harm.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from distillation_operator import metrics
from distillation_operator.actions import Event
from distillation_operator.api import PLURAL, VERSION
from distillation_operator.builders.common import (
    ANNOTATION_SPEC_HASH,
    MANAGED_BY,
    MANAGED_SELECTOR,
)
from distillation_operator.cache import Listing
from distillation_runtime.spec import API_GROUP

log = logging.getLogger(__name__)
T = TypeVar("T")

RAYJOB = ("ray.io", "v1", "rayjobs")
INFERENCE_SERVICE = ("serving.kserve.io", "v1beta1", "inferenceservices")
LLM_INFERENCE_SERVICE = ("serving.kserve.io", "v1alpha2", "llminferenceservices")
KINDS = {
    "RayJob": RAYJOB,
    "InferenceService": INFERENCE_SERVICE,
    "LLMInferenceService": LLM_INFERENCE_SERVICE,
}
STRICT = "Strict"
"""Every create and patch asks the API server to refuse unknown or duplicate fields: a misspelled
field in a builder is an error the user sees (ChildWriteFailed), never silently dropped."""


def load_config(connections: int = 32) -> None:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG); a
    connection pool as large as the reconcile thread pool."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    settings = client.Configuration.get_default_copy()
    settings.connection_pool_maxsize = connections
    client.Configuration.set_default(settings)


class ForeignChildError(Exception):
    """A child's name is taken by an object this Distillation does not own."""

    def __init__(self, kind: str, name: str, owners: list[str]) -> None:
        owned_by = f"owned by {', '.join(owners)}" if owners else "not owned by any Distillation"
        super().__init__(
            f"the name {name} is taken by a {kind} this Distillation does not own ({owned_by}); "
            "delete or rename that object, or rename the Distillation"
        )
        self.status = 409


def api_error_message(err: ApiException) -> str:
    """The API server's own message from an error response (its Status ``message``), else the
    HTTP reason."""
    try:
        body = json.loads(err.body) if err.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or err.reason or err)


def _missing_ok(call: Callable[[], T]) -> T | None:
    try:
        return call()
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed values, nested
    maps recursively, ``None`` (delete) for every key ``new`` dropped at any depth. (A patch of
    just ``new`` would keep a nested key it dropped, e.g. quantisation metrics after
    ``spec.quantize`` was removed.) Lists are replaced whole, as merge patch does."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif key not in old or before != value:
            patch[key] = value
    return patch


def _wrote(kind: str) -> None:
    """Count an API write (the scale benchmark reports writes per stage transition)."""
    metrics.API_WRITES.labels(kind).inc()


class Cluster:
    """The API calls the operator makes, on one kubernetes ApiClient."""

    def __init__(self, api_client: Any | None = None) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    # ------------------------------------------------------------------ reads

    def get_distillation(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _missing_ok(  # type: ignore[return-value]
            lambda: self.custom.get_namespaced_custom_object(
                API_GROUP, VERSION, namespace, PLURAL, name
            )
        )

    def served_apis(self) -> frozenset[str]:
        """The ``group/version`` pairs the API server serves (discovery, allowed to every
        authenticated client): which optional APIs (KServe, Kueue) this cluster has."""
        groups = client.ApisApi(self.custom.api_client).get_api_versions().groups or []
        return frozenset(v.group_version for g in groups for v in g.versions or [])

    def managed_children(self, namespace: str, served: Collection[str] | None = None) -> Listing:
        """Every RayJob and serving child the operator made in ``namespace``, with each LIST's
        resourceVersion; kinds whose API the cluster does not serve are skipped."""
        found: list[dict[str, Any]] = []
        versions: dict[str, str] = {}
        for kind, (group, version, plural) in KINDS.items():
            if served is not None and f"{group}/{version}" not in served:
                continue
            listed = _missing_ok(
                partial(
                    self.custom.list_namespaced_custom_object,
                    group,
                    version,
                    namespace,
                    plural,
                    label_selector=MANAGED_SELECTOR,
                )
            )
            if not isinstance(listed, dict):
                continue
            found += [item | {"kind": kind} for item in listed.get("items", [])]
            revision = (listed.get("metadata") or {}).get("resourceVersion")
            if revision:
                versions[kind] = str(revision)
        return Listing(found, versions)

    # ------------------------------------------------------------------ writes

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create a child and return it. A retried reconcile finds its own child there already
        (409): that one is returned; a name taken by an object this Distillation does not own
        raises ``ForeignChildError``, never counts as "already exists"."""
        group, version, plural = KINDS[obj["kind"]]
        meta = obj["metadata"]
        try:
            created = self.custom.create_namespaced_custom_object(
                group, version, meta["namespace"], plural, dict(obj), field_validation=STRICT
            )
            _wrote(f"create {obj['kind']}")
            return created if isinstance(created, dict) else None
        except ApiException as err:
            if err.status != 409:
                raise
        existing: dict[str, Any] = self.custom.get_namespaced_custom_object(  # type: ignore[assignment]
            group, version, meta["namespace"], plural, meta["name"]
        )
        owner_uids = {ref["uid"] for ref in meta.get("ownerReferences") or []}
        refs = (existing.get("metadata") or {}).get("ownerReferences") or []
        if not any(ref.get("uid") in owner_uids for ref in refs):
            owners = [f"{ref.get('kind')} {ref.get('name')}" for ref in refs]
            raise ForeignChildError(obj["kind"], meta["name"], owners)
        return existing

    def update_spec(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Replace a child's spec and its spec-hash annotation (a JSON patch: fields the new
        spec no longer has are removed, other annotations stay); the updated child."""
        group, version, plural = KINDS[obj["kind"]]
        meta = obj["metadata"]
        key = ANNOTATION_SPEC_HASH.replace("~", "~0").replace("/", "~1")
        operations = [
            {"op": "replace", "path": "/spec", "value": obj["spec"]},
            {
                "op": "add",
                "path": f"/metadata/annotations/{key}",
                "value": meta["annotations"][ANNOTATION_SPEC_HASH],
            },
        ]
        updated = self.custom.patch_namespaced_custom_object(
            group,
            version,
            meta["namespace"],
            plural,
            meta["name"],
            operations,
            field_validation=STRICT,
            _content_type="application/json-patch+json",
        )
        _wrote(f"patch {obj['kind']}")
        if not isinstance(updated, dict):
            raise TypeError(f"patching {meta['name']} returned {type(updated).__name__}")
        return updated

    def delete(self, kind: str, namespace: str, name: str) -> None:
        group, version, plural = KINDS[kind]
        _missing_ok(
            lambda: self.custom.delete_namespaced_custom_object(
                group, version, namespace, plural, name, propagation_policy="Background"
            )
        )
        _wrote(f"delete {kind}")

    def suspend_rayjob(self, namespace: str, name: str, suspend: bool) -> dict[str, Any] | None:
        """Set a RayJob's spec.suspend; the updated RayJob (None if it is gone)."""
        group, version, plural = RAYJOB
        updated = _missing_ok(
            lambda: self.custom.patch_namespaced_custom_object(
                group,
                version,
                namespace,
                plural,
                name,
                {"spec": {"suspend": suspend}},
                field_validation=STRICT,
            )
        )
        _wrote("patch RayJob")
        return dict(updated) if isinstance(updated, dict) else None

    def patch_status(
        self, namespace: str, name: str, old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> None:
        """Merge-patch status to ``new``; keys ``new`` dropped are removed, nested ones too."""
        body = {"status": merge_patch(old, new)}
        _missing_ok(
            lambda: self.custom.patch_namespaced_custom_object_status(
                API_GROUP, VERSION, namespace, PLURAL, name, body, field_validation=STRICT
            )
        )
        _wrote("patch status")

    def emit(self, owner: Mapping[str, Any], event: Event) -> None:
        """A core/v1 Event on the Distillation (failures are logged, never fatal)."""
        meta = owner["metadata"]
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{meta['name']}.", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=owner["apiVersion"],
                kind=owner["kind"],
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
            ),
            type=event.type,
            reason=event.reason,
            message=event.message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=MANAGED_BY),
            reporting_component=MANAGED_BY,
            reporting_instance=MANAGED_BY,
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
            _wrote("create Event")
        except ApiException as err:
            log.warning("could not record event %s on %s: %s", event.reason, meta["name"], err)
