"""The Helm chart's values and its operator wiring (rendering is tested with helm in cluster/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from distillation_operator.handlers import scanning_enabled
from distillation_operator.permissions import NAMESPACED
from support.chart import readme_values_examples

CHART = Path(__file__).resolve().parents[2] / "charts" / "distillation-operator"


@pytest.fixture(scope="module")
def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def default_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on ``base`` as Helm merges a values file: maps deeply, lists replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def test_values_schema_is_a_valid_draft7_schema(values_schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator.check_schema(values_schema)


def test_default_values_satisfy_the_schema(values_schema: dict[str, Any]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(values_schema).validate(values)


@pytest.mark.parametrize(
    "bad",
    [
        {"watchNamespaces": ["Not_A_Namespace"]},
        {"logLevel": "chatty"},
        {"crds": {"install": "yes"}},
        {"image": {"repository": "", "pullPolicy": "IfNotPresent"}},
        {"unknownTopLevel": 1},
        {"image": {"repository": "x", "pullPolicy": "Sometimes"}},
        {"resources": {"requests": {"cpu": "100m"}, "limit": {"cpu": "1"}}},
        {"extraEnv": [{"value": "no name"}]},
        {"extraEnvFrom": [{"secret": {"name": "s3"}}]},
        {"extraVolumes": [{"name": "Not_A_Name", "emptyDir": {}}]},
        {"extraVolumeMounts": [{"name": "artifacts"}]},
        {"extraVolumeMounts": [{"name": "artifacts", "mountPath": "relative/path"}]},
        {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": 1}}},
        {"networkPolicy": {"enabled": "yes"}},
        {"networkPolicy": {"apiServer": {"ports": []}}},
        {"networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1"], "ports": [443]}}},
        {"networkPolicy": {"artifactStore": [{"toPorts": [{"port": 443}]}]}},
        {"networkPolicy": {"artifactStore": [{"ports": [{"port": 443, "protocol": "HTTP"}]}]}},
        {"networkPolicy": {"metricsFrom": [{"namespace": "monitoring"}]}},
        {"networkPolicy": {"dns": {"to": [{}]}}},
    ],
)
def test_schema_refuses_bad_values(values_schema: dict[str, Any], bad: dict[str, Any]) -> None:
    values = merged(default_values(), bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(values_schema).validate(values)


def test_default_resources_request_and_limit_cpu_memory_and_ephemeral_storage() -> None:
    resources = default_values()["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory", "ephemeral-storage"}, kind
    # The operator peaks near 200 MB resident at 300 Distillations: the limit must leave room.
    assert resources["limits"]["memory"] == "512Mi"


def test_default_pull_policy_is_explicit() -> None:
    assert default_values()["image"]["pullPolicy"] == "IfNotPresent"


def test_network_policy_is_opt_in_and_allows_https_to_the_artifact_store() -> None:
    policy = default_values()["networkPolicy"]
    assert policy["enabled"] is False
    assert policy["apiServer"] == {"cidrs": [], "ports": [443, 6443]}
    assert policy["artifactStore"] == [{"ports": [{"port": 443, "protocol": "TCP"}]}]
    assert policy["dns"]["to"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}
    ]


def test_default_security_context_is_hardened() -> None:
    values = default_values()
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    assert values["podSecurityContext"]["runAsUser"] > 10000
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["securityContext"]["allowPrivilegeEscalation"] is False
    assert values["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_every_values_example_in_the_chart_readme_satisfies_the_schema(
    values_schema: dict[str, Any],
) -> None:
    examples = readme_values_examples()
    # pvc, S3 with keys, S3 with workload identity, a tight NetworkPolicy.
    assert len(examples) >= 4
    for example in examples:
        jsonschema.Draft7Validator(values_schema).validate(merged(default_values(), example))


def test_readme_pvc_example_mounts_the_claim_where_pvc_uris_resolve() -> None:
    from distillation_runtime.storage import DEFAULT_PVC_ROOT

    pvc = next(e for e in readme_values_examples() if "extraVolumes" in e)
    claim = pvc["extraVolumes"][0]["persistentVolumeClaim"]["claimName"]
    assert pvc["extraVolumeMounts"][0]["mountPath"] == f"{DEFAULT_PVC_ROOT}/{claim}"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, True),
        ({"DISTILLATION_KOPF_SCANNING": "true"}, True),
        ({"DISTILLATION_KOPF_SCANNING": "false"}, False),
        ({"DISTILLATION_KOPF_SCANNING": "0"}, False),
    ],
)
def test_namespaced_mode_turns_kopf_scanning_off(env: dict[str, str], expected: bool) -> None:
    assert scanning_enabled(env) is expected


def test_chart_grants_exactly_the_permissions_the_operator_declares() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    start = helpers.index('{{- define "distillation-operator.namespacedRules" -}}')
    block = helpers[start:].split("\n", 1)[1].split("{{- end }}", 1)[0]
    rules = yaml.safe_load(block)
    expected = [
        {"apiGroups": [p.group], "resources": [p.resource], "verbs": list(p.verbs)}
        for p in NAMESPACED
    ]
    assert rules == expected
