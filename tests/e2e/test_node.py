"""The node itself, as a pod sees it: scheduled, its image from the imported archives, DNS,
the API server through the ``kubernetes`` Service under its own ServiceAccount, logs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from support.images import chart_images
from support.node import Node

PROBE = r"""
import json, socket, ssl, urllib.request, urllib.error
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(sa + "/token").read()
ns = open(sa + "/namespace").read()
address = socket.gethostbyname("kubernetes.default.svc.cluster.local")
context = ssl.create_default_context(cafile=sa + "/ca.crt")
request = urllib.request.Request(
    f"https://kubernetes.default.svc/api/v1/namespaces/{ns}/pods",
    headers={"Authorization": "Bearer " + token},
)
try:
    urllib.request.urlopen(request, context=context, timeout=10)
    status, message = 200, ""
except urllib.error.HTTPError as err:
    status, message = err.code, json.load(err)["message"]
print(json.dumps({"address": address, "status": status, "message": message}))
"""


@pytest.fixture
def namespace(node: Node) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    node.plane.kubectl("create", "namespace", name)
    yield name
    node.plane.kubectl("delete", "namespace", name, "--wait=false")


def wait_pod_done(node: Node, namespace: str, pod: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        got = json.loads(
            node.plane.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout
        )
        if got["status"].get("phase") in ("Succeeded", "Failed"):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(
                f"pod {pod} not done after {timeout}s: {got['status']}\n"
                f"kubelet:\n{node.log('kubelet')}"
            )
        time.sleep(1)


def test_a_pod_runs_and_reaches_the_api_server_as_its_service_account(
    node: Node, namespace: str
) -> None:
    image = chart_images()["operator"].ref
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "probe", "image": image, "command": ["python3", "-c", PROBE]}],
        },
    }
    node.plane.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(pod))
    done = wait_pod_done(node, namespace, "probe")
    logs = node.plane.kubectl("logs", "-n", namespace, "probe").stdout
    assert done["status"]["phase"] == "Succeeded", logs
    assert done["spec"]["nodeName"] == node.name
    seen = json.loads(logs.strip().splitlines()[-1])
    assert seen["address"] == "10.0.0.1"  # CoreDNS answered with the kubernetes Service's IP
    # kube-proxy forwarded to the API server, which authenticated the pod's own ServiceAccount
    # token and refused it by RBAC (it was granted nothing)
    assert seen["status"] == 403
    assert f"system:serviceaccount:{namespace}:default" in seen["message"]
