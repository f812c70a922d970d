"""The product as a platform team first meets it, on a real node: ``helm install`` of the chart
(the operator as a pod, under its own ServiceAccount and RBAC), the real KubeRay operator as a
pod, and a tiny Distillation whose every stage runs in Ray pods of the runtime image, submitted
by KubeRay's own submitter, its artifacts on a volume this test reads afterwards. The student is
then served by a KServe STAND-IN (tests/support/kserve_pods.py: KServe's controller does not
build here) that runs the operator's predictor container in a pod and marks the
InferenceService Ready only when that pod answers a completion.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.chart import CHART
from support.cluster import REPO
from support.kserve_pods import KServePodStandIn
from support.kuberay import install_kuberay
from support.node import Node

sys.path.insert(0, str(REPO / "hack" / "demo"))
from demo_models import EXAMPLE_PROMPT, EXPECTED, write_inputs
from run import distillation as demo_distillation

NAMESPACE = "distill-e2e"
OPERATOR_NAMESPACE = "distillation-system"
CLAIMS = ("models", "data", "artifacts")
RUNTIME_UID = 65532
"""The user the runtime image runs as: the claims' folders are theirs."""
DEMO_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "distillation-operator"
    / "demo"
)
PIPELINE_TIMEOUT = 40 * 60
FAKE_HUB_TOKEN = f"hf_e2e{uuid.uuid4().hex}"
"""The Secret's value: every Ray pod gets it as HF_TOKEN; it must appear nowhere else."""
OPERATOR_POD_KILLED_IN = "train"
"""The stage during which the operator's pod is deleted (its Deployment makes a new one)."""


def distillation() -> dict[str, Any]:
    """The demo's Distillation (hack/demo/run.py), sized for one 2-CPU node: a Ray head and one
    worker per stage (with KubeRay's submitter pod beside them), each stage's Ray cluster
    removed as soon as it finishes so the next one fits; and a hub token from a Secret."""
    body = demo_distillation()
    body["metadata"]["name"] = "tiny"
    spec = body["spec"]
    del spec["generate"]["batchSize"]
    spec["placement"] = {
        "head": {"cpu": "400m", "memory": "2Gi"},
        "workers": {"cpu": "750m", "memory": "3Gi", "replicas": 1},
    }
    spec["serve"] |= {"cpu": "500m", "memory": "2Gi"}
    spec["secrets"] = {"huggingFaceToken": {"name": "hub", "key": "token"}}
    spec["output"] = "pvc://artifacts/tiny"
    spec["policy"]["ttlSecondsAfterFinished"] = 0
    return body


def host_claims(node: Node, root: Path, namespace: str, claims: tuple[str, ...]) -> None:
    """One hostPath PersistentVolume per claim, bound to that claim in ``namespace`` (claims of
    the same name in two namespaces share the folder: what an RWX volume gives a cluster)."""
    objects = []
    for claim in claims:
        folder = root / claim
        folder.mkdir(parents=True, exist_ok=True)
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"{namespace}-{claim}"},
                "spec": {
                    "capacity": {"storage": "5Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "hostPath": {"path": str(folder), "type": "Directory"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "volumeName": f"{namespace}-{claim}",
                    "resources": {"requests": {"storage": "5Gi"}},
                },
            }
        )
    node.plane.kubectl("apply", "-f", "-", stdin="\n---\n".join(yaml.safe_dump(o) for o in objects))
    for claim in CLAIMS:
        node.plane.kubectl(
            "wait",
            "--for=jsonpath={.status.phase}=Bound",
            f"pvc/{claim}",
            "-n",
            NAMESPACE,
            "--timeout=60s",
        )


def operator_pods(node: Node) -> list[str]:
    """The operator's pods (``pod/NAME``), as the chart labels them."""
    return node.plane.kubectl(
        "get",
        "pods",
        "-n",
        OPERATOR_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=distillation-operator",
        "-o",
        "name",
    ).stdout.split()


