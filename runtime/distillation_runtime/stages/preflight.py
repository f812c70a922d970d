"""The preflight stage: what the schema cannot know, checked in seconds before any GPU starts.

A spec can be valid and still impossible for the models it names: a prune target larger than
the teacher, a feature layer the student does not have, a tensor-parallel size that does not
divide the heads, widths W4A16 cannot group, dataset fields the records do not have, a student
whose tokenizer is not the teacher's for logit distillation. Each would fail its stage minutes
(or hours of GPU time) later. This stage reads only the models' ``config.json`` and tokenizers
(no weights: ``storage.model_metadata``; shapes come from a model built on the meta device) and
the dataset's first rows, and runs the checks the stages themselves would run.

What it finds is data, not an exception: ``specProblems`` in its metrics, each naming the field,
the value and what is allowed. ``distill run`` stops with them; the operator ends the
Distillation ``Failed`` / ``Stalled`` with reason ``InvalidSpec`` and starts no other stage (the
stage table has every other stage wait for this one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillation_runtime.spec import PipelineSpec, QuantScheme
from distillation_runtime.stages.base import SPEC_PROBLEMS, StageContext, StageResult

REPORT_FILE = "preflight.json"
SAMPLE_ROWS = 64
"""Dataset records read to check the fields (the first ones, in the order the stages read)."""


@dataclass(frozen=True)
class Models:
    """What the checks read of the models: configs and tokenizers, no weights."""

    teacher_config: Any
    teacher_tokenizer: Any
    student_config: Any
    """The student's own config, or the pruned teacher's when the student is pruned."""
    student_tokenizer: Any


Check = Callable[[PipelineSpec, Models], list[str]]


def _meta_model(config: Any) -> Any:
    """The model of ``config`` with no storage behind its tensors: shapes for free."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]


def pruned_student_config(spec: PipelineSpec, teacher_config: Any) -> tuple[Any, list[str]]:
    """The config the prune stage would give the student (its target checked against the
    teacher exactly as the stage checks it), or the teacher's config and the problems."""
    from distillation_runtime.prune import (
        PruneError,
        check_architecture,
        hidden_must_divide_heads,
        parameter_shapes,
        pruned_config,
        shape_of,
    )
    from distillation_runtime.stages.prune import PruneJob, target_shape

    prune = spec.student.prune
    assert prune is not None
    try:
        check_architecture(teacher_config)
        teacher = shape_of(teacher_config)
        parameters = parameter_shapes(_meta_model(teacher_config))
        job = PruneJob.from_spec(prune, teacher="", prompts=[], output="")
        target = target_shape(job, teacher, parameters, hidden_must_divide_heads(teacher_config))
    except (PruneError, ValueError) as err:
        return teacher_config, [str(err)]
    return pruned_config(teacher_config, target, list(range(target.layers))), []


def feature_layers(spec: PipelineSpec, models: Models) -> list[str]:
    """Every layer of ``train.losses.features.layerMap`` exists in its model."""
    features = spec.train.losses.features
    if features is None:
        return []
    problems = []
    sides = (
        ("student", int(models.student_config.num_hidden_layers)),
        ("teacher", int(models.teacher_config.num_hidden_layers)),
    )
    for index, pair in enumerate(features.layer_map):
        for side, layers in sides:
            value = getattr(pair, side)
            if value >= layers:
                problems.append(
                    f"train.losses.features.layerMap[{index}].{side} is {value} but the {side} "
                    f"has {layers} layers: use 0 to {layers - 1}"
                )
    return problems


def tensor_parallelism(spec: PipelineSpec, models: Models) -> list[str]:
    """vLLM splits the attention heads (and the KV heads) evenly over the GPUs."""
    size = spec.teacher.tensor_parallel_size
    heads = int(models.teacher_config.num_attention_heads)
    kv_heads = int(getattr(models.teacher_config, "num_key_value_heads", None) or heads)
    if size == 1:
        return []
    allowed = [n for n in range(1, heads + 1) if heads % n == 0 and _kv_split(kv_heads, n)]
    if heads % size == 0 and _kv_split(kv_heads, size):
        return []
    return [
        f"teacher.tensorParallelSize is {size} but the teacher has {heads} attention heads and "
        f"{kv_heads} KV heads, which must split evenly over the GPUs: use one of "
        f"{', '.join(map(str, allowed))}"
    ]


