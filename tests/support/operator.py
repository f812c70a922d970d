"""The operator and the real KubeRay operator as processes beside the test control plane, and
helpers that play KubeRay's and KServe's part where no pod can run (no kubelet).

``finish_rayjob`` writes exactly the status fields KubeRay writes when a job ends
(``jobDeploymentStatus``, ``jobStatus``, ``reason``, ``message``, ``startTime``, ``endTime``),
and the stage's artifact as the stage would (files, ``manifest.json``, then the marker).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from support.cluster import ControlPlane, tool
from support.net import free_port

T = TypeVar("T")
GROUP, VERSION, PLURAL = "distillation.dev", "v1alpha1", "distillations"


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@dataclass
class OperatorProcess:
    """``kopf run`` of distillation_operator.handlers, namespaced, as the chart runs it."""

    plane: ControlPlane
    namespace: str
    workdir: Path
    pvc_root: Path
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0
    runs: int = 0

    @property
    def log(self) -> Path:
        return self.workdir / f"operator-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        self.metrics_port = free_port()
        env = self.plane.env() | {
            "DISTILL_PVC_ROOT": str(self.pvc_root),
            "DISTILLATION_METRICS_PORT": str(self.metrics_port),
            "DISTILLATION_KOPF_SCANNING": "false",
            "DISTILLATION_RUNTIME_IMAGE": "registry.test/distillation-runtime:test",
            "DISTILLATION_QUANTIZE_IMAGE": "registry.test/distillation-quantize:test",
            "DISTILLATION_VLLM_IMAGE": "registry.test/vllm:test",
        }
        kopf = str(Path(sys.executable).parent / "kopf")
        command = [
            kopf,
            "run",
            "--standalone",
            "--module=distillation_operator.handlers",
            f"--namespace={self.namespace}",
            f"--liveness=http://127.0.0.1:{free_port()}/healthz",
        ]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for("the operator's metrics endpoint", self._metrics_up, timeout=60)

    def _metrics_up(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2):
                return True
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return str(r.read().decode())

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node dies or the pod is OOM-killed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_kuberay(plane: ControlPlane, namespaces: list[str], log: Path) -> subprocess.Popen[bytes]:
    """The real KubeRay operator (built by ``make tools``), watching only ``namespaces``."""
    command = [
        str(tool("kuberay-operator")),
        f"-kubeconfig={plane.kubeconfig}",
        "-enable-leader-election=false",
        f"-metrics-addr=127.0.0.1:{free_port()}",
        f"-health-probe-bind-address=127.0.0.1:{free_port()}",
        f"-watch-namespace={','.join(namespaces)}",
        "-log-stdout-encoder=console",
    ]
    with log.open("w") as out:
        return subprocess.Popen(command, env=plane.env(), stdout=out, stderr=subprocess.STDOUT)


class Kube:
    """The few API calls the tests make, on one ApiClient."""

    def __init__(self, api: Any, namespace: str) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    def create_distillation(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return dict(
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, manifest
            )
        )

    def distillation(self, name: str) -> dict[str, Any]:
        return dict(
            self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        )

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def delete_distillation(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
        )

    def rayjobs(self) -> list[dict[str, Any]]:
        found = self.custom.list_namespaced_custom_object("ray.io", "v1", self.namespace, "rayjobs")
        return sorted(found["items"], key=lambda j: j["metadata"]["creationTimestamp"])

    def rayjob(self, name: str) -> dict[str, Any]:
        return dict(
            self.custom.get_namespaced_custom_object(
                "ray.io", "v1", self.namespace, "rayjobs", name
            )
        )

    def inference_services(self, *, llm: bool = False) -> list[dict[str, Any]]:
        """The InferenceServices (``llm``: the LLMInferenceServices) in the namespace."""
        version, plural = _serving(llm)
        found = self.custom.list_namespaced_custom_object(
            "serving.kserve.io", version, self.namespace, plural
        )
        return list(found["items"])

    def events(self, name: str) -> list[Any]:
        found = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return sorted(found.items, key=lambda e: e.metadata.creation_timestamp)

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        status = self.distillation(name).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == type_), None)

    def set_rayjob_status(self, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.namespace, "rayjobs", name, {"status": status}
        )

    def set_inference_service_ready(self, name: str, url: str, *, llm: bool = False) -> None:
        """Ready as KServe reports it: for the generation it has seen (``observedGeneration``)."""
        now = _now()
        version, plural = _serving(llm)
        current = self.custom.get_namespaced_custom_object(
            "serving.kserve.io", version, self.namespace, plural, name
        )
        status = {
            "observedGeneration": current["metadata"]["generation"],
            "url": url,
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "PredictorReady", "status": "True", "lastTransitionTime": now},
            ],
        }
        self.custom.patch_namespaced_custom_object_status(
            "serving.kserve.io", version, self.namespace, plural, name, {"status": status}
        )


def distillation_manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A Distillation whose models, prompts and output are on ``pvc://`` claims (the tests
    write the artifacts a stage would under the operator's ``$DISTILL_PVC_ROOT``), with ``spec``
    merged over those defaults."""
    defaults: dict[str, Any] = {
        "teacher": {"model": "pvc://models/teacher"},
        "student": {"model": "pvc://models/student"},
        "dataset": {"prompts": "pvc://data/prompts.jsonl"},
        "output": f"pvc://artifacts/{name}",
    }
    return {
        "apiVersion": "distillation.dev/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": name},
        "spec": defaults | spec,
    }


def _serving(llm: bool) -> tuple[str, str]:
    """(version, plural) of KServe's InferenceService, or of its LLMInferenceService."""
    return ("v1alpha2", "llminferenceservices") if llm else ("v1beta1", "inferenceservices")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_path(pvc_root: Path, uri: str) -> Path:
    assert uri.startswith("pvc://"), uri
    return pvc_root / uri.removeprefix("pvc://")


def write_stage_artifact(pvc_root: Path, rayjob: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """What the stage writes at the end: its files, manifest.json, then the marker."""
    annotations = rayjob["metadata"]["annotations"]
    folder = local_path(pvc_root, annotations["distillation.dev/artifact"])
    (folder / "model").mkdir(parents=True, exist_ok=True)
    manifest = {
        "stage": rayjob["metadata"]["labels"]["distillation.dev/stage"],
        "fingerprint": annotations["distillation.dev/fingerprint"],
        "metrics": metrics,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "_COMPLETE").write_text(_now())
    return folder


def running(kube: Kube, name: str) -> None:
    """KubeRay's first transitions: Initializing, then Running (the Ray job is RUNNING)."""
    kube.set_rayjob_status(
        name,
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": _now()},
    )


def succeed(kube: Kube, pvc_root: Path, name: str, metrics: dict[str, Any]) -> None:
    """The stage wrote its artifact; KubeRay marks the RayJob Complete/SUCCEEDED."""
    write_stage_artifact(pvc_root, kube.rayjob(name), metrics)
    kube.set_rayjob_status(
        name,
        {
            "jobDeploymentStatus": "Complete",
            "jobStatus": "SUCCEEDED",
            "message": "Job finished successfully.",
            "startTime": _now(),
            "endTime": _now(),
        },
    )


def fail(kube: Kube, name: str, reason: str = "AppFailed", message: str = "") -> None:
    """KubeRay's terminal failure: Failed with its reason (AppFailed, DeadlineExceeded, ...)."""
    kube.set_rayjob_status(
        name,
        {
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": reason,
            "message": message or f"Job failed: {reason}",
            "startTime": _now(),
            "endTime": _now(),
        },
    )