class OperatorPodKiller:
    """Deletes the operator's pod once, when the Distillation's current stage is ``stage``."""

    def __init__(self, node: Node, stage: str) -> None:
        self.node, self.stage = node, stage
        self.killed: str | None = None

    def __call__(self, distillation: dict[str, Any]) -> None:
        stages = (distillation.get("status") or {}).get("stages") or []
        running = {s["name"] for s in stages if s.get("state") == "Running"}
        if self.killed or self.stage not in running:
            return
        pods = operator_pods(self.node)
        self.node.plane.kubectl("delete", "-n", OPERATOR_NAMESPACE, *pods, "--wait=false")
        self.killed = " ".join(pods)
        print(f"deleted the operator's pod {self.killed} during {self.stage}", flush=True)


def chown_tree(root: Path, uid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, uid)


OPERATOR_VALUES = {
    # the operator reads the stages' manifests (metrics, the gate) from the pvc:// output
    "extraVolumes": [
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": "artifacts", "readOnly": True}}
    ],
    "extraVolumeMounts": [
        {"name": "artifacts", "mountPath": "/mnt/pvc/artifacts", "readOnly": True}
    ],
}


def helm_install_operator(node: Node, workdir: Path) -> None:
    """The chart as a user installs it (its default images: the ones `make images` built; the
    Distillation CRD with it), with the output's claim mounted read-only."""
    values = workdir / "operator-values.yaml"
    values.write_text(yaml.safe_dump(OPERATOR_VALUES))
    node.plane.helm(
        "install",
        "distillation-operator",
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--values",
        str(values),
        "--wait",
        "--timeout",
        "5m",
        timeout=330,
    )
    node.plane.wait_established("distillations.distillation.dev")


