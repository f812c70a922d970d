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

CHART = Path(__file__).resolve().parents[2] / "charts" / "distillation-operator"


@pytest.fixture(scope="module")
def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


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
    ],
)
def test_schema_refuses_bad_values(values_schema: dict[str, Any], bad: dict[str, Any]) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text()) | bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(values_schema).validate(values)


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
