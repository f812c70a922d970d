"""Generate the Distillation CRD from the API models (``make manifests``).

pydantic writes JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3.0 schema.
The conversion is a handful of pure rewrites, each in its own function:

* ``$ref``/``$defs`` inlined (Kubernetes has no references);
* ``Optional[X]`` (``anyOf: [X, null]``) unwrapped to ``X``, with ``default: null`` dropped;
* ``title`` and ``additionalProperties: false`` removed (the API server prunes unknown fields);
* ``const`` written as a one-value ``enum``; numeric ``exclusiveMinimum`` as the v3.0 boolean form.

Outputs: ``crds/distillation.dev_distillations.yaml`` and the chart's CRD template (the same CRD,
behind ``crds.install`` and kept on uninstall). A unit test regenerates both and fails on drift.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from distillation_operator import api
from distillation_runtime.spec import API_GROUP
from distillation_runtime.yamlio import dump_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "crds" / f"{API_GROUP}_{api.PLURAL}.yaml"
CHART_CRD_FILE = REPO_ROOT / "charts" / "distillation-operator" / "templates" / "crds.yaml"

_DROPPED_KEYS = {"title", "examples", "readOnly", "writeOnly", "deprecated"}

Schema = dict[str, Any]


def inline_refs(node: Any, defs: dict[str, Schema]) -> Any:
    """Replace every ``$ref`` with a copy of its definition; keys beside the ref win."""
    if isinstance(node, list):
        return [inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = copy.deepcopy(defs[name])
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return inline_refs(merged, defs)
    return {k: inline_refs(v, defs) for k, v in node.items() if k != "$defs"}


def unwrap_optional(node: Schema) -> Schema:
    """``anyOf: [X, {type: null}]`` becomes X (with the outer keys); ``default: null`` goes."""
    options = node.get("anyOf")
    if options is not None:
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {options}")
        merged = {**non_null[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        node = merged
    if "default" in node and node["default"] is None:
        node = {k: v for k, v in node.items() if k != "default"}
    return node


def to_openapi_v3(node: Schema) -> Schema:
    """Rewrite one schema node's JSON Schema keywords into their OpenAPI v3.0 forms."""
    node = {k: v for k, v in node.items() if k not in _DROPPED_KEYS}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(exclusive)
        if value is not None and not isinstance(value, bool):
            node[inclusive] = value
            node[exclusive] = True
    if "properties" in node and node.get("additionalProperties") is False:
        del node["additionalProperties"]
    return node


_KEY_ORDER = ("type", "format", "description", "default", "enum")
_LAST_KEYS = ("properties", "required", "items", "additionalProperties")


def _ordered(node: Schema) -> list[str]:
    """Keys in reading order: what it is first, then constraints, then children, then CEL."""
    first = [k for k in _KEY_ORDER if k in node]
    last = [k for k in _LAST_KEYS if k in node]
    extensions = sorted(k for k in node if k.startswith("x-kubernetes-"))
    middle = sorted(k for k in node if k not in first and k not in last and k not in extensions)
    return first + middle + last + extensions


def structural(node: Any) -> Any:
    """Apply the rewrites to every node of an inlined schema."""
    if isinstance(node, list):
        return [structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = to_openapi_v3(unwrap_optional(node))
    out: Schema = {}
    for key in _ordered(node):
        value = node[key]
        if key == "properties":
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = structural(value)
        else:
            out[key] = value
    return out


def model_schema(model: type[Any]) -> Schema:
    """A pydantic model's structural OpenAPI v3.0 schema, as the CRD embeds it."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return structural(inline_refs(raw, defs))  # type: ignore[no-any-return]


def build_crd() -> dict[str, Any]:
    """The Distillation CustomResourceDefinition as a dict."""
    root: Schema = {
        "type": "object",
        "description": (api.Distillation.__doc__ or "").strip(),
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion defines the versioned schema of this representation "
                "of an object.",
            },
            "kind": {
                "type": "string",
                "description": "Kind is a string value representing the REST resource this "
                "object represents.",
            },
            "metadata": {"type": "object"},
            "spec": model_schema(api.DistillationSpec),
            "status": model_schema(api.DistillationStatus),
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "distillation-operator"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["ml"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": api.PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def to_yaml(document: dict[str, Any]) -> str:
    """Stable YAML: field order as declared, long lines left alone, numbers-as-text quoted."""
    return dump_yaml(document, width=1_000_000)


GENERATED_HEADER = (
    "# GENERATED by `make manifests` from operator/distillation_operator/api.py. Do not edit.\n"
)

_KEEP_SENTINEL = "distillation.dev/helm-keep-sentinel"


def render_crd_file() -> str:
    """Contents of ``crds/distillation.dev_distillations.yaml``."""
    return GENERATED_HEADER + "---\n" + to_yaml(build_crd())


def render_chart_template() -> str:
    """The chart's CRD template: the same CRD, installed only with ``crds.install``, kept on
    ``helm uninstall`` while ``crds.keep`` is true (deleting a CRD deletes every Distillation)."""
    crd = build_crd()
    crd["metadata"]["annotations"] = {_KEEP_SENTINEL: "x"}
    text = to_yaml(crd)
    if "{{" in text:
        raise ValueError("the CRD contains '{{', which Helm would try to template")
    text = text.replace(
        f"    {_KEEP_SENTINEL}: x\n",
        "    {{- if .Values.crds.keep }}\n    helm.sh/resource-policy: keep\n    {{- end }}\n",
    )
    text = text.replace(
        "  labels:\n    app.kubernetes.io/name: distillation-operator\n",
        '  labels:\n    {{- include "distillation-operator.labels" . | nindent 4 }}\n',
    )
    return (
        GENERATED_HEADER.replace("# ", "{{- /* ", 1).rstrip("\n")
        + " */}}\n{{- if .Values.crds.install }}\n"
        + text
        + "{{- end }}\n"
    )


def outputs() -> dict[Path, str]:
    """Every generated file and its expected contents."""
    return {CRD_FILE: render_crd_file(), CHART_CRD_FILE: render_chart_template()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a generated file is out of date"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    if args.check and stale:
        names = ", ".join(str(p.relative_to(REPO_ROOT)) for p in stale)
        print(f"out of date: {names}; run `make manifests`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
