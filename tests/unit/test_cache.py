"""The operator's child cache: listed once per resync, then kept current by events and writes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from distillation_operator.cache import ChildCache, Listing


def rayjob(name: str, version: int, owner: str = "u-1", **status: Any) -> dict[str, Any]:
    return {
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "resourceVersion": str(version),
            "ownerReferences": [{"uid": owner, "controller": True}],
        },
        "status": status,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lists_once_per_resync_and_follows_events() -> None:
    clock, calls = Clock(), []

    def lister(namespace: str) -> list[dict[str, Any]]:
        calls.append(namespace)
        return [rayjob("a", 5), rayjob("other", 5, owner="u-2")]

    cache = ChildCache(resync=300, clock=clock)
    cache.ensure_listed("ml", lister)
    cache.ensure_listed("ml", lister)
    assert calls == ["ml"]
    assert [o["metadata"]["name"] for o in cache.owned("ml", "RayJob", "u-1")] == ["a"]

    cache.observe(rayjob("a", 7, jobDeploymentStatus="Running"))
    cache.observe(rayjob("a", 6, jobDeploymentStatus="Initializing"))  # late, older event
    assert cache.owned("ml", "RayJob", "u-1")[0]["status"]["jobDeploymentStatus"] == "Running"

    cache.observe(rayjob("a", 8), deleted=True)
    assert cache.owned("ml", "RayJob", "u-1") == []

    clock.now = 301  # a missed deletion or creation cannot outlive the resync period
    cache.ensure_listed("ml", lister)
    assert calls == ["ml", "ml"]


def test_a_list_older_than_an_event_keeps_the_event() -> None:
    cache = ChildCache()
    cache.observe(rayjob("a", 9, jobDeploymentStatus="Complete"))
    cache.ensure_listed("ml", lambda _: [rayjob("a", 4)])
    assert cache.owned("ml", "RayJob", "u-1")[0]["metadata"]["resourceVersion"] == "9"


# ------------------------------------------------------------ a LIST racing with events
#
# A LIST is a snapshot taken while the watch keeps delivering: each test's lister injects an
# event after the LIST "started" (it was called) and before it "returned" (with an older view).

LIST_VERSION = 10
"""The revision the racing LIST's snapshot was taken at."""


def answer(items: list[dict[str, Any]], with_version: bool) -> list[dict[str, Any]] | Listing:
    """The LIST's answer, with its resourceVersion or, as a plain list, without one."""
    return Listing(items, {"RayJob": str(LIST_VERSION)}) if with_version else items


def names(cache: ChildCache) -> list[str]:
    return sorted(o["metadata"]["name"] for o in cache.owned("ml", "RayJob", "u-1"))


@pytest.mark.parametrize("with_version", [True, False], ids=["list-rv", "no-list-rv"])
def test_a_child_created_while_a_list_runs_is_not_lost(with_version: bool) -> None:
    cache = ChildCache()

    def lister(_: str) -> list[dict[str, Any]] | Listing:
        cache.observe(rayjob("demo-train-1", 11))  # the operator's create returns, mid-LIST
        return answer([rayjob("demo-generate-1", 5)], with_version)

    cache.ensure_listed("ml", lister)
    assert names(cache) == ["demo-generate-1", "demo-train-1"]


@pytest.mark.parametrize("with_version", [True, False], ids=["list-rv", "no-list-rv"])
def test_a_child_deleted_while_a_list_runs_is_not_resurrected(with_version: bool) -> None:
    clock = Clock()
    cache = ChildCache(resync=300, clock=clock)
    cache.ensure_listed("ml", lambda _: [rayjob("a", 5)])
    clock.now = 301

    def lister(_: str) -> list[dict[str, Any]] | Listing:
        cache.observe(rayjob("a", 11), deleted=True)  # the watch's DELETED, mid-LIST
        return answer([rayjob("a", 5)], with_version)

    cache.ensure_listed("ml", lister)
    assert names(cache) == []


