"""The operator's child cache: listed once per resync, then kept current by events and writes."""

from __future__ import annotations

from typing import Any

from distillation_operator.cache import ChildCache


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
