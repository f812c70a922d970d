"""What the operator knows of the children of Distillations, without listing them per reconcile.

Filled like an informer: one label-selected LIST per namespace (and again after ``resync``
seconds, so nothing a missed event left stale outlives it), then kept current by the watch
events kopf delivers and by the objects the operator's own writes return. An older event never
overwrites a newer object (resourceVersions from one etcd only grow).

A LIST takes time, and events keep arriving while it runs, so its answer is a snapshot older
than some of what the cache already knows. Merging it the way client-go's informer store does:

- an object the cache has observed newer than the LIST (a RayJob the operator created while
  the LIST ran) survives a LIST that does not include it: it is not lost, so reconcile does not
  create a second RayJob for the same stage;
- a deletion observed is remembered as a tombstone (the deleted object's resourceVersion), so a
  LIST that started before the deletion and still shows the object does not resurrect it;
  a tombstone goes after the first complete LIST that no longer shows the object.

"Newer" compares resourceVersions as integers where both parse (etcd revisions: what the API
server gives); where one does not, whatever was observed after the LIST started is newer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

RESYNC_SECONDS = 300.0

Key = tuple[str, str]
"""(kind, name) of a child within its namespace."""


@dataclass(frozen=True)
class Listing:
    """One namespace's LIST answer: the items and, per kind, the LIST's own resourceVersion
    (the response's ``metadata.resourceVersion``: the snapshot's revision). A kind without one
    falls back to "observed after the LIST started" for what the LIST did not show."""

    items: list[dict[str, Any]]
    versions: Mapping[str, str] = field(default_factory=dict)


Lister = Callable[[str], "list[dict[str, Any]] | Listing"]
"""Lists a namespace's children; a plain list is a Listing without resourceVersions."""


def _version(value: object) -> int | None:
    """A resourceVersion as an integer, or None where it is missing or not a number."""
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _newer(a: object, b: object) -> bool | None:
    """Whether resourceVersion ``a`` is newer than ``b``; None where they cannot be compared."""
    va, vb = _version(a), _version(b)
    if va is None or vb is None:
        return None
    return va > vb


def _rv(obj: Mapping[str, Any]) -> object:
    return obj["metadata"].get("resourceVersion")


def _key(obj: Mapping[str, Any]) -> Key:
    return (str(obj["kind"]), str(obj["metadata"]["name"]))


@dataclass
class _Entry:
    """A known child and the observation number that last wrote it (a LIST's items carry the
    number of the LIST's start: they are known as of then)."""

    obj: dict[str, Any]
    seen: int


@dataclass
class _Tombstone:
    """A deletion: the deleted object's resourceVersion and the observation number of it."""

    version: object
    seen: int


@dataclass
class _Namespace:
    objects: dict[Key, _Entry] = field(default_factory=dict)
    tombstones: dict[Key, _Tombstone] = field(default_factory=dict)


def _after_list(version: object, seen: int, listed: object, started: int) -> bool:
    """Whether an observation is newer than a LIST (of revision ``listed``, started at
    observation number ``started``): by resourceVersion where both parse, else by order."""
    newer = _newer(version, listed)
    return seen > started if newer is None else newer


def _newer_than_item(version: object, seen: int, item: Mapping[str, Any], started: int) -> bool:
    """Whether an observation is newer than a LIST's item of the same name."""
    newer = _newer(version, _rv(item))
    return seen > started if newer is None else newer


def _merge_listing(known: _Namespace, listing: Listing, started: int) -> _Namespace:
    """The namespace after a LIST that started at observation number ``started``.

    A pure function of what was known and what was listed: the LIST's items replace what is
    known except where the cache observed something newer (an update, a creation, a deletion)."""
    merged = _Namespace()
    listed: set[Key] = set()
    for item in listing.items:
        key = _key(item)
        listed.add(key)
        tomb = known.tombstones.get(key)
        if tomb is not None and _newer_than_item(tomb.version, tomb.seen, item, started):
            merged.tombstones[key] = tomb  # deleted after the LIST saw it: no resurrection
            continue
        entry = known.objects.get(key)
        if entry is not None and _newer_than_item(_rv(entry.obj), entry.seen, item, started):
            merged.objects[key] = entry  # an event newer than the LIST already arrived
        else:
            merged.objects[key] = _Entry(dict(item), started)
    for key, entry in known.objects.items():
        if key not in listed and _after_list(
            _rv(entry.obj), entry.seen, listing.versions.get(key[0]), started
        ):
            merged.objects[key] = entry  # created while the LIST ran: not lost
    for key, tomb in known.tombstones.items():
        if key not in listed and _after_list(
            tomb.version, tomb.seen, listing.versions.get(key[0]), started
        ):
            merged.tombstones[key] = tomb  # deleted while the LIST ran: a late event may follow
    return merged


