"""The real KubeRay operator as a pod: upstream's RBAC and Deployment (third_party/
kuberay-v1.6.2-operator, unmodified) with the two things upstream's kustomization sets, the
namespace and the image (the same module's binary, built and packed by hack/build-tools.sh)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from support.cluster import KUBERAY_VERSION, REPO, ControlPlane

MANIFESTS = REPO / "third_party" / f"kuberay-{KUBERAY_VERSION}-operator"
IMAGE = f"localhost/kuberay/operator:{KUBERAY_VERSION}"
FILES = (
    "service_account.yaml",
    "role.yaml",
    "role_binding.yaml",
    "leader_election_role.yaml",
    "leader_election_role_binding.yaml",
    "manager.yaml",
)


def kuberay_manifests(namespace: str) -> list[dict[str, Any]]:
    """Upstream's objects, placed in ``namespace`` with the image built here (what
    ``config/default``'s kustomization does)."""
    objects: list[dict[str, Any]] = []
    for name in FILES:
        for doc in yaml.safe_load_all(Path(MANIFESTS / name).read_text()):
            if not doc:
                continue
            obj = copy.deepcopy(doc)
            if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                obj["metadata"]["namespace"] = namespace
            for subject in obj.get("subjects", []):
                subject["namespace"] = namespace
            if obj["kind"] == "Deployment":
                for container in obj["spec"]["template"]["spec"]["containers"]:
                    container["image"] = IMAGE
            objects.append(obj)
    return objects


def install_kuberay(plane: ControlPlane, namespace: str = "kuberay-system") -> None:
    """Apply KubeRay's operator and wait until its Deployment is available."""
    plane.kubectl("create", "namespace", namespace)
    docs = "\n---\n".join(yaml.safe_dump(obj) for obj in kuberay_manifests(namespace))
    plane.kubectl("apply", "-f", "-", stdin=docs)
    plane.kubectl(
        "rollout",
        "status",
        "deployment/kuberay-operator",
        "-n",
        namespace,
        "--timeout=180s",
        timeout=200,
    )
