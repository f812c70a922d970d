"""Where stages run when ``distill stage`` is a Ray job's driver, as under KubeRay.

The operator starts the Ray head with ``num-cpus: 0`` and no GPU; the work must happen on the
worker pods. A local multi-node Ray (``ray.cluster_utils.Cluster``: a head with no CPUs and
worker nodes, each its own raylet) stands for that cluster, and ``distill stage`` runs with
``RAY_ADDRESS`` set as Ray's job supervisor sets it for a driver. The manifest's ``ranOn``
says which Ray node did the work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
)
from distillation_runtime.plan import make_plan
from distillation_runtime.raycluster import WorkerNode, train_workers, worker_nodes
from distillation_runtime.spec import PipelineSpec, TrainSpec
from distillation_runtime.stages.train import (
    check_shared_output,
    checkpoint_mirror,
    steps_per_epoch,
    training_folder,
)
from distillation_runtime.storage import read_manifest
from distillation_runtime.yamlio import dump_yaml

DISTILL = Path(sys.executable).parent / "distill"


# --------------------------------------------------------------------------------------------
# Sizing, as data
# --------------------------------------------------------------------------------------------


def node(node_id: str, cpu: float, gpu: float = 0, alive: bool = True) -> dict[str, Any]:
    """A ``ray.nodes()`` entry."""
    resources = {"CPU": cpu, "memory": 1e9} | ({"GPU": gpu} if gpu else {})
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": "10.0.0.1",
        "Resources": resources,
    }


def test_the_head_with_no_cpus_and_dead_nodes_are_never_worker_nodes() -> None:
    found = worker_nodes([node("head", 0), node("w1", 8, 1), node("gone", 16, 8, alive=False)])
    assert [n.node_id for n in found] == ["w1"]
    assert (found[0].cpus, found[0].gpus) == (8.0, 1.0)


def test_the_node_with_gpus_comes_first() -> None:
    found = worker_nodes([node("cpu", 32), node("gpu", 8, 1)])
    assert [n.node_id for n in found] == ["gpu", "cpu"]


def test_train_workers_take_a_gpu_each_when_the_worker_pods_have_them() -> None:
    pods = [WorkerNode("a", "", 8, 1), WorkerNode("b", "", 6, 1)]
    sizing = train_workers(pods)
    assert sizing.use_gpu
    assert sizing.resources_per_worker == {"CPU": 6.0, "GPU": 1.0}
    cpu_only = train_workers([WorkerNode("a", "", 4, 0)])
    assert not cpu_only.use_gpu
    assert cpu_only.resources_per_worker == {"CPU": 4.0}


def test_training_works_beside_the_artifacts_when_every_pod_mounts_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL_PVC_ROOT", str(tmp_path / "mnt"))
    found = training_folder("pvc://artifacts/run/train-abc", tmp_path / "scratch")
    assert found == tmp_path / "mnt" / "artifacts" / "run" / "_work" / "train-abc"
    assert checkpoint_mirror("pvc://artifacts/run/train-abc") is None  # already shared
    on_s3 = training_folder("s3://bucket/run/train-abc", tmp_path / "scratch")
    assert on_s3 == tmp_path / "scratch" / "train-abc"
    assert checkpoint_mirror("s3://bucket/run/train-abc") == "s3://bucket/run/_work/train-abc"


def test_several_train_workers_in_a_cluster_are_refused_an_object_store_output() -> None:
    spec = TrainSpec.model_validate({"workers": 2})
    with pytest.raises(ValueError, match=r"train.workers is 2 .*s3://b/run/train-x.*pvc://"):
        check_shared_output(spec, "s3://b/run/train-x", in_ray_job=True)
    check_shared_output(spec, "s3://b/run/train-x", in_ray_job=False)  # distill run: one disk
    check_shared_output(spec, "pvc://claim/run/train-x", in_ray_job=True)


# --------------------------------------------------------------------------------------------
# On a multi-node Ray: a head with no CPUs, worker nodes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head like the operator's (no CPUs, no GPU) and two worker nodes of one CPU each."""
    from ray.cluster_utils import Cluster

    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        made.add_node(num_cpus=1)
    made.wait_for_nodes()
    try:
        yield made
    finally:
        made.shutdown()  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("placement")
    tokenizer = make_tokenizer()
    save_pretrained(make_model(tokenizer, ModelSize(), seed=1), tokenizer, root / "teacher")
    save_pretrained(
        make_model(tokenizer, ModelSize(hidden=32, layers=1), seed=2), tokenizer, root / "student"
    )
    with (root / "prompts.jsonl").open("w") as f:
        for e in sample_examples("addition", 24, seed=0):
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n")
    return root


