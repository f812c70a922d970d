"""The samples and the bad-input corpus (tests/corpus/README.md), as data for tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "crds" / "samples"
CORPUS = REPO / "tests" / "corpus" / "invalid"


def load_sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / f"{name}.yaml").read_text())


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@dataclass(frozen=True)
class BadCase:
    """One corpus entry: a manifest that must be refused, and the field its error names."""

    name: str
    why: str
    field: str
    manifest: dict[str, Any]


def load_corpus() -> list[BadCase]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        entry = yaml.safe_load(path.read_text())
        manifest = merge_patch(load_sample(entry["base"]), entry["patch"])
        manifest["metadata"]["name"] = path.stem.split("-", 1)[1][:63]
        cases.append(BadCase(path.stem, entry["why"], entry["field"], manifest))
    return cases


def names_field(error: str, field: str) -> bool:
    """Whether one error line (``path: message``) points at ``field``.

    Either the path is the field, or the path is an ancestor of the field and the message
    spells out the rest of it (as model-level rules do: ``spec.student: set exactly one of
    student.model ...``).
    """
    path, _, message = error.partition(": ")
    if path == field or f'"{field}"' in error:  # the API server quotes unknown fields
        return True
    if not field.startswith(path + ".") and not field.startswith(path + "["):
        return False
    leaf = field.rsplit(".", 1)[-1].split("[")[0]
    return leaf in message