def test_a_deletion_during_the_first_list_is_remembered() -> None:
    cache = ChildCache()

    def lister(_: str) -> list[dict[str, Any]]:
        cache.observe(rayjob("a", 11), deleted=True)
        return [rayjob("a", 5), rayjob("b", 5)]

    cache.ensure_listed("ml", lister)
    assert names(cache) == ["b"]


def test_tombstones_last_until_a_list_no_longer_shows_the_object() -> None:
    clock = Clock()
    cache = ChildCache(resync=300, clock=clock)
    cache.observe(rayjob("a", 5))
    cache.observe(rayjob("a", 8), deleted=True)

    def tombstones() -> int:
        return len(cache._namespaces["ml"].tombstones)

    cache.ensure_listed("ml", lambda _: [rayjob("a", 5)])  # a LIST older than the deletion
    assert (names(cache), tombstones()) == ([], 1)
    clock.now = 301
    cache.ensure_listed("ml", lambda _: [])  # the first LIST that no longer has it
    assert (names(cache), tombstones()) == ([], 0)


def test_a_child_recreated_after_its_deletion_is_seen() -> None:
    cache = ChildCache()
    cache.observe(rayjob("a", 5))
    cache.observe(rayjob("a", 8), deleted=True)
    cache.ensure_listed("ml", lambda _: [rayjob("a", 12)])  # same name, a new object
    assert cache.owned("ml", "RayJob", "u-1")[0]["metadata"]["resourceVersion"] == "12"


def test_late_events_do_not_undo_what_is_known() -> None:
    cache = ChildCache()
    cache.observe(rayjob("a", 5))
    cache.observe(rayjob("a", 8), deleted=True)
    cache.observe(rayjob("a", 7))  # an update older than the deletion, delivered after it
    assert names(cache) == []
    cache.observe(rayjob("b", 12))
    cache.observe(rayjob("b", 9), deleted=True)  # the deletion of an older "b"
    assert names(cache) == ["b"]


@pytest.mark.parametrize("with_version", [True, False], ids=["list-rv", "no-list-rv"])
def test_a_list_drops_what_was_deleted_before_it(with_version: bool) -> None:
    clock = Clock()
    cache = ChildCache(resync=300, clock=clock)
    cache.observe(rayjob("a", 5))  # its DELETED event is missed
    cache.ensure_listed("ml", lambda _: answer([], with_version))
    assert names(cache) == []


def test_an_event_older_than_the_list_is_no_reason_to_keep_an_object() -> None:
    """Order is only the fallback: with both resourceVersions, an update seen during the LIST
    but older than its snapshot means the object was gone by then."""
    cache = ChildCache()

    def lister(_: str) -> list[dict[str, Any]] | Listing:
        cache.observe(rayjob("a", LIST_VERSION - 1))
        return answer([], with_version=True)

    cache.ensure_listed("ml", lister)
    assert names(cache) == []


def test_concurrent_reconciles_share_one_list() -> None:
    cache, calls, release = ChildCache(), [], threading.Event()

    def lister(namespace: str) -> list[dict[str, Any]]:
        calls.append(namespace)
        release.wait(5)
        return [rayjob("a", 5)]

    threads = [threading.Thread(target=cache.ensure_listed, args=("ml", lister)) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.1)  # the others reach ensure_listed while the first LIST is out
    release.set()
    for thread in threads:
        thread.join(5)
    assert (calls, names(cache)) == (["ml"], ["a"])


def test_a_reconcile_that_read_a_child_before_its_deletion_can_tell() -> None:
    """The operator's gauges must not count a RayJob again because a reconcile that listed it
    finished after the deletion event (a Distillation deleted with finished RayJobs)."""
    cache = ChildCache()
    read = rayjob("a", 5)
    cache.observe(read)
    assert not cache.deleted(read)
    cache.observe(rayjob("a", 6), deleted=True)
    assert cache.deleted(read)
    assert not cache.deleted(rayjob("a", 9))  # a new object of the same name is not gone
