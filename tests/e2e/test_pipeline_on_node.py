"""The product as a platform team first meets it, on a real node: ``helm install`` of the chart
(the operator as a pod, under its own ServiceAccount and RBAC), the real KubeRay operator as a
pod, and a tiny Distillation whose every stage (prune, generate, train, evaluate, quantize,
evaluate-quantized) runs in Ray pods of the runtime or the quantize image, submitted by
KubeRay's own submitter, its artifacts on a volume this test reads afterwards. The quantised
student is then served by a KServe STAND-IN (tests/support/kserve_pods.py: KServe's controller
does not build here) that runs the operator's predictor container in a pod and marks the
InferenceService Ready only when that pod answers a completion.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillation_runtime.stages import STAGES
from support.chart import CHART
from support.cluster import REPO
from support.images import chart_images
from support.kserve import predictor_container
from support.kserve_pods import KServePodStandIn
from support.kuberay import install_kuberay
from support.node import Node, crash_pod

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
WORKER_POD_KILLED_IN = "train"
"""The stage whose Ray worker pod is deleted once it has written a checkpoint."""
API_SERVER_RESTARTED_IN = "generate"
"""The stage during which the API server is restarted."""
OPERATOR_RECOVERS_WITHIN = 30.0
"""Seconds from the restarted API server's readiness to the operator's status on a new
Distillation (the issue's bound: the operator recovers by itself, no pod restart)."""
POLL_SECONDS = 3.0


PRUNED = {"hiddenSize": 64, "intermediateSize": 192}
"""The student pruned from the demo's teacher (hidden 96, intermediate 288): the demo
student's size, so it learns the task as fast."""
QUANTIZE = {"scheme": "FP8_DYNAMIC", "minRetention": "0.9"}


def distillation_named(name: str) -> dict[str, Any]:
    """The demo's Distillation (hack/demo/run.py) with the whole recipe: the student pruned from
    the teacher and quantised to FP8 after training. Sized for one 2-CPU node: a Ray head and
    one worker per stage (with KubeRay's submitter pod beside them), one stage at a time (two
    stage clusters do not fit), each stage's Ray cluster removed as soon as it finishes so the
    next one fits; and a hub token from a Secret."""
    body = demo_distillation()
    body["metadata"]["name"] = name
    spec = body["spec"]
    del spec["generate"]["batchSize"]
    spec["student"] = {"prune": PRUNED}
    spec["quantize"] = QUANTIZE
    spec["policy"]["maxParallelStages"] = 1
    spec["placement"] = {
        "head": {"cpu": "400m", "memory": "2Gi"},
        "workers": {"cpu": "750m", "memory": "3Gi", "replicas": 1},
    }
    spec["serve"] |= {"cpu": "500m", "memory": "2Gi"}
    spec["secrets"] = {"huggingFaceToken": {"name": "hub", "key": "token"}}
    spec["output"] = f"pvc://artifacts/{name}"
    spec["policy"]["ttlSecondsAfterFinished"] = 0
    return body


def distillation() -> dict[str, Any]:
    return distillation_named("tiny")


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


def operator_pod_objects(node: Node) -> list[dict[str, Any]]:
    """The operator's pods, as the chart labels them."""
    found = node.plane.kubectl(
        "get",
        "pods",
        "-n",
        OPERATOR_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=distillation-operator",
        "-o",
        "json",
    ).stdout
    items: list[dict[str, Any]] = json.loads(found)["items"]
    return items


def operator_pods(node: Node) -> list[str]:
    """The operator's pods as ``pod/NAME``."""
    return [f"pod/{pod['metadata']['name']}" for pod in operator_pod_objects(node)]


def running_stages(distillation: dict[str, Any]) -> set[str]:
    stages = (distillation.get("status") or {}).get("stages") or []
    return {s["name"] for s in stages if s.get("state") == "Running"}


class OperatorPodKiller:
    """Deletes the operator's pod once, when the Distillation's current stage is ``stage``."""

    def __init__(self, node: Node, stage: str) -> None:
        self.node, self.stage = node, stage
        self.killed: str | None = None

    def __call__(self, distillation: dict[str, Any]) -> None:
        if self.killed or self.stage not in running_stages(distillation):
            return
        pods = operator_pods(self.node)
        self.node.plane.kubectl("delete", "-n", OPERATOR_NAMESPACE, *pods, "--wait=false")
        self.killed = " ".join(pods)
        print(f"deleted the operator's pod {self.killed} during {self.stage}", flush=True)


def newest_checkpoint(root: Path) -> int | None:
    """The newest complete training checkpoint's step on the output volume (training works
    under ``<output>/_work/train-<fingerprint>/checkpoints/step-N``; ``.partial`` ones are being
    written), or None while there is none."""
    steps = [
        int(p.name.removeprefix("step-"))
        for p in (root / "artifacts" / "tiny" / "_work").glob("train-*/checkpoints/step-*")
        if not p.name.endswith(".partial")
    ]
    return max(steps, default=None)


class RayWorkerKiller:
    """Crashes and deletes the Ray worker pod of ``stage``'s cluster once, the moment training
    has put its first checkpoint on the output volume (KubeRay makes a new pod; the operator a
    new attempt). The worker pods are looked up while the stage starts; then a thread of its own
    watches the volume every 0.2 s and strikes: the tiny training runs at ~16 steps/s (184 steps
    in 11 s), so the main loop's poll (3 s plus its kubectl calls) first saw a checkpoint when
    the last one was written, and that attempt finished."""

    def __init__(self, node: Node, root: Path, stage: str) -> None:
        self.node, self.root, self.stage = node, root, stage
        self.watcher: threading.Thread | None = None
        self.killed: list[str] = []
        self.processes = 0
        self.checkpoint: int | None = None

    def __call__(self, distillation: dict[str, Any]) -> None:
        if self.watcher is not None or self.stage not in running_stages(distillation):
            return
        pods = self.running_workers(distillation)
        if pods:
            self.watcher = threading.Thread(target=self.strike, args=(pods,), daemon=True)
            self.watcher.start()

    def running_workers(self, distillation: dict[str, Any]) -> list[dict[str, Any]]:
        """The Running worker pods of the stage's Ray cluster (none while it starts)."""
        stage = next(s for s in distillation["status"]["stages"] if s["name"] == self.stage)
        rayjob = json.loads(
            self.node.plane.kubectl(
                "get", "rayjob", stage["rayJob"], "-n", NAMESPACE, "-o", "json"
            ).stdout
        )
        cluster = (rayjob.get("status") or {}).get("rayClusterName")
        if not cluster:
            return []
        found = self.node.plane.kubectl(
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            f"ray.io/cluster={cluster},ray.io/node-type=worker",
            "--field-selector=status.phase=Running",
            "-o",
            "json",
        ).stdout
        pods: list[dict[str, Any]] = json.loads(found)["items"]
        return pods

    def strike(self, pods: list[dict[str, Any]]) -> None:
        deadline = time.monotonic() + PIPELINE_TIMEOUT
        while (step := newest_checkpoint(self.root)) is None:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        # a lost node, not a drain: its processes SIGKILLed at once (a graceful delete was seen
        # to leave the tiny training time to finish, and the attempt succeeded), then the pod
        # deleted so that KubeRay makes a new one
        workers = [f"pod/{p['metadata']['name']}" for p in pods]
        self.processes = sum(crash_pod(p["metadata"]["uid"]) for p in pods)
        self.node.plane.kubectl("delete", "-n", NAMESPACE, *workers, "--wait=false")
        self.killed, self.checkpoint = workers, step
        print(
            f"crashed ({self.processes} processes SIGKILLed) and deleted the Ray worker "
            f"{workers} during {self.stage} (checkpoint {step})",
            flush=True,
        )


class ApiServerRestart:
    """Restarts the API server once during ``stage``, then measures how long the operator takes
    to give a new Distillation (suspended: it starts no work) its status."""

    def __init__(self, node: Node, stage: str) -> None:
        self.node, self.stage = node, stage
        self.restart_seconds: float | None = None
        self.recovered_in: float | None = None

    def __call__(self, distillation: dict[str, Any]) -> None:
        if self.restart_seconds is not None or self.stage not in running_stages(distillation):
            return
        began = time.time()
        ready = self.node.plane.restart_api_server()
        self.restart_seconds = ready - began
        probe = distillation_named("after-restart")
        probe["spec"]["policy"]["suspend"] = True
        self.node.plane.kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(probe))
        while time.time() - ready < 3 * OPERATOR_RECOVERS_WITHIN:
            got = json.loads(
                self.node.plane.kubectl(
                    "get", "dist", "after-restart", "-n", NAMESPACE, "-o", "json"
                ).stdout
            )
            if (got.get("status") or {}).get("observedGeneration") == 1:
                self.recovered_in = time.time() - ready
                break
            time.sleep(0.5)
        self.node.plane.kubectl("delete", "dist", "after-restart", "-n", NAMESPACE)
        answered = "never" if self.recovered_in is None else f"{self.recovered_in:.1f} s after"
        print(
            f"restarted the API server during {self.stage} ({self.restart_seconds:.0f} s); "
            f"the operator answered a new Distillation: {answered}",
            flush=True,
        )


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


