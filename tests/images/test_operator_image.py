"""The operator image, started as the chart's Deployment starts it (its command, arguments, env
and pod security settings), against the test control plane: it runs as the non-root user,
answers /healthz and reconciles a Distillation."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from support.cluster import REPO, ControlPlane
from support.images import Image, podman
from support.net import free_port

GROUP, VERSION, PLURAL = "distillation.dev", "v1alpha1", "distillations"
KUBECONFIG_IN_CONTAINER = "/var/run/distillation/kubeconfig"


def chart_container(plane: ControlPlane, namespace: str, port: int) -> dict[str, Any]:
    """The operator container of the Deployment the chart renders for one watched namespace."""
    rendered = plane.helm(
        "template",
        "ops",
        str(REPO / "charts/distillation-operator"),
        "--namespace",
        namespace,
        "--set",
        f"watchNamespaces={{{namespace}}}",
        "--set",
        f"healthPort={port}",
    )
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    container: dict[str, Any] = pod["containers"][0]
    container["podSecurityContext"] = pod["securityContext"]
    return container


def podman_run_args(container: dict[str, Any], namespace: str, kubeconfig: Path) -> list[str]:
    """`podman run` arguments equivalent to the chart's container spec, on the host network."""
    pod_security = container["podSecurityContext"]
    security = container["securityContext"]
    args = [
        "--detach",
        "--network=host",
        f"--user={pod_security['runAsUser']}:{pod_security['runAsGroup']}",
        f"--volume={kubeconfig}:{KUBECONFIG_IN_CONTAINER}:ro",
        f"--env=KUBECONFIG={KUBECONFIG_IN_CONTAINER}",
        "--tmpfs=/tmp",  # the chart's emptyDir
    ]
    if security["readOnlyRootFilesystem"]:
        args.append("--read-only")
    if not security["allowPrivilegeEscalation"]:
        args.append("--security-opt=no-new-privileges")
    args += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    for env in container["env"]:
        value = env.get("value")
        if "valueFrom" in env:  # the downward API: the pod's namespace
            assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            value = namespace
        args.append(f"--env={env['name']}={value}")
    # Any metrics endpoint the operator opens must not collide on the shared host network.
    args.append(f"--env=DISTILLATION_METRICS_PORT={free_port()}")
    args.append(f"--entrypoint={json.dumps(container['command'])}")
    return args


def wait_healthy(port: int, name: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        assert state == "running", f"the operator container is {state}:\n{logs(name)}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no /healthz answer in {timeout} s:\n{logs(name)}")


def logs(name: str) -> str:
    done = podman("logs", name, check=False)
    return done.stdout + done.stderr


def process_uids(name: str) -> list[int]:
    """Real, effective, saved and filesystem UIDs of the container's main process, from /proc."""
    pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Uid:"))
    return [int(x) for x in line.split()[1:]]


def test_operator_image_runs_non_root_answers_health_and_reconciles(
    operator_image: Image,
    plane: ControlPlane,
    api: Any,
    namespace: str,
    container_name: str,
    samples: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    from kubernetes import client

    port = free_port()
    container = chart_container(plane, namespace, port)
    assert container["image"] == operator_image.ref, "the chart's default image is not the build's"

    # The container's user must be able to read the kubeconfig that is mounted read-only.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(plane.kubeconfig.read_text())
    kubeconfig.chmod(0o644)
    args = podman_run_args(container, namespace, kubeconfig)
    podman("run", f"--name={container_name}", *args, operator_image.ref, *container["args"])

    wait_healthy(port, container_name)
    uid = container["podSecurityContext"]["runAsUser"]
    assert process_uids(container_name) == [uid] * 4
    assert uid != 0

    custom: Any = client.CustomObjectsApi(api)
    manifest = {**samples["tiny-cpu"], "metadata": {"name": "tiny", "namespace": namespace}}
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest
    )
    generation = created["metadata"]["generation"]

    deadline = time.monotonic() + 90
    current: dict[str, Any] = created
    while (current.get("status") or {}).get("observedGeneration") != generation:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"status.observedGeneration never reached {generation} in 90 s (status: "
                f"{current.get('status')}); the operator's log:\n{logs(container_name)}"
            )
        time.sleep(0.5)
        current = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "tiny")

    listed: dict[str, Any] = custom.list_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayjobs"
    )
    uid_of_tiny = current["metadata"]["uid"]
    owned = [
        job
        for job in listed["items"]
        if any(ref["uid"] == uid_of_tiny for ref in job["metadata"].get("ownerReferences", []))
    ]
    assert owned, (
        f"no RayJob owned by the Distillation; the operator's log:\n{logs(container_name)}"
    )
