"""Operator at scale on the test control plane: many Distillations created at once.

Measures, in one run against one API server:
- ``vs_raw_create``: time until every Distillation has its first RayJob, divided by the time the
  raw API server takes to create the same number of RayJobs directly (same client, same
  concurrency).
- ``vs_floor``: the same time divided by the honest floor: the essential writes done raw, with no
  operator — each Distillation created, its RayJob created and one status patch (what any
  operator must write to report the stage). Target <= 1.3.
- ``handoff_p99_s``: a stage's RayJob marked complete (as KubeRay does) -> the next stage's
  RayJob exists, 99th percentile. Target < 1 s.
- ``writes_per_transition``: API writes the operator makes per stage hand-off (its own
  counter, ``distillation_api_writes_total``).
- ``operator_peak_mb``: the operator process's peak resident memory (VmHWM). Target <= 250.

Run: ``python bench/operator_scale.py [--quick] [--count N]`` (needs ``make tools``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.cluster import control_plane  # noqa: E402
from support.operator import Kube, OperatorProcess, succeed  # noqa: E402

CONCURRENCY = 16


def distillation(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "distillation.dev/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": name},
        "spec": {
            "teacher": {"model": "pvc://models/teacher"},
            "student": {"model": "pvc://models/student"},
            "dataset": {"prompts": "pvc://data/prompts.jsonl"},
            "output": f"pvc://artifacts/{name}",
        },
    }


def raw_rayjob(index: int) -> dict[str, Any]:
    """The very RayJob the operator builds for a Distillation's first stage (no owner, so the
    baseline creates the same bytes the operator does)."""
    from distillation_operator.api import DistillationSpec
    from distillation_operator.builders.common import Images
    from distillation_operator.builders.rayjob import build_rayjob
    from distillation_runtime.plan import make_plan

    body = distillation(f"raw-{index}")
    body["metadata"] |= {"namespace": "raw", "uid": f"uid-{index}"}
    spec = DistillationSpec.model_validate(body["spec"])
    images = Images("registry.test/runtime:1", "registry.test/quantize:1", "registry.test/vllm:1")
    rayjob = build_rayjob(body, spec, make_plan(spec.pipeline()), "preflight", 1, images)
    del rayjob["metadata"]["ownerReferences"]
    return rayjob


FLOOR_STATUS: dict[str, Any] = {
    "observedGeneration": 1,
    "phase": "Running",
    "currentStage": "preflight",
    "progress": "0/4",
    "conditions": [
        {
            "type": "Ready",
            "status": "False",
            "reason": "StageRunning",
            "message": "stage preflight: created",
            "lastTransitionTime": "2026-12-01T00:00:00Z",
            "observedGeneration": 1,
        }
    ],
}
"""A status of the size the operator writes for a Distillation whose first stage started."""


def essential_writes(kube: Kube, count: int) -> None:
    """What any operator must write for ``count`` Distillations up to their first RayJob, done
    raw: the Distillation, its RayJob, one status patch, each Distillation on one thread."""

    def one(index: int) -> None:
        body = distillation(f"floor-{index}")
        kube.custom.create_namespaced_custom_object(
            "distillation.dev", "v1alpha1", kube.namespace, "distillations", body
        )
        rayjob = raw_rayjob(index)
        rayjob["metadata"] |= {"name": f"floor-{index}-preflight-1", "namespace": kube.namespace}
        kube.custom.create_namespaced_custom_object(
            "ray.io", "v1", kube.namespace, "rayjobs", rayjob
        )
        kube.custom.patch_namespaced_custom_object_status(
            "distillation.dev",
            "v1alpha1",
            kube.namespace,
            "distillations",
            f"floor-{index}",
            {"status": FLOOR_STATUS},
        )

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(count)))


def create_all(
    kube: Kube, objects: list[dict[str, Any]], plural: str, group: str, version: str
) -> None:
    def one(obj: dict[str, Any]) -> None:
        kube.custom.create_namespaced_custom_object(group, version, kube.namespace, plural, obj)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, objects))


def namespace(api: Any, name: str) -> str:
    from kubernetes import client

    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    )
    return name


def stage_count(kube: Kube, stage: str) -> int:
    selector = f"distillation.dev/stage={stage}"
    found = kube.custom.list_namespaced_custom_object(
        "ray.io", "v1", kube.namespace, "rayjobs", label_selector=selector
    )
    return len(found["items"])


def writes(metrics_text: str) -> float:
    return sum(
        float(v)
        for v in re.findall(
            r"^distillation_api_writes_total\{[^}]*\} ([0-9.e+]+)$", metrics_text, re.M
        )
    )


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the control plane runs its parts as children)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (OSError, IndexError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants so far."""
    total = 0
    for each in descendants(pid):
        try:
            fields = _stat(each)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 Distillations, 20 hand-offs")
    parser.add_argument("--count", type=int, default=None, help="Distillations (default 300)")
    parser.add_argument("--handoffs", type=int, default=None, help="hand-offs timed (default 60)")
    args = parser.parse_args()
    count = args.count or (100 if args.quick else 300)
    handoffs = min(args.handoffs or (20 if args.quick else 60), count)

    with tempfile.TemporaryDirectory() as tmp, control_plane(Path(tmp) / "plane") as plane:
        api = plane.api_client()
        raw = Kube(api, namespace(api, "raw"))
        rayjobs = [raw_rayjob(i) for i in range(count)]
        t0 = time.perf_counter()
        create_all(raw, rayjobs, "rayjobs", "ray.io", "v1")
        raw_seconds = time.perf_counter() - t0
        floor = Kube(api, namespace(api, "floor"))
        for i in range(min(count, 20)):  # the RayJob builder's imports, out of the timing
            raw_rayjob(i)
        t0 = time.perf_counter()
        essential_writes(floor, count)
        floor_seconds = time.perf_counter() - t0

        kube = Kube(api, namespace(api, "scale"))
        pvc = Path(tmp) / "pvc"
        operator = OperatorProcess(plane, "scale", Path(tmp), pvc)
        operator.start()
        try:
            assert operator.process is not None
            cpu0 = cpu_seconds(operator.process.pid)
            server_pid = plane.process.pid if plane.process is not None else None
            server0 = cpu_seconds(server_pid) if server_pid else float("nan")
            t0 = time.perf_counter()
            create_all(
                kube,
                [distillation(f"d-{i}") for i in range(count)],
                "distillations",
                "distillation.dev",
                "v1alpha1",
            )
            while stage_count(kube, "preflight") < count:
                time.sleep(0.05)
            operator_seconds = time.perf_counter() - t0
            operator_cpu = cpu_seconds(operator.process.pid) - cpu0
            server_cpu = cpu_seconds(server_pid) - server0 if server_pid else float("nan")

            time.sleep(2.0)  # let the status writes of the first wave settle
            before = writes(operator.metrics())
            latencies = []
            for i in range(handoffs):
                name = f"d-{i}-preflight-1"
                succeed(kube, pvc, name, {"specProblems": []})
                start = time.perf_counter()
                while True:
                    try:
                        kube.rayjob(f"d-{i}-generate-1")
                        break
                    except Exception:
                        time.sleep(0.005)
                latencies.append(time.perf_counter() - start)
            time.sleep(2.0)
            per_transition = (writes(operator.metrics()) - before) / handoffs
            assert operator.process is not None
            memory = peak_mb(operator.process.pid)
        finally:
            operator.stop()

    ratio = operator_seconds / raw_seconds
    vs_floor = operator_seconds / floor_seconds
    p99 = percentile(latencies, 0.99)
    rows = [
        ("Distillations", f"{count}"),
        ("raw API server: create as many RayJobs", f"{raw_seconds:.2f} s"),
        ("operator: every Distillation has its first RayJob", f"{operator_seconds:.2f} s"),
        ("ratio to raw RayJob creates", f"{ratio:.2f}x"),
        ("floor: Distillation + RayJob + status patch each, raw", f"{floor_seconds:.2f} s"),
        ("ratio to the floor (target <= 1.3)", f"{vs_floor:.2f}x"),
        ("operator CPU time in that window", f"{operator_cpu:.2f} s"),
        ("API server (+etcd, GC) CPU time in that window", f"{server_cpu:.2f} s"),
        (
            f"hand-off p50 / p99 over {handoffs} (target p99 < 1 s)",
            f"{percentile(latencies, 0.5):.3f} / {p99:.3f} s",
        ),
        ("API writes per stage transition", f"{per_transition:.1f}"),
        ("operator peak RSS (target <= 250 MB)", f"{memory:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    print(
        json.dumps(
            {
                "vs_raw_create": round(ratio, 3),
                "vs_floor": round(vs_floor, 3),
                "floor_s": round(floor_seconds, 3),
                "handoff_p99_s": round(p99, 4),
                "writes_per_transition": round(per_transition, 2),
                "operator_peak_mb": round(memory, 1),
                "count": count,
                "raw_create_s": round(raw_seconds, 3),
                "operator_first_rayjob_s": round(operator_seconds, 3),
                "operator_cpu_s": round(operator_cpu, 3),
                "apiserver_cpu_s": round(server_cpu, 3),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