def pipeline(root: Path, workers: int) -> dict[str, Any]:
    return {
        "teacher": {"model": str(root / "teacher")},
        "student": {"model": str(root / "student")},
        "dataset": {"prompts": str(root / "prompts.jsonl"), "evalFraction": "0.25"},
        "generate": {"maxNewTokens": 4, "topLogprobs": 4},
        "train": {"losses": {"logits": {}}, "epochs": 1, "batchSize": 4, "workers": workers},
        "output": str(root / f"artifacts-{workers}"),
    }


def stage_in_ray_job(name: str, spec: dict[str, Any], address: str) -> None:
    """``distill stage NAME`` as a Ray job's driver runs it (``RAY_ADDRESS`` set)."""
    env = {**os.environ, "RAY_ADDRESS": address, "DISTILL_SPEC": dump_yaml(spec)}
    done = subprocess.run(
        [str(DISTILL), "stage", name, "--config-env", "DISTILL_SPEC"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def ray_node_ids(address: str) -> dict[str, float]:
    """Node id -> CPUs of the cluster at ``address``, asked from a separate process."""
    code = (
        f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(json.dumps({n['NodeID']: n['Resources'].get('CPU', 0) for n in ray.nodes()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_stages_run_on_a_worker_node_and_ray_train_spreads_over_both(
    cluster: Any, inputs: Path
) -> None:
    cpus = ray_node_ids(cluster.address)
    head = cluster.head_node.node_id
    workers = {n for n, c in cpus.items() if c > 0}
    assert head not in workers
    assert len(workers) == 2

    one = pipeline(inputs, workers=1)
    plan = make_plan(PipelineSpec.model_validate(one))
    for name in ("generate", "train"):
        stage_in_ray_job(name, one, cluster.address)
        ran_on = read_manifest(plan.artifact(name))["ranOn"]
        # the whole stage ran on a worker node, never in the driver on the CPU-less head
        assert ran_on["rayNode"] in workers, (name, ran_on)

    two = pipeline(inputs, workers=2)
    two_plan = make_plan(PipelineSpec.model_validate(two))
    stage_in_ray_job("generate", two, cluster.address)
    stage_in_ray_job("train", two, cluster.address)
    manifest = read_manifest(two_plan.artifact("train"))
    # two Ray Train workers, one per worker node (each has one CPU; the head has none): each
    # took half the records, so an epoch took half the optimizer steps
    records = read_manifest(two_plan.artifact("generate"))["metrics"]["trainPrompts"]
    single = read_manifest(plan.artifact("train"))["metrics"]["steps"]
    assert single == steps_per_epoch(records, 4, 1, 1)
    assert manifest["metrics"]["steps"] == steps_per_epoch(records, 4, 1, 2) < single
    trained = Path(two_plan.artifact("train")) / "model" / "model.safetensors"
    assert trained.exists()
    # checkpoints live beside the artifacts, where a new pod (or any worker) finds them
    work = Path(two["output"]) / "_work" / Path(two_plan.artifact("train")).name
    assert list((work / "checkpoints").glob("step-*")), work


def test_ray_is_joined_inside_a_ray_job_and_started_anew_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distillation_runtime.raycluster import init_address

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what the job supervisor sets
    assert init_address() is None  # ray.init reads RAY_ADDRESS: the job's cluster
    monkeypatch.delenv("RAY_ADDRESS")
    assert init_address() == "local"  # never a cluster another run left recorded