def _kv_split(kv_heads: int, size: int) -> bool:
    """vLLM shards KV heads when there are at least as many as GPUs, else replicates them."""
    return kv_heads % size == 0 if kv_heads >= size else size % kv_heads == 0


def int4_widths(spec: PipelineSpec, models: Models) -> list[str]:
    """W4A16 groups input columns: the quantize stage's own group-size rule, on the student's
    shapes. Only when W4A16 is the one scheme: in a list, the search skips it for the next."""
    if spec.quantize is None or spec.quantize.candidates != (QuantScheme.W4A16,):
        return []
    from distillation_runtime.stages.quantize import ignored_modules, int4_group_size, linear_widths

    widths = linear_widths(_meta_model(models.student_config), ignored_modules(spec.quantize))
    try:
        int4_group_size(widths)
    except ValueError as err:
        return [str(err).removeprefix("spec.")]
    return []


def vocabularies(spec: PipelineSpec, models: Models) -> list[str]:
    """Logit and feature losses compare the models token by token: same tokenizer (the train
    stage's own check)."""
    losses = spec.train.losses
    if spec.student.prune is not None or (losses.logits is None and losses.features is None):
        return []
    from distillation_runtime.losses import VocabularyMismatchError, check_same_tokenizer

    try:
        check_same_tokenizer(models.student_tokenizer, models.teacher_tokenizer)
    except VocabularyMismatchError as err:
        which = "train.losses.logits" if losses.logits is not None else "train.losses.features"
        return [f"{which} with student.model {spec.student.model}: {err}"]
    return []


def dataset_rows(spec: PipelineSpec, models: Models) -> list[str]:
    """The first records have the fields the spec names (and render, for chat messages)."""
    from distillation_runtime.data import load_prompts

    sample = spec.dataset.model_copy(update={"max_prompts": SAMPLE_ROWS})
    try:
        load_prompts(sample, models.teacher_tokenizer)
    except (ValueError, FileNotFoundError, TypeError) as err:
        return [str(err)]
    return []


CHECKS: tuple[Check, ...] = (
    feature_layers,
    tensor_parallelism,
    int4_widths,
    vocabularies,
    dataset_rows,
)
"""Each check returns its problems; all run, so one preflight reports everything at once."""


def problems(spec: PipelineSpec, models: Models, prune_problems: list[str]) -> list[str]:
    found = list(prune_problems)
    for check in CHECKS:
        found.extend(check(spec, models))
    return found


def load_models(context: StageContext) -> tuple[Models, list[str]]:
    """Configs and tokenizers of the teacher and student (metadata only), and the prune
    target's problems when the student is pruned."""
    from transformers import AutoConfig, AutoTokenizer

    from distillation_runtime.storage import model_metadata

    spec = context.spec
    folder = context.work / "metadata"
    remote = {"trust_remote_code": spec.teacher.trust_remote_code}
    teacher = model_metadata(spec.teacher.model, folder)
    teacher_config = AutoConfig.from_pretrained(teacher, **remote)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher, **remote)
    if spec.student.prune is not None:
        student_config, found = pruned_student_config(spec, teacher_config)
        return Models(teacher_config, teacher_tokenizer, student_config, teacher_tokenizer), found
    assert spec.student.model is not None
    student = model_metadata(spec.student.model, folder)
    remote = {"trust_remote_code": spec.student.trust_remote_code}
    models = Models(
        teacher_config,
        teacher_tokenizer,
        AutoConfig.from_pretrained(student, **remote),
        AutoTokenizer.from_pretrained(student, **remote),
    )
    return models, []


def execute(context: StageContext, folder: Path) -> StageResult:
    """Run every check; write what was checked and found to ``preflight.json``."""
    models, found = load_models(context)
    found = problems(context.spec, models, found)
    for problem in found:
        context.log(f"preflight: {problem}")
    report = {
        SPEC_PROBLEMS: found,
        "problems": len(found),
        "checks": ["prune", *(check.__name__ for check in CHECKS)],
        "teacherLayers": int(models.teacher_config.num_hidden_layers),
        "studentLayers": int(models.student_config.num_hidden_layers),
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return StageResult(dict(report))