def timestamp(stamp: str) -> datetime:
    """A status time (RFC 3339, ``Z``) as an aware datetime."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def stage_times(distillation: dict[str, Any]) -> str:
    """Each stage's wall time, from its status (RayJob created to RayJob finished)."""

    def seconds(stage: dict[str, Any]) -> float:
        return (timestamp(stage["completionTime"]) - timestamp(stage["startTime"])).total_seconds()

    stages = distillation["status"].get("stages") or []
    return "stages: " + ", ".join(
        f"{s['name']} {seconds(s):.0f} s" for s in stages if s.get("completionTime")
    )


def summary(node: Node) -> str:
    return node.plane.kubectl(
        "get", "dist,rayjobs,rayclusters,pods,inferenceservices", "-A", "-o", "wide", check=False
    ).stdout


def wait_ready(
    node: Node, timeout: float, faults: Sequence[Callable[[dict[str, Any]], None]]
) -> dict[str, Any]:
    """The Distillation once finished (Succeeded or Failed), printing its rows as they change;
    each poll hands it to every one of ``faults`` (each strikes once, when its stage runs)."""
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
        for fault in faults:
            fault(got)
        if (got.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not Ready after {timeout}s:\n{summary(node)}")
        time.sleep(POLL_SECONDS)


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
        worker_killer = RayWorkerKiller(node, root, WORKER_POD_KILLED_IN)
        restart = ApiServerRestart(node, API_SERVER_RESTARTED_IN)
        final = wait_ready(node, PIPELINE_TIMEOUT, [restart, killer, worker_killer])
        print(f"installed in {installed:.0f} s; pipeline {time.monotonic() - t0 - installed:.0f} s")
        print(stage_times(final))
        print(summary(node))
        yield {
            "distillation": final,
            "root": root,
            "stand_in": stand_in,
            "killed": killer.killed,
            "worker_killer": worker_killer,
            "restart": restart,
        }
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
    assert set(states) == {s.name for s in STAGES}, states  # every stage of the table
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


def test_the_quantize_stage_ran_in_its_own_image_and_the_quantised_student_is_served(
    node: Node, pipeline: dict[str, Any]
) -> None:
    """Each stage's Ray head ran the image of its kind (the packages its manifest records say
    so from inside the pod), FP8 kept the gate, and the InferenceService serves the quantised
    model, not the trained one."""
    images = chart_images()
    rayjobs = json.loads(node.plane.kubectl("get", "rayjobs", "-n", NAMESPACE, "-o", "json").stdout)
    for job in rayjobs["items"]:
        if (job.get("status") or {}).get("jobStatus") != "SUCCEEDED":
            continue
        stage = job["metadata"]["labels"]["distillation.dev/stage"]
        kind = "quantize" if stage == "quantize" else "runtime"
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["containers"][0]["image"] == images[kind].ref, stage
        uri = job["metadata"]["annotations"]["distillation.dev/artifact"]
        manifest = json.loads(
            (pipeline["root"] / uri.removeprefix("pvc://") / "manifest.json").read_text()
        )
        assert ("llmcompressor" in manifest["libraries"]) == (kind == "quantize"), stage
    stages = {s["name"]: s for s in pipeline["distillation"]["status"]["stages"]}
    quantized = stages["quantize"]["metrics"]
    assert (quantized["scheme"], quantized["quantized"]) == ("FP8_DYNAMIC", "true"), quantized
    assert stages["evaluate-quantized"]["metrics"]["gatePassed"] == "true"
    assert int(stages["prune"]["metrics"]["studentParameters"]) < int(
        stages["prune"]["metrics"]["teacherParameters"]
    )
    isvc = json.loads(
        node.plane.kubectl("get", "inferenceservice", "tiny", "-n", NAMESPACE, "-o", "json").stdout
    )
    env = {e["name"]: e.get("value") for e in predictor_container(isvc).get("env", [])}
    assert env["STORAGE_URI"] == f"{stages['quantize']['artifact']}/model"


def test_stages_ran_one_at_a_time_as_max_parallel_stages_says(pipeline: dict[str, Any]) -> None:
    """policy.maxParallelStages 1: no stage's RayJob was created before the one before it had
    finished (prune and generate, which need nothing of each other, included)."""
    ran = sorted(
        (timestamp(s["startTime"]), timestamp(s["completionTime"]), s["name"])
        for s in pipeline["distillation"]["status"]["stages"]
    )
    for (_, finished, name), (started, _, following) in pairwise(ran):
        assert started >= finished, f"{following} started before {name} finished"


def test_a_deleted_operator_pod_neither_duplicates_a_rayjob_nor_reruns_a_stage(
    node: Node, pipeline: dict[str, Any]
) -> None:
    assert pipeline["killed"], (
        f"the operator's pod was never deleted during {OPERATOR_POD_KILLED_IN}"
    )
    per_attempt = rayjob_attempts(node)
    assert all(len(names) == 1 for names in per_attempt.values()), per_attempt
    retried = {WORKER_POD_KILLED_IN: 2}  # the deleted Ray worker's stage, and only it
    expected = {(stage, n) for stage, _ in per_attempt for n in range(1, retried.get(stage, 1) + 1)}
    assert sorted(per_attempt) == sorted(expected)
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


def rayjob_attempts(node: Node) -> dict[tuple[str, int], list[str]]:
    """The Distillation's RayJobs by (stage, attempt)."""
    rayjobs = json.loads(node.plane.kubectl("get", "rayjobs", "-n", NAMESPACE, "-o", "json").stdout)
    found: dict[tuple[str, int], list[str]] = {}
    for job in rayjobs["items"]:
        labels = job["metadata"]["labels"]
        key = (labels["distillation.dev/stage"], int(labels["distillation.dev/attempt"]))
        found.setdefault(key, []).append(job["metadata"]["name"])
    return found


def test_a_deleted_ray_worker_fails_one_attempt_and_the_next_resumes_from_its_checkpoint(
    pipeline: dict[str, Any],
) -> None:
    killer: RayWorkerKiller = pipeline["worker_killer"]
    assert killer.killed, f"no Ray worker was deleted during {WORKER_POD_KILLED_IN}"
    assert killer.processes > 0, f"no process of {killer.killed} found in the node's cgroups"
    train = next(s for s in pipeline["distillation"]["status"]["stages"] if s["name"] == "train")
    assert (train["state"], train["attempts"]) == ("Succeeded", 2), train
    resumed = int(train["metrics"]["resumedFromStep"])
    assert killer.checkpoint is not None
    assert resumed >= killer.checkpoint, (resumed, train)
    artifact = pipeline["root"] / "artifacts" / "tiny" / train["artifact"].rpartition("/")[2]
    steps = [json.loads(line)["step"] for line in (artifact / "metrics.jsonl").open()]
    assert steps == list(range(1, len(steps) + 1)), "every step once, in order, across attempts"
    assert int(train["metrics"]["steps"]) == len(steps) > resumed


def test_the_operator_recovers_by_itself_when_the_api_server_restarts(
    node: Node, pipeline: dict[str, Any]
) -> None:
    restart: ApiServerRestart = pipeline["restart"]
    assert restart.restart_seconds is not None, f"never restarted during {API_SERVER_RESTARTED_IN}"
    assert restart.recovered_in is not None, "the operator never answered after the restart"
    assert restart.recovered_in <= OPERATOR_RECOVERS_WITHIN, restart.recovered_in
    pods = operator_pod_objects(node)
    counts = [c["restartCount"] for p in pods for c in p["status"]["containerStatuses"]]
    assert counts == [0], "recovered without its container restarting"
