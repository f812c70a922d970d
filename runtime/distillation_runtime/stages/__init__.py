"""The stage table: every stage of the pipeline, one declarative entry each.

    preflight -> [prune] -> generate -> train -> evaluate -> [quantize -> evaluate-quantized]

The preflight checks the spec against the models and data (seconds, no GPU); every other stage
waits for it without reading it.

The plan (order, inputs, fingerprints), the local runner, ``distill stage``, the RayJob builder
(image, placement, entrypoint), reconcile (conditions, the served model, the gate, the final
metrics) and the CLI's results table all read this table. Adding a stage is one entry here plus
its module beside this file, whose ``execute(context, folder)`` runs it.

Importing this package is cheap (the operator does): each stage's module is imported only when
the stage runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from distillation_runtime.spec import GenerateBackend, LogitSource, PipelineSpec, QuantScheme
from distillation_runtime.stages.base import (
    MODEL_DIR,
    SPEC_PROBLEMS,
    ImageKind,
    Role,
    StageContext,
    StageDefinition,
    StageResult,
    spec_problems,
)

__all__ = [
    "MODEL_DIR",
    "SPEC_PROBLEMS",
    "STAGES",
    "ImageKind",
    "Role",
    "StageContext",
    "StageDefinition",
    "StageResult",
    "added_stage",
    "definition",
    "planned",
    "spec_problems",
]


def _data(model: Any) -> Any:
    """A spec section as canonical JSON data (defaults included, so adding a default that equals
    the old value changes nothing)."""
    return model.model_dump(mode="json", by_alias=True) if model is not None else None


def _preflight_config(spec: PipelineSpec) -> dict[str, Any]:
    """What the preflight reads: the models, the dataset, and the settings it checks them
    against (not learning rates or epochs: editing those re-runs no check)."""
    losses = spec.train.losses
    return {
        "teacher": _data(spec.teacher),
        "student": _data(spec.student),
        "dataset": _data(spec.dataset),
        "features": _data(losses.features),
        "logits": losses.logits is not None,
        "quantize": _data(spec.quantize),
    }


def _prune_config(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "teacher": _data(spec.teacher),
        "dataset": _data(spec.dataset),
        "prune": _data(spec.student.prune),
    }


def _generate_config(spec: PipelineSpec) -> dict[str, Any]:
    """The teacher, the prompts and how they are answered; ``sampledLogprobs`` only when the
    teacher's tokens are drawn (RS-KD), so pipelines from before it keep their fingerprint."""
    config = {
        "teacher": _data(spec.teacher),
        "dataset": _data(spec.dataset),
        "generate": _data(spec.generate),
    }
    if spec.sampled_teacher_signal:
        config["sampledLogprobs"] = True
    return config


def needs_live_teacher(spec: PipelineSpec) -> bool:
    """Training loads the teacher's weights for online logits or feature distillation."""
    logits = spec.train.losses.logits
    online = logits is not None and logits.source is LogitSource.ONLINE
    return spec.train.losses.features is not None or online


def _train_config(spec: PipelineSpec) -> dict[str, Any]:
    """The student and the training settings. ``strategy: auto`` and ``sparsity: topK`` (the
    defaults) are left out, so a pipeline trained before those fields existed keeps its
    fingerprint."""
    train = _data(spec.train)
    if train.get("strategy") == "auto":
        del train["strategy"]
    logits = (train.get("losses") or {}).get("logits") or {}
    if logits.get("sparsity") == "topK":
        del logits["sparsity"]
    return {
        "student": {
            "model": spec.student.model,
            "dtype": spec.student.dtype.value,
            "trustRemoteCode": spec.student.trust_remote_code,
        },
        "train": train,
        "teacher": _data(spec.teacher) if needs_live_teacher(spec) else None,
    }


def _train_inputs(spec: PipelineSpec) -> tuple[str, ...]:
    return ("generate",) + (("prune",) if spec.student.prune is not None else ())


def _evaluate_config(spec: PipelineSpec) -> dict[str, Any]:
    return {"evaluate": _data(spec.evaluate)}


def _quantize_config(spec: PipelineSpec) -> dict[str, Any]:
    """The quantize section (``scheme`` as the one-element ``schemes``, the calibration length
    resolved) and what the scheme search scores by: the gate's metric on the held-out prompts."""
    quantize = _data(spec.quantize)
    if spec.quantize is not None:
        quantize.pop("scheme", None)
        quantize["schemes"] = [s.value for s in spec.quantize.candidates]
        length = spec.quantize.calibration_max_seq_length or spec.train.max_seq_length
        quantize["calibrationMaxSeqLength"] = length
    judged = {"metric": spec.evaluate.gate.metric.value, "maxSamples": spec.evaluate.max_samples}
    return {"quantize": quantize, "judgedBy": judged}


