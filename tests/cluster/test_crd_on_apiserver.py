"""The generated CRD on a real kube-apiserver: docs, columns, defaults, and the bad-input corpus."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from distillation_operator.api import DistillationSpec
from support.cluster import ControlPlane, server_dry_run
from support.corpus import BadCase, load_corpus, load_sample, names_field

CORPUS = load_corpus()


def manifest_in(namespace: str, sample: str, name: str | None = None) -> dict[str, Any]:
    manifest = load_sample(sample)
    manifest["metadata"]["namespace"] = namespace
    if name:
        manifest["metadata"]["name"] = name
    return manifest


def test_kubectl_explain_shows_the_field_docs(plane: ControlPlane) -> None:
    train = plane.kubectl("explain", "distillation.spec.train").stdout
    assert "How the student is trained" in train
    assert "learningRate" in train
    assert "losses" in train
    divergence = plane.kubectl("explain", "distillation.spec.train.losses.logits.divergence").stdout
    assert "forwardKL (mode covering)" in divergence


def test_samples_are_accepted_and_listed_with_printer_columns(
    plane: ControlPlane, namespace: str
) -> None:
    for sample in ("tiny-cpu", "support-8b-gpu"):
        plane.kubectl("apply", "-f", "-", stdin=json.dumps(manifest_in(namespace, sample)))
    status = {
        "status": {
            "observedGeneration": 1,
            "currentStage": "train",
            "progress": "2/4",
            "stageProgress": "train-45%",
            "metrics": {"retention": "0.97"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "StageRunning",
                    "message": "train is running",
                    "lastTransitionTime": "2026-11-28T14:00:00Z",
                }
            ],
        }
    }
    plane.kubectl(
        "patch",
        "dist",
        "tiny-cpu",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    table = plane.kubectl("get", "dist", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "STAGE", "PROGRESS", "STEP", "RETENTION", "AGE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert set(rows) == {"tiny-cpu", "support-8b"}
    assert rows["tiny-cpu"][1:6] == ["False", "train", "2/4", "train-45%", "0.97"]


def test_server_defaults_agree_with_the_models(
    plane: ControlPlane, api: Any, namespace: str
) -> None:
    from kubernetes import client

    manifest = manifest_in(namespace, "tiny-cpu", "defaults")
    submitted = copy.deepcopy(manifest["spec"])
    stored = client.CustomObjectsApi(api).create_namespaced_custom_object(
        "distillation.dev", "v1alpha1", namespace, "distillations", manifest
    )
    spec = stored["spec"]
    assert spec["generate"]["temperature"] == "0"
    assert spec["train"]["learningRate"] == "1e-3"  # as written
    assert spec["train"]["warmupRatio"] == "0.03"  # filled in by the server
    assert spec["policy"]["ttlSecondsAfterFinished"] == 600
    assert spec["evaluate"]["metrics"] == ["tokenF1", "rougeL"]
    assert DistillationSpec.model_validate(spec) == DistillationSpec.model_validate(submitted)


def test_status_is_a_subresource(plane: ControlPlane, api: Any, namespace: str) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    manifest = manifest_in(namespace, "tiny-cpu", "subresource")
    manifest["status"] = {"phase": "Succeeded"}
    created = custom.create_namespaced_custom_object(
        "distillation.dev", "v1alpha1", namespace, "distillations", manifest
    )
    assert "status" not in created  # status is written only through /status


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_case_is_refused_by_the_api_server_naming_its_field(
    api: Any, namespace: str, case: BadCase
) -> None:
    manifest = copy.deepcopy(case.manifest)
    manifest["metadata"]["namespace"] = namespace
    errors = server_dry_run(api, manifest, namespace)
    assert errors, f"accepted: {case.why}"
    assert any(names_field(e, case.field) for e in errors), (case.why, errors)
