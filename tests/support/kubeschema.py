"""What the API server does with a custom resource, in Python, for fast unit tests.

Defaulting, structural validation with strict field validation (unknown fields refused, as
``kubectl apply`` does by default) and the CRD's CEL rules (via cel-python). The cluster tests
check the same things against a real kube-apiserver; this judge lets the unit tests hold the
pydantic models and the generated schema to the same corpus without one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import celpy
import jsonschema

Schema = dict[str, Any]


@dataclass(frozen=True)
class FieldError:
    """One refusal: the field path (``spec.train.epochs``) and the message."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Fill in ``default`` values the way the API server does before validating."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def _strict(schema: Any) -> Any:
    """Copy of a schema where objects with properties refuse unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _path(prefix: str, parts: Any) -> str:
    out = prefix
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def schema_errors(schema: Schema, value: Any, prefix: str) -> list[FieldError]:
    """OpenAPI v3.0 validation (draft 4 semantics: boolean exclusiveMinimum)."""
    validator = jsonschema.Draft4Validator(_strict(schema))
    errors = []
    for err in validator.iter_errors(value):
        path = _path(prefix, err.absolute_path)
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            errors.extend(
                FieldError(f"{path}.{name}", "field not declared in schema") for name in extra
            )
        elif err.validator == "required":
            missing = err.message.split("'")[1]
            errors.append(FieldError(f"{path}.{missing}", "Required value"))
        else:
            errors.append(FieldError(path, err.message))
    return errors


_CEL = celpy.Environment()


def cel_errors(schema: Schema, value: Any, path: str) -> list[FieldError]:
    """Evaluate every ``x-kubernetes-validations`` rule on the nodes that are present."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _CEL.program(_CEL.compile(rule["rule"]))
        try:
            ok = program.evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as err:  # a rule that errors refuses the object, as in k8s
            ok, rule = False, {**rule, "message": f"{rule['message']} (CEL error: {err})"}
        if not bool(ok) or isinstance(ok, celpy.CELEvalError):
            errors.append(FieldError(path + rule.get("fieldPath", ""), rule["message"]))
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name in value:
                errors += cel_errors(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def admit(crd: dict[str, Any], obj: dict[str, Any]) -> list[FieldError]:
    """Errors the API server would answer for ``obj`` (empty when it would accept it)."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec_schema = schema["properties"]["spec"]
    spec = apply_defaults(spec_schema, obj.get("spec", {}))
    errors = schema_errors(spec_schema, spec, "spec")
    if errors:  # report schema errors alone (the API server skips CEL after type errors)
        return errors
    return cel_errors(spec_schema, spec, "spec")


def compile_all_rules(schema: Any) -> list[str]:
    """Every CEL rule in a schema (raises on one that does not compile)."""
    rules: list[str] = []
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            _CEL.compile(rule["rule"])
            rules.append(rule["rule"])
        for key, sub in schema.items():
            if key != "x-kubernetes-validations":
                rules += compile_all_rules(sub)
    elif isinstance(schema, list):
        for sub in schema:
            rules += compile_all_rules(sub)
    return rules
