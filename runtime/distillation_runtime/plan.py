"""The stage plan: which stages a spec needs, what each depends on, and its fingerprint. Pure.

The stages and what each reads come from the stage table (``distillation_runtime.stages``).
A stage's fingerprint is a hash of its own configuration (the table's slice of the spec), its
inputs' fingerprints and its output-format version, so a spec edit invalidates exactly the
stages it can change (a new learning rate re-runs train and what follows it, never generate),
and an upgrade of the operator or the images invalidates nothing unless a stage's format
version was bumped. Artifacts are content-addressed,
``<output>/<stage>-<fingerprint>/``, and a stage is complete when its completion marker is there
(written last, so a killed stage never looks complete).

The operator imports this module (it must stay light: pydantic and the standard library only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from distillation_runtime.spec import PipelineSpec
from distillation_runtime.stages import planned
from distillation_runtime.stages.base import Role, StageDefinition

COMPLETION_MARKER = "_COMPLETE"
FINGERPRINT_LENGTH = 12


@dataclass(frozen=True)
class Stage:
    """One planned stage: its configuration, the stages it reads, and its fingerprint."""

    name: str
    config: dict[str, Any]
    inputs: tuple[str, ...]
    fingerprint: str
    definition: StageDefinition
    after: tuple[str, ...] = ()
    """Stages it waits for without reading them (the table's ``first`` stages)."""

    @property
    def waits_for(self) -> tuple[str, ...]:
        """Every stage that must be done before this one starts."""
        return self.after + self.inputs

    def artifact(self, output: str) -> str:
        """Where this stage writes: ``<output>/<stage>-<fingerprint>``."""
        return f"{output.rstrip('/')}/{self.name}-{self.fingerprint}"


@dataclass(frozen=True)
class Plan:
    """The stages of one spec, in run order (every stage after all of its inputs)."""

    stages: tuple[Stage, ...]
    output: str

    def __getitem__(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in this plan: {self.names}")

    def __contains__(self, name: object) -> bool:
        return any(stage.name == name for stage in self.stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def artifact(self, name: str) -> str:
        return self[name].artifact(self.output)

    def last(self, role: Role) -> Stage | None:
        """The last planned stage with ``role``: the served student, the final evaluation."""
        found = [s for s in self.stages if role in s.definition.roles]
        return found[-1] if found else None


def fingerprint(name: str, config: dict[str, Any], inputs: list[str], format_version: int) -> str:
    """Hash of a stage's canonical JSON config, its inputs' fingerprints and its output-format
    version. Not of the package's version: upgrading the operator or an image must not re-run
    finished pipelines; a release that changes what a stage writes bumps its format version."""
    canonical = json.dumps(
        {"stage": name, "config": config, "inputs": inputs, "format": format_version},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def make_plan(spec: PipelineSpec) -> Plan:
    """The plan of ``spec``: the stage table's entries it enables, in table order, with their
    fingerprints."""
    fingerprints: dict[str, str] = {}
    stages = []
    entries = planned(spec)
    firsts = tuple(entry.name for entry in entries if entry.first)
    for entry in entries:
        config, inputs = entry.fingerprint(spec), entry.inputs(spec)
        missing = [i for i in inputs if i not in fingerprints]
        if missing:
            raise ValueError(f"stage {entry.name} reads {missing}, which this spec does not plan")
        upstream = [fingerprints[i] for i in inputs]
        fingerprints[entry.name] = fingerprint(entry.name, config, upstream, entry.format_version)
        after = () if entry.first else firsts
        stages.append(Stage(entry.name, config, inputs, fingerprints[entry.name], entry, after))
    return Plan(tuple(stages), spec.output)


def changed_stages(old: Plan, new: Plan) -> list[str]:
    """Stages of ``new`` whose artifacts ``old`` did not already have (they must run)."""
    known = {(s.name, s.fingerprint) for s in old.stages}
    return [s.name for s in new.stages if (s.name, s.fingerprint) not in known]