def stage_times(distillation: dict[str, Any]) -> str:
    """Each stage's wall time, from its status (RayJob created to RayJob finished)."""
    from datetime import datetime

    def seconds(stage: dict[str, Any]) -> float:
        start = datetime.fromisoformat(stage["startTime"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(stage["completionTime"].replace("Z", "+00:00"))
        return (end - start).total_seconds()

    stages = distillation["status"].get("stages") or []
    return "stages: " + ", ".join(
        f"{s['name']} {seconds(s):.0f} s" for s in stages if s.get("completionTime")
    )


def summary(node: Node) -> str:
    return node.plane.kubectl(
        "get", "dist,rayjobs,rayclusters,pods,inferenceservices", "-A", "-o", "wide", check=False
    ).stdout


def wait_ready(
    node: Node, timeout: float, on_change: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """The Distillation once finished (Succeeded or Failed), printing its rows as they change
    and calling ``on_change`` with it each time."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        got = json.loads(
            node.plane.kubectl("get", "dist", "tiny", "-n", NAMESPACE, "-o", "json").stdout
        )
        row = node.plane.kubectl(
            "get", "dist", "tiny", "-n", NAMESPACE, "--no-headers"
        ).stdout.strip()
        row = row.rsplit(maxsplit=1)[0]  # without the AGE column
        if row != last:
            print(f"{time.strftime('%H:%M:%S')} {row}", flush=True)
            last = row
            on_change(got)
        if (got.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not Ready after {timeout}s:\n{summary(node)}")
        time.sleep(5)


@pytest.fixture(scope="module")
def pipeline(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Install everything, apply the Distillation, wait for it; yields what the tests look at."""
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("claims")
    for namespace in (NAMESPACE, OPERATOR_NAMESPACE):
        node.plane.kubectl("create", "namespace", namespace)
    node.plane.kubectl(
        "create",
        "secret",
        "generic",
        "hub",
        "-n",
        NAMESPACE,
        f"--from-literal=token={FAKE_HUB_TOKEN}",
    )
    write_inputs(DEMO_CACHE, root)  # the teacher, student and prompts on the claims' folders
    host_claims(node, root, NAMESPACE, CLAIMS)
    host_claims(node, root, OPERATOR_NAMESPACE, ("artifacts",))
    chown_tree(root, RUNTIME_UID)
    install_kuberay(node.plane)
    helm_install_operator(node, root.parent)
    installed = time.monotonic() - t0

    from kubernetes import config

    api = config.new_client_from_config(config_file=str(node.plane.kubeconfig))
    stand_in = KServePodStandIn(api, NAMESPACE, EXAMPLE_PROMPT)
    stop = threading.Event()
    thread = threading.Thread(target=stand_in.run, args=(stop,), daemon=True)
    thread.start()
    try:
        node.plane.kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(distillation()))
        killer = OperatorPodKiller(node, OPERATOR_POD_KILLED_IN)
        final = wait_ready(node, PIPELINE_TIMEOUT, killer)
        print(f"installed in {installed:.0f} s; pipeline {time.monotonic() - t0 - installed:.0f} s")
        print(stage_times(final))
        print(summary(node))
        yield {"distillation": final, "root": root, "stand_in": stand_in, "killed": killer.killed}
    finally:
        stop.set()
        thread.join(timeout=10)


def test_every_stage_ran_in_ray_pods_and_the_student_is_served(pipeline: dict[str, Any]) -> None:
    final = pipeline["distillation"]
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Served"), ready
    states = {s["name"]: s["state"] for s in status["stages"]}
    assert set(states) == {"preflight", "generate", "train", "evaluate"}, states
    assert set(states.values()) == {"Succeeded"}, states
    answer = pipeline["stand_in"].answers.get("tiny")
    assert answer, pipeline["stand_in"].errors
    assert answer["choices"][0]["text"].strip().startswith(EXPECTED[:3]), answer


def test_kuberay_ran_each_stage_and_its_artifact_is_on_the_volume(
    node: Node, pipeline: dict[str, Any]
) -> None:
    rayjobs = json.loads(node.plane.kubectl("get", "rayjobs", "-n", NAMESPACE, "-o", "json").stdout)
    stages = {s["name"] for s in pipeline["distillation"]["status"]["stages"]}
    seen = set()
    for job in rayjobs["items"]:
        meta, status = job["metadata"], job.get("status") or {}
        if status.get("jobStatus") != "SUCCEEDED":
            continue  # an attempt that failed and was retried
        assert status.get("jobDeploymentStatus") == "Complete", status
        seen.add(meta["labels"]["distillation.dev/stage"])
        uri = meta["annotations"]["distillation.dev/artifact"]
        artifact = pipeline["root"] / uri.removeprefix("pvc://")
        assert (artifact / "_COMPLETE").exists(), artifact
        manifest = json.loads((artifact / "manifest.json").read_text())
        assert manifest["fingerprint"] == meta["annotations"]["distillation.dev/fingerprint"]
    assert seen == stages, (seen, stages)


def test_a_deleted_operator_pod_neither_duplicates_a_rayjob_nor_reruns_a_stage(
    node: Node, pipeline: dict[str, Any]
) -> None:
    assert pipeline["killed"], (
        f"the operator's pod was never deleted during {OPERATOR_POD_KILLED_IN}"
    )
    rayjobs = json.loads(node.plane.kubectl("get", "rayjobs", "-n", NAMESPACE, "-o", "json").stdout)
    per_stage: dict[str, list[str]] = {}
    for job in rayjobs["items"]:
        per_stage.setdefault(job["metadata"]["labels"]["distillation.dev/stage"], []).append(
            job["metadata"]["name"]
        )
    assert all(len(names) == 1 for names in per_stage.values()), per_stage
    pods = operator_pods(node)
    assert pods  # its Deployment made a new one
    assert pipeline["killed"] not in pods


def test_the_hub_token_appears_nowhere_but_in_its_secret(
    node: Node, pipeline: dict[str, Any]
) -> None:
    """Not in the Distillation's status, events, RayJobs, InferenceService, the artifacts, or
    the logs of the pods still there (KubeRay's submitters, which print the stage drivers'
    output, the operator, KubeRay, the predictor)."""
    places = {
        "objects": node.plane.kubectl(
            "get", "dist,rayjobs,inferenceservices,events", "-A", "-o", "yaml"
        ).stdout,
    }
    pods = json.loads(node.plane.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    for pod in pods:
        meta = pod["metadata"]
        for container in pod["spec"]["containers"]:
            places[f"logs {meta['namespace']}/{meta['name']}/{container['name']}"] = (
                node.plane.kubectl(
                    "logs",
                    "-n",
                    meta["namespace"],
                    meta["name"],
                    "-c",
                    container["name"],
                    check=False,
                ).stdout
            )
    for path in (pipeline["root"] / "artifacts").rglob("*"):
        if path.is_file():
            places[f"artifact {path}"] = path.read_bytes().decode("latin-1")
    assert len([p for p in places if p.startswith("logs ")]) >= 3, sorted(places)
    leaked = [place for place, text in places.items() if FAKE_HUB_TOKEN in text]
    assert not leaked, leaked