@dataclass
class ChildCache:
    """Children (RayJobs, InferenceServices) by namespace, kind and name."""

    resync: float = RESYNC_SECONDS
    clock: Callable[[], float] = time.monotonic
    _namespaces: dict[str, _Namespace] = field(default_factory=dict)
    _listed_at: dict[str, float] = field(default_factory=dict)
    _seen: int = 0
    """Observation counter: orders events against LISTs where resourceVersions do not parse."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listing: dict[str, threading.Lock] = field(default_factory=dict)

    def _due(self, namespace: str) -> bool:
        listed = self._listed_at.get(namespace)
        return listed is None or self.clock() - listed >= self.resync

    def ensure_listed(self, namespace: str, lister: Lister) -> None:
        """List ``namespace`` when never listed or listed longer ago than ``resync``.

        One LIST per namespace at a time: reconciles that need it meanwhile wait for it rather
        than each sending their own (32 at once after a restart)."""
        if not self._due(namespace):
            return
        with self._lock:
            gate = self._listing.setdefault(namespace, threading.Lock())
        with gate:
            if not self._due(namespace):
                return  # another reconcile listed while this one waited
            with self._lock:
                started = self._seen
            answer = lister(namespace)
            listing = answer if isinstance(answer, Listing) else Listing(list(answer))
            with self._lock:
                known = self._namespaces.get(namespace, _Namespace())
                self._namespaces[namespace] = _merge_listing(known, listing, started)
                self._listed_at[namespace] = self.clock()

    def observe(self, obj: Mapping[str, Any], deleted: bool = False) -> None:
        """A watch event or a write's answer."""
        key, version = _key(obj), _rv(obj)
        with self._lock:
            self._seen += 1
            ns = self._namespaces.setdefault(str(obj["metadata"]["namespace"]), _Namespace())
            entry = ns.objects.get(key)
            if deleted:
                if entry is not None and _newer(_rv(entry.obj), version):
                    return  # a late deletion of an older object of this name
                ns.objects.pop(key, None)
                ns.tombstones[key] = _Tombstone(version, self._seen)
                return
            tomb = ns.tombstones.get(key)
            if tomb is not None and _newer(version, tomb.version) is False:
                return  # a late event of an object already deleted
            if entry is not None and _newer(_rv(entry.obj), version):
                return  # older than what is known
            ns.tombstones.pop(key, None)
            ns.objects[key] = _Entry(dict(obj), self._seen)

    def deleted(self, obj: Mapping[str, Any]) -> bool:
        """Whether a deletion of this object (this version or a later one) was observed: a
        reconcile that read it before the deletion must not bring it back into the gauges."""
        key, version = _key(obj), _rv(obj)
        with self._lock:
            ns = self._namespaces.get(str(obj["metadata"]["namespace"]))
            tomb = ns.tombstones.get(key) if ns is not None else None
        return tomb is not None and _newer(version, tomb.version) is not True

    def owned(self, namespace: str, kind: str, owner_uid: str) -> list[dict[str, Any]]:
        """Children of ``kind`` whose controller reference is ``owner_uid``."""
        with self._lock:
            ns = self._namespaces.get(namespace)
            objects = [] if ns is None else [(k, e.obj) for k, e in ns.objects.items()]
        return [
            obj
            for (k, _), obj in objects
            if k == kind
            and any(r.get("uid") == owner_uid for r in obj["metadata"].get("ownerReferences") or [])
        ]
