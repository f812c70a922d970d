"""The Helm chart on a control plane of its own: lint, render, install, upgrade, uninstall, RBAC.

This module starts a fresh API server (the chart installs the CRD itself, which must not collide
with the session's). Its tests run in file order: install -> RBAC -> namespaced mode -> upgrade
-> uninstall, each step building on the one before, as an operator's life in a cluster does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from distillation_operator.permissions import CLUSTER_SCANNING, NAMESPACED, Permission
from support.cluster import REPO, ControlPlane, install_crds, require_tools, start_control_plane
from support.corpus import load_sample

CHART = str(REPO / "charts" / "distillation-operator")
RELEASE, SYSTEM = "ops", "distillation-system"
SA = f"system:serviceaccount:{SYSTEM}:{RELEASE}-distillation-operator"

NEVER: list[tuple[str, str, str]] = [
    # (verb, resource, namespace or "" for cluster scope): what the operator must never do
    ("get", "secrets", "ml"),
    ("list", "secrets", "ml"),
    ("watch", "secrets", ""),
    ("create", "pods", "ml"),
    ("create", "pods/exec", "ml"),
    ("delete", "pods", "ml"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "ml"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", ""),
    ("bind", "clusterroles.rbac.authorization.k8s.io", ""),
    ("get", "nodes", ""),
    ("patch", "nodes", ""),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ("delete", "namespaces", ""),
    ("create", "serviceaccounts/token", "ml"),
    ("impersonate", "users", ""),
    ("delete", "distillations.distillation.dev", "ml"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    require_tools()
    plane = start_control_plane(tmp_path_factory.mktemp("helm-plane"))
    try:
        install_crds(plane, ours=False)  # the chart brings ours
        for ns in (SYSTEM, "ml", "team-system", "team-a", "team-b"):
            plane.kubectl("create", "namespace", ns)
        yield plane
    finally:
        plane.stop()


def render(plane: ControlPlane, *values: str) -> list[dict[str, Any]]:
    out = plane.helm("template", RELEASE, CHART, "-n", SYSTEM, *values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def rules_of(permissions: tuple[Permission, ...]) -> list[dict[str, Any]]:
    return [
        {"apiGroups": [p.group], "resources": [p.resource], "verbs": list(p.verbs)}
        for p in permissions
    ]


def can(plane: ControlPlane, user: str, verb: str, resource: str, namespace: str) -> bool:
    """``kubectl auth can-i`` as ``user``; ``resource`` may end in ``/subresource``."""
    resource, _, sub = resource.partition("/")
    scope = ["-n", namespace] if namespace else []
    extra = [f"--subresource={sub}"] if sub else []
    out = plane.kubectl(
        "auth", "can-i", verb, resource, *extra, f"--as={user}", *scope, check=False
    )
    return out.stdout.strip() == "yes"


def qualified(permission: Permission) -> str:
    """``rayjobs.ray.io``, ``distillations.distillation.dev/status``, ``configmaps``."""
    resource, slash, sub = permission.resource.partition("/")
    name = f"{resource}.{permission.group}" if permission.group else resource
    return f"{name}{slash}{sub}"


def test_chart_lints_in_both_modes(cluster: ControlPlane) -> None:
    cluster.helm("lint", "--strict", CHART)
    cluster.helm("lint", "--strict", CHART, "--set", "watchNamespaces={team-a,team-b}")


def test_bad_values_are_refused_by_the_values_schema(cluster: ControlPlane) -> None:
    out = cluster.helm("template", "x", CHART, "--set", "logLevel=chatty", check=False)
    assert out.returncode != 0
    assert "logLevel" in out.stderr


def test_cluster_wide_rbac_is_exactly_what_the_operator_calls(cluster: ControlPlane) -> None:
    docs = render(cluster)
    role = next(
        d
        for d in docs
        if d["kind"] == "ClusterRole"
        and d["metadata"]["name"] == f"{RELEASE}-distillation-operator"
    )
    assert role["rules"] == rules_of(NAMESPACED + CLUSTER_SCANNING)
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_namespaced_mode_renders_roles_only(cluster: ControlPlane) -> None:
    docs = render(cluster, "--set", "watchNamespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == rules_of(NAMESPACED) for r in roles)
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    cluster_roles = [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"]
    assert sorted(cluster_roles) == [
        f"{RELEASE}-distillation-operator-editor",
        f"{RELEASE}-distillation-operator-viewer",
    ]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in container["args"]
    assert "--all-namespaces" not in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DISTILLATION_KOPF_SCANNING"] == "false"


def test_install_creates_a_hardened_operator_and_a_kept_crd(cluster: ControlPlane) -> None:
    cluster.helm("install", RELEASE, CHART, "-n", SYSTEM)
    crd = json.loads(
        cluster.kubectl("get", "crd", "distillations.distillation.dev", "-o", "json").stdout
    )
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deployment = json.loads(
        cluster.kubectl(
            "get", "deployment", "-n", SYSTEM, f"{RELEASE}-distillation-operator", "-o", "json"
        ).stdout
    )
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    cluster.kubectl("apply", "-n", "ml", "-f", str(REPO / "crds/samples/tiny-cpu.yaml"))


@pytest.mark.parametrize("permission", NAMESPACED, ids=lambda p: p.resource)
def test_operator_may_do_what_it_needs(cluster: ControlPlane, permission: Permission) -> None:
    for verb in permission.verbs:
        assert can(cluster, SA, verb, qualified(permission), "ml"), verb


def test_operator_may_scan_crds_and_namespaces_cluster_wide(cluster: ControlPlane) -> None:
    for permission in CLUSTER_SCANNING:
        for verb in permission.verbs:
            assert can(cluster, SA, verb, qualified(permission), ""), (verb, permission.resource)


@pytest.mark.parametrize(("verb", "resource", "namespace"), NEVER, ids=lambda v: str(v))
def test_operator_may_not_do_anything_else(
    cluster: ControlPlane, verb: str, resource: str, namespace: str
) -> None:
    assert not can(cluster, SA, verb, resource, namespace)


def test_user_roles_let_editors_edit_and_viewers_look(cluster: ControlPlane) -> None:
    for role, user in (("editor", "alice"), ("viewer", "bob")):
        cluster.kubectl(
            "create",
            "rolebinding",
            f"{user}-{role}",
            "-n",
            "ml",
            f"--clusterrole={RELEASE}-distillation-operator-{role}",
            f"--user={user}",
        )
    assert can(cluster, "alice", "create", "distillations.distillation.dev", "ml")
    assert can(cluster, "bob", "list", "distillations.distillation.dev", "ml")
    assert not can(cluster, "bob", "create", "distillations.distillation.dev", "ml")
    assert not can(cluster, "alice", "patch", "distillations.distillation.dev/status", "ml")


def test_namespaced_release_reaches_only_its_namespaces(cluster: ControlPlane) -> None:
    cluster.helm(
        "install",
        "team",
        CHART,
        "-n",
        "team-system",
        "--set",
        "crds.install=false",
        "--set",
        "watchNamespaces={team-a}",
        "--set",
        "rbac.userRoles=false",
    )
    team = "system:serviceaccount:team-system:team-distillation-operator"
    assert can(cluster, team, "create", "rayjobs.ray.io", "team-a")
    assert not can(cluster, team, "create", "rayjobs.ray.io", "team-b")
    assert not can(cluster, team, "list", "customresourcedefinitions.apiextensions.k8s.io", "")
    assert not can(cluster, team, "list", "namespaces", "")


def test_upgrade_applies_changed_values(cluster: ControlPlane) -> None:
    cluster.helm(
        "upgrade",
        RELEASE,
        CHART,
        "-n",
        SYSTEM,
        "--reuse-values",
        "--set",
        "logLevel=debug",
        "--set",
        "images.runtime=example.org/runtime:2",
    )
    deployment = json.loads(
        cluster.kubectl(
            "get", "deployment", "-n", SYSTEM, f"{RELEASE}-distillation-operator", "-o", "json"
        ).stdout
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--debug" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DISTILLATION_RUNTIME_IMAGE"] == "example.org/runtime:2"
    history = json.loads(cluster.helm("history", RELEASE, "-n", SYSTEM, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2]


def test_uninstall_keeps_the_crd_and_the_distillations(cluster: ControlPlane) -> None:
    cluster.helm("uninstall", RELEASE, "-n", SYSTEM)
    gone = cluster.kubectl(
        "get", "deployment", "-n", SYSTEM, f"{RELEASE}-distillation-operator", check=False
    )
    assert gone.returncode != 0
    cluster.kubectl("get", "crd", "distillations.distillation.dev")
    names = cluster.kubectl("get", "dist", "-n", "ml", "-o", "name").stdout.split()
    assert names == ["distillation.distillation.dev/tiny-cpu"]


def test_install_without_crds_works_when_they_were_applied_separately(
    cluster: ControlPlane,
) -> None:
    cluster.helm(
        "install",
        "again",
        CHART,
        "-n",
        SYSTEM,
        "--set",
        "crds.install=false",
        "--set",
        "rbac.userRoles=false",
    )
    manifest = cluster.helm("get", "manifest", "again", "-n", SYSTEM).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(manifest) if d]
    assert "CustomResourceDefinition" not in kinds
    assert "Deployment" in kinds
    sample = load_sample("tiny-cpu")
    sample["metadata"]["name"] = "after-reinstall"
    cluster.kubectl("apply", "-n", "ml", "-f", "-", stdin=json.dumps(sample))