def _same(*metrics: str) -> dict[str, str]:
    """Exports under the stage's own metric names."""
    return {metric: metric for metric in metrics}


def _pruning(spec: PipelineSpec) -> bool:
    return spec.student.prune is not None


def _quantizing(spec: PipelineSpec) -> bool:
    return spec.quantize is not None


def _evaluation(
    name: str,
    condition: str,
    *,
    student: str,
    enabled: Callable[[PipelineSpec], bool] = lambda spec: True,
    exports: dict[str, str] | None = None,
) -> StageDefinition:
    """An evaluate stage: the student of the stage ``student`` against the teacher, on the
    held-out prompts, judged by the same gate (sized by ``placement.stages.evaluate``)."""
    return StageDefinition(
        name=name,
        condition=condition,
        run="distillation_runtime.stages.evaluate:execute",
        fingerprint=_evaluate_config,
        inputs=lambda spec: (student, "generate"),
        enabled=enabled,
        placement="evaluate",
        placement_doc="Evaluation workers.",
        roles=frozenset({Role.GATE}),
        exports=exports or {},
        results=("gatePassed", "retention"),
    )


STAGES: list[StageDefinition] = [
    StageDefinition(
        name="preflight",
        condition="SpecChecked",
        fingerprint=_preflight_config,
        first=True,
        shared_placement=False,
        default_workers=lambda spec: 0,
        placement_doc="The preflight (models' configs, tokenizers and the dataset's first rows "
        "checked against the spec): the Ray head only by default, no GPU; set replicas to give it "
        "workers.",
        results=("problems",),
    ),
    StageDefinition(
        name="prune",
        condition="Pruned",
        fingerprint=_prune_config,
        enabled=_pruning,
        placement_doc="Prune stage workers.",
        results=("studentParameters",),
        exports=_same("teacherParameters", "studentParameters"),
    ),
    StageDefinition(
        name="generate",
        condition="TeacherDataGenerated",
        fingerprint=_generate_config,
        placement_doc="Teacher generation workers.",
        uses_vllm=lambda spec: (
            spec.generate.backend is not GenerateBackend.TRANSFORMERS
            and not spec.sampled_teacher_signal
        ),
        results=("records", "tokensPerSecond"),
    ),
    StageDefinition(
        name="train",
        condition="StudentTrained",
        fingerprint=_train_config,
        inputs=_train_inputs,
        placement_doc="Training workers.",
        default_workers=lambda spec: spec.train.workers,
        spreads=lambda spec: spec.train.workers > 1,
        roles=frozenset({Role.STUDENT}),
        results=("finalLoss", "steps", "resumedFromStep"),
    ),
    _evaluation(
        "evaluate", "Evaluated", student="train", exports={"unquantized.retention": "retention"}
    ),
    StageDefinition(
        name="quantize",
        condition="Quantized",
        fingerprint=_quantize_config,
        inputs=lambda spec: ("train", "generate"),
        enabled=_quantizing,
        format_version=2,  # 2: the scheme search (attempts, the choice, or the unquantised)
        image=ImageKind.QUANTIZE,
        placement_doc="Quantisation workers.",
        roles=frozenset({Role.STUDENT}),
        exports={
            **_same("scheme", "sizeBytesBefore", "sizeBytesAfter", "compression"),
            **_same("schemesTried", "quantized"),
            **{f"quantize.retention.{s.value}": f"retention.{s.value}" for s in QuantScheme},
        },
        results=("scheme", "compression", "schemesTried"),
        requires="distillation_runtime.stages.quantize:require_llmcompressor",
    ),
    _evaluation(
        "evaluate-quantized", "QuantizedEvaluated", student="quantize", enabled=_quantizing
    ),
]
"""Every stage, in an order where each comes after its inputs."""


def definition(name: str) -> StageDefinition:
    """The table entry of ``name``; a KeyError listing the stages when there is none."""
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(f"no stage {name!r}; the stages are {[s.name for s in STAGES]}")


def planned(spec: PipelineSpec) -> list[StageDefinition]:
    """The table entries this spec runs, in table order."""
    return [entry for entry in STAGES if entry.enabled(spec)]


@contextmanager
def added_stage(entry: StageDefinition, *, after: str) -> Iterator[StageDefinition]:
    """The table with ``entry`` inserted after the stage ``after``, for as long as the block
    runs (how a test, or a plugin being tried out, adds a stage)."""
    position = [s.name for s in STAGES].index(after) + 1
    STAGES.insert(position, entry)
    try:
        yield entry
    finally:
        STAGES.remove(entry)


def placement_sections(stages: Sequence[StageDefinition] | None = None) -> dict[str, str]:
    """``placement.stages`` field -> its documentation, one per distinct section."""
    sections: dict[str, str] = {}
    for entry in STAGES if stages is None else stages:
        sections.setdefault(entry.placement_section, entry.placement_doc)
    return sections
