"""Where a stage's work runs when ``distill stage`` is the driver of a Ray job.

KubeRay's submitter runs a RayJob's entrypoint on the Ray head, which the operator starts with
``num-cpus: 0`` and no GPU: whatever the driver computes itself runs on the head pod's few CPUs
while the GPU worker pods idle. So a stage does not run in the driver: the runner sends it, whole
(inputs fetched, work done, artifact published), to one worker node as a Ray task holding all of
that node's CPUs and GPUs (torch then sees the worker's GPUs and uses all its cores). Only a
stage that spreads its own work over several workers (Ray Train with ``train.workers > 1``)
stays in the driver, and sizes those workers from the nodes found here, not from the head.

Outside a Ray job (``distill run``, the demo's KubeRay stand-in) nothing changes: the stage runs
in this process. Ray sets ``RAY_ADDRESS`` for every job's driver; that is how one is recognised.
Light module: ray is imported inside the functions that need it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerNode:
    """A Ray node that can run work: its id and what it offers."""

    node_id: str
    address: str
    cpus: float
    gpus: float


def in_ray_job() -> bool:
    """This process is a Ray job's driver (Ray's job supervisor sets ``RAY_ADDRESS``)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def init_address() -> str | None:
    """What ``ray.init`` connects to: the Ray job's cluster inside one (None: its
    ``RAY_ADDRESS``), else ``"local"``, a Ray of this run's own. Without it ``ray.init`` joins
    whatever cluster /tmp/ray records as current, and a run killed mid-way leaves that record
    behind: every later run failed with "Failed to connect to Ray cluster"."""
    return None if in_ray_job() else "local"


def worker_nodes(nodes: Sequence[Mapping[str, Any]]) -> list[WorkerNode]:
    """The alive nodes with CPUs to offer (``ray.nodes()`` entries), the biggest first. The
    operator's head has ``num-cpus: 0``, so it is never one of them."""
    found = [
        WorkerNode(
            node_id=str(node["NodeID"]),
            address=str(node.get("NodeManagerAddress", "")),
            cpus=float((node.get("Resources") or {}).get("CPU", 0)),
            gpus=float((node.get("Resources") or {}).get("GPU", 0)),
        )
        for node in nodes
        if node.get("Alive")
    ]
    workers = [n for n in found if n.cpus > 0]
    return sorted(workers, key=lambda n: (-n.gpus, -n.cpus, n.node_id))


def cluster_workers() -> list[WorkerNode]:
    """The worker nodes of the Ray cluster this driver belongs to (connecting if needed)."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return worker_nodes(nodes)


def task_options(node: WorkerNode) -> dict[str, Any]:
    """Ray task options that put one task on ``node`` holding all of its CPUs and GPUs, never
    retried (the operator decides retries, as new RayJobs)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {
        "num_cpus": node.cpus,
        "num_gpus": node.gpus,
        "max_retries": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False),
    }


def run_on(node: WorkerNode, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` as a Ray task on ``node``; its exception, if any, raised here."""
    import ray

    remote = ray.remote(function).options(**task_options(node))
    result: T = ray.get(remote.remote(*args))
    return result


@dataclass(frozen=True)
class TrainWorkers:
    """How Ray Train's workers are sized on the cluster's nodes."""

    use_gpu: bool
    resources_per_worker: dict[str, float]


def train_workers(nodes: Sequence[WorkerNode]) -> TrainWorkers:
    """One Ray Train worker per worker pod (the operator makes ``train.workers`` of them), each
    with the smallest pod's CPUs and one GPU when every pod has one: decided by the workers'
    nodes, never by the head the driver runs on. Ray Train v2's controller takes no CPU, so
    the workers can hold whole pods."""
    gpu = bool(nodes) and all(n.gpus >= 1 for n in nodes)
    cpus = max(1.0, min((n.cpus for n in nodes), default=1.0))
    return TrainWorkers(
        use_gpu=gpu, resources_per_worker={"CPU": cpus} | ({"GPU": 1.0} if gpu else {})
    )


def ran_on() -> dict[str, Any]:
    """Where this process runs, for a stage's manifest: the host (a pod's name in a cluster)
    and the Ray node when inside Ray."""
    import socket
    import sys

    node = None
    if "ray" in sys.modules:  # never import ray just to ask
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    return {"host": socket.gethostname(), "rayNode": node}
