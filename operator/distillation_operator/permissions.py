"""Every API call the operator makes, declared once: the chart's RBAC is tested against this.

When the operator starts calling something new, add it here (with why); the chart test then
fails until ``charts/distillation-operator/templates/_helpers.tpl`` grants exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

READ = ("get", "list", "watch")
OWN = (*READ, "create", "update", "patch", "delete")


@dataclass(frozen=True)
class Permission:
    """Verbs on one resource in one API group, and why the operator needs them."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    why: str


NAMESPACED: tuple[Permission, ...] = (
    Permission(
        "distillation.dev",
        "distillations",
        ("get", "list", "watch", "patch", "update"),
        "watch Distillations; kopf records progress in annotations",
    ),
    Permission(
        "distillation.dev",
        "distillations/status",
        ("get", "patch", "update"),
        "write status (conditions, stages, metrics, serving URL)",
    ),
    Permission(
        "distillation.dev",
        "distillations/finalizers",
        ("update",),
        "children's ownerReferences use blockOwnerDeletion",
    ),
    Permission("ray.io", "rayjobs", OWN, "one RayJob per stage"),
    Permission("serving.kserve.io", "inferenceservices", OWN, "serve the student"),
    Permission("serving.kserve.io", "llminferenceservices", OWN, "serve the student (serve.api)"),
    Permission("", "events", ("create", "patch"), "events on Distillations"),
)
"""Needed in every namespace the operator watches."""

CLUSTER_SCANNING: tuple[Permission, ...] = (
    Permission(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        ("list", "watch"),
        "kopf notices CRDs installed after start-up",
    ),
    Permission("", "namespaces", ("list", "watch"), "kopf notices new namespaces"),
)
"""Needed only in cluster-wide mode (kopf's scanning; off in namespaced mode)."""
