"""The vendored upstream CRDs are the upstream files, unmodified, and what the tests install."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "third_party" / "crds"


def recorded_digests() -> dict[str, str]:
    """``SHA256SUMS``: relative path -> sha256, as recorded when the files were vendored."""
    lines = (VENDORED / "SHA256SUMS").read_text().splitlines()
    return {path: digest for digest, path in (line.split(maxsplit=1) for line in lines if line)}


def test_every_vendored_crd_is_byte_for_byte_the_recorded_upstream_file() -> None:
    recorded = recorded_digests()
    present = {str(p.relative_to(VENDORED)) for p in VENDORED.glob("*/*.yaml")}
    assert present == set(recorded), "a CRD was added or removed without SHA256SUMS"
    for path, digest in recorded.items():
        assert hashlib.sha256((VENDORED / path).read_bytes()).hexdigest() == digest, path


def test_the_vendored_crds_hold_every_kind_the_operator_builds() -> None:
    kinds = set()
    for path in VENDORED.glob("*/*.yaml"):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # 8 MB: libyaml
        kinds.add((crd["spec"]["group"], crd["spec"]["names"]["kind"]))
    assert {
        ("ray.io", "RayJob"),
        ("ray.io", "RayCluster"),
        ("serving.kserve.io", "InferenceService"),
        ("serving.kserve.io", "LLMInferenceService"),
        ("serving.kserve.io", "LLMInferenceServiceConfig"),
    } <= kinds
    licence = (VENDORED / "LICENSE").read_text()
    assert "Apache License" in licence
    assert "Version 2.0" in licence


def test_kuberays_vendored_operator_manifests_are_the_recorded_upstream_files() -> None:
    """third_party/kuberay-v1.6.2-operator: what the node tier installs to run KubeRay."""
    folder = REPO / "third_party" / "kuberay-v1.6.2-operator"
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    recorded = {path: digest for digest, path in (line.split(maxsplit=1) for line in lines if line)}
    assert {p.name for p in folder.glob("*.yaml")} == set(recorded)
    for path, digest in recorded.items():
        assert hashlib.sha256((folder / path).read_bytes()).hexdigest() == digest, path
