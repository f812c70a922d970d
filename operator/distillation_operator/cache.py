"""What the operator knows of the children of Distillations, without listing them per reconcile.

Filled like an informer: one label-selected LIST per namespace (and again after ``resync``
seconds, so nothing a missed event left stale outlives it), then kept current by the watch
events kopf delivers and by the objects the operator's own writes return. An older event never
overwrites a newer object (resourceVersions from one etcd only grow).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Lister = Callable[[str], list[dict[str, Any]]]
RESYNC_SECONDS = 300.0


def _version(obj: Mapping[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


@dataclass
class ChildCache:
    """Children (RayJobs, InferenceServices) by namespace, kind and name."""

    resync: float = RESYNC_SECONDS
    clock: Callable[[], float] = time.monotonic
    _objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    _listed_at: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_listed(self, namespace: str, lister: Lister) -> None:
        """List ``namespace`` when never listed or listed longer ago than ``resync``."""
        listed = self._listed_at.get(namespace)
        if listed is not None and self.clock() - listed < self.resync:
            return
        items = lister(namespace)
        with self._lock:
            fresh = {(o["kind"], o["metadata"]["name"]): o for o in items}
            for key, old in self._objects.get(namespace, {}).items():
                if key in fresh and _version(old) > _version(fresh[key]):
                    fresh[key] = old  # an event newer than the list already arrived
            self._objects[namespace] = fresh
            self._listed_at[namespace] = self.clock()

    def observe(self, obj: Mapping[str, Any], deleted: bool = False) -> None:
        """A watch event or a write's answer."""
        meta = obj["metadata"]
        key = (str(obj["kind"]), str(meta["name"]))
        with self._lock:
            objects = self._objects.setdefault(str(meta["namespace"]), {})
            if deleted:
                objects.pop(key, None)
            elif key not in objects or _version(obj) >= _version(objects[key]):
                objects[key] = dict(obj)

    def owned(self, namespace: str, kind: str, owner_uid: str) -> list[dict[str, Any]]:
        """Children of ``kind`` whose controller reference is ``owner_uid``."""
        with self._lock:
            objects = list(self._objects.get(namespace, {}).items())
        return [
            obj
            for (k, _), obj in objects
            if k == kind
            and any(r.get("uid") == owner_uid for r in obj["metadata"].get("ownerReferences") or [])
        ]
