"""The stage plan: which stages a spec needs, what each depends on, and its fingerprint. Pure.

    [prune] -> generate -> train -> evaluate -> [quantize -> evaluate-quantized]

A stage's fingerprint is a hash of its own configuration, its inputs' fingerprints and the
runtime's version, so a spec edit invalidates exactly the stages it can change: a new learning
rate re-runs train and what follows it, never generate. Artifacts are content-addressed,
``<output>/<stage>-<fingerprint>/``, and a stage is complete when its completion marker is there
(written last, so a killed stage never looks complete).

The operator imports this module (it must stay light: pydantic and the standard library only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from distillation_runtime import __version__
from distillation_runtime.spec import LogitSource, PipelineSpec

COMPLETION_MARKER = "_COMPLETE"
FINGERPRINT_LENGTH = 12


class StageName(StrEnum):
    """The stages, in the order they can run."""

    PRUNE = "prune"
    GENERATE = "generate"
    TRAIN = "train"
    EVALUATE = "evaluate"
    QUANTIZE = "quantize"
    EVALUATE_QUANTIZED = "evaluate-quantized"


@dataclass(frozen=True)
class Stage:
    """One planned stage: its configuration, the stages it reads, and its fingerprint."""

    name: StageName
    config: dict[str, Any]
    inputs: tuple[StageName, ...]
    fingerprint: str

    def artifact(self, output: str) -> str:
        """Where this stage writes: ``<output>/<stage>-<fingerprint>``."""
        return f"{output.rstrip('/')}/{self.name.value}-{self.fingerprint}"


@dataclass(frozen=True)
class Plan:
    """The stages of one spec, in run order (every stage after all of its inputs)."""

    stages: tuple[Stage, ...]
    output: str

    def __getitem__(self, name: StageName | str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r} in this plan: {[s.name.value for s in self.stages]}")

    @property
    def names(self) -> list[StageName]:
        return [s.name for s in self.stages]

    def artifact(self, name: StageName | str) -> str:
        return self[name].artifact(self.output)


def fingerprint(name: StageName, config: dict[str, Any], inputs: list[str], version: str) -> str:
    """Hash of a stage's canonical JSON config, its inputs' fingerprints and the runtime version."""
    canonical = json.dumps(
        {"stage": name.value, "config": config, "inputs": inputs, "version": version},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def _data(model: Any) -> Any:
    """A spec section as canonical JSON data (defaults included, so adding a default that equals
    the old value changes nothing)."""
    return model.model_dump(mode="json", by_alias=True) if model is not None else None


def stage_configs(
    spec: PipelineSpec,
) -> list[tuple[StageName, dict[str, Any], tuple[StageName, ...]]]:
    """Each stage's own configuration (only what can change its output) and its inputs."""
    teacher, dataset = _data(spec.teacher), _data(spec.dataset)
    stages: list[tuple[StageName, dict[str, Any], tuple[StageName, ...]]] = []
    if spec.student.prune is not None:
        prune = {"teacher": teacher, "dataset": dataset, "prune": _data(spec.student.prune)}
        stages.append((StageName.PRUNE, prune, ()))
    stages.append(
        (
            StageName.GENERATE,
            {"teacher": teacher, "dataset": dataset, "generate": _data(spec.generate)},
            (),
        )
    )

    logits = spec.train.losses.logits
    live_teacher = spec.train.losses.features is not None or (
        logits is not None and logits.source is LogitSource.ONLINE
    )
    train = {
        "student": {
            "model": spec.student.model,
            "dtype": spec.student.dtype.value,
            "trustRemoteCode": spec.student.trust_remote_code,
        },
        "train": _data(spec.train),
        "teacher": teacher if live_teacher else None,
    }
    train_inputs = (StageName.GENERATE,) + ((StageName.PRUNE,) if spec.student.prune else ())
    stages.append((StageName.TRAIN, train, train_inputs))
    evaluate = {"evaluate": _data(spec.evaluate)}
    stages.append((StageName.EVALUATE, evaluate, (StageName.TRAIN, StageName.GENERATE)))
    if spec.quantize is not None:
        stages.append(
            (
                StageName.QUANTIZE,
                {"quantize": _data(spec.quantize)},
                (StageName.TRAIN, StageName.GENERATE),
            )
        )
        stages.append(
            (StageName.EVALUATE_QUANTIZED, evaluate, (StageName.QUANTIZE, StageName.GENERATE))
        )
    return stages


def make_plan(spec: PipelineSpec, version: str = __version__) -> Plan:
    """The plan of ``spec``: stages in run order with their fingerprints."""
    fingerprints: dict[StageName, str] = {}
    stages = []
    for name, config, inputs in stage_configs(spec):
        upstream = [fingerprints[i] for i in inputs]
        fingerprints[name] = fingerprint(name, config, upstream, version)
        stages.append(Stage(name, config, inputs, fingerprints[name]))
    return Plan(tuple(stages), spec.output)


def changed_stages(old: Plan, new: Plan) -> list[StageName]:
    """Stages of ``new`` whose artifacts ``old`` did not already have (they must run)."""
    known = {(s.name, s.fingerprint) for s in old.stages}
    return [s.name for s in new.stages if (s.name, s.fingerprint) not in known]
