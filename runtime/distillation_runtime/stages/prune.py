"""The prune stage: the teacher, cut to the student's size (Minitron style).

Config in (``PruneJob``), one pass, artifacts out:

1. load the teacher and check its architecture (Llama, Mistral, Qwen2, Qwen3);
2. the target shape: explicit sizes, or the largest shape under a parameter budget, checked
   against the teacher before any forward pass (a bad request fails in seconds, not after
   an hour of calibration);
3. importance scores: reused from ``importance`` when given (same teacher, same calibration
   set), else forward passes over the calibration prompts (``prune.collect_importance``);
4. cut the weights and load them into a fresh model of the pruned shape;
5. out: ``model/`` (a Hugging Face checkpoint with the teacher's tokenizer), the scores in
   ``importance.safetensors`` (a later run with another target reuses them) and ``prune.json``
   (shapes, parameter counts, kept layers).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillation_runtime.prune import (
    BudgetAxes,
    Importance,
    PruneError,
    Shape,
    check_architecture,
    explicit_target,
    fit_budget,
    hidden_must_divide_heads,
    shape_of,
)
from distillation_runtime.spec import DType, PruneSpec
from distillation_runtime.stages.base import MODEL_DIR, StageContext, StageResult

IMPORTANCE_FILE = "importance.safetensors"
REPORT_FILE = "prune.json"


class PruneJob(BaseModel):
    """One prune: what ``distill run`` and the RayJob both execute.

    The targets mirror ``student.prune`` without its lower bound on the budget, so tiny models
    (tests, benchmarks) can be pruned to a budget too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher: str = Field(description="Folder of the teacher checkpoint.")
    prompts: list[str] = Field(description="Calibration prompts (the dataset's train split).")
    output: str = Field(description="Folder for the pruned model, its scores and report.")
    hidden_size: int | None = Field(default=None, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1)
    num_attention_heads: int | None = Field(default=None, ge=1)
    num_layers: int | None = Field(default=None, ge=1)
    parameter_budget: int | None = Field(default=None, ge=1)
    budget_axes: BudgetAxes = "width"
    depth_importance: str = Field(default="cosine", pattern="^(cosine|loss)$")
    importance: str | None = Field(
        default=None,
        description="importance.safetensors of an earlier prune of the same teacher on the same "
        "calibration prompts: no forward passes are run.",
    )
    dtype: DType = DType.AUTO
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=256, ge=2)

    @classmethod
    def from_spec(cls, spec: PruneSpec, **job: Any) -> PruneJob:
        """The job for ``student.prune`` (the rest — folders, prompts — from the caller)."""
        return cls(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_attention_heads=spec.num_attention_heads,
            num_layers=spec.num_layers,
            parameter_budget=spec.parameter_budget,
            budget_axes=spec.budget_axes.value if spec.budget_axes else "width",
            depth_importance=spec.depth_importance.value,
            **job,
        )


@dataclass(frozen=True)
class PruneResult:
    """What the stage reports (also written to ``prune.json``)."""

    architecture: str
    teacher: dict[str, int]
    student: dict[str, int]
    teacher_parameters: int
    student_parameters: int
    kept_layers: list[int]
    importance_reused: bool
    calibration_samples: int
    seconds: float


def target_shape(
    job: PruneJob,
    teacher: Shape,
    parameters: dict[str, tuple[int, ...]],
    hidden_per_head: bool = False,
) -> Shape:
    """The student's shape: the budget's fit, or the teacher with the explicit sizes (a hidden
    size the heads divide when the architecture needs it: ``hidden_must_divide_heads``)."""
    if job.parameter_budget is not None:
        return fit_budget(
            parameters, teacher, job.parameter_budget, job.budget_axes, hidden_per_head
        )
    return explicit_target(
        teacher,
        hidden_size=job.hidden_size,
        intermediate_size=job.intermediate_size,
        num_attention_heads=job.num_attention_heads,
        num_layers=job.num_layers,
        hidden_per_head=hidden_per_head,
    )


def _load_teacher(job: PruneJob) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_architecture(AutoConfig.from_pretrained(job.teacher))
    dtype = "auto" if job.dtype is DType.AUTO else getattr(torch, job.dtype.value)
    model: Any = AutoModelForCausalLM.from_pretrained(job.teacher, dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(job.teacher)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _progress(total: int) -> Any:
    """A one-line counter on a terminal; nothing when output is not a terminal."""
    if not sys.stderr.isatty():
        return None
    done = [0]

    def advance(count: int) -> None:
        done[0] += count
        print(f"\rprune: importance {done[0]}/{total} prompts", end="", file=sys.stderr)
        if done[0] >= total:
            print(file=sys.stderr)

    return advance


def scores(job: PruneJob, model: Any, tokenizer: Any) -> tuple[Importance, bool]:
    """The importance scores: the saved ones when given (checked against the teacher), else
    measured now."""
    from distillation_runtime.prune import collect_importance, load_importance

    if job.importance is not None:
        saved = load_importance(job.importance)
        teacher = shape_of(model.config)
        expected = (teacher.layers, teacher.intermediate)
        if tuple(saved.neurons.shape) != expected or saved.hidden.shape[0] != teacher.hidden:
            raise PruneError(
                f"importance scores {job.importance} belong to another model (neurons "
                f"{tuple(saved.neurons.shape)}, teacher has {expected}); remove them to re-score"
            )
        return saved, True
    measured = collect_importance(
        model,
        tokenizer,
        job.prompts,
        depth_method=job.depth_importance,
        batch_size=job.batch_size,
        max_length=job.max_length,
        progress=_progress(len(job.prompts)),
    )
    return measured, False


def run(job: PruneJob) -> PruneResult:
    """Prune the teacher to the job's target and write the artifact folder."""
    from distillation_runtime.prune import (
        build_pruned,
        choose,
        count_parameters,
        parameter_shapes,
        save_importance,
    )

    started = time.perf_counter()
    output = Path(job.output)
    output.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_teacher(job)
    architecture = check_architecture(model.config)
    teacher = shape_of(model.config)
    parameters = parameter_shapes(model)
    target = target_shape(job, teacher, parameters, hidden_must_divide_heads(model.config))

    importance, reused = scores(job, model, tokenizer)
    keep = choose(importance, teacher, target)
    pruned = build_pruned(model, keep, target)
    pruned.save_pretrained(output / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(output / MODEL_DIR)
    save_importance(importance, str(output / IMPORTANCE_FILE))

    result = PruneResult(
        architecture=architecture,
        teacher=asdict(teacher),
        student=asdict(target),
        teacher_parameters=count_parameters(parameters, teacher),
        student_parameters=count_parameters(parameters, target),
        kept_layers=keep.layers,
        importance_reused=reused,
        calibration_samples=importance.samples,
        seconds=round(time.perf_counter() - started, 3),
    )
    (output / REPORT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# The stage (the stage table's entry point)
# --------------------------------------------------------------------------------------------


def importance_key(context: StageContext) -> str:
    """What the importance scores depend on: the teacher and the calibration prompts, not the
    target. Two prunes with the same key share one set of scores."""
    import hashlib

    spec = context.spec
    prune = spec.student.prune
    assert prune is not None
    canonical = json.dumps(
        {
            "teacher": spec.teacher.model_dump(mode="json", by_alias=True),
            "dataset": spec.dataset.model_dump(mode="json", by_alias=True),
            "calibrationSamples": prune.calibration_samples,
            "depthImportance": prune.depth_importance.value,
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def saved_importance(context: StageContext, key: str) -> Path | None:
    """The importance scores of a complete earlier prune artifact under the same output with
    the same key, fetched to a local file; None when there is none."""
    from distillation_runtime.storage import artifact_complete, filesystem, read_manifest

    output = context.spec.output
    fs, root = filesystem(output)
    for folder in sorted(fs.glob(f"{root}/prune-*")):
        uri = f"{output.rstrip('/')}/{folder.rstrip('/').rsplit('/', 1)[-1]}"
        if not artifact_complete(uri):
            continue
        if read_manifest(uri).get("metrics", {}).get("importanceKey") != key:
            continue
        local = context.work / f"importance-{key}.safetensors"
        local.parent.mkdir(parents=True, exist_ok=True)  # a new machine has no work folder yet
        fs.get(f"{folder}/{IMPORTANCE_FILE}", str(local))
        return local
    return None


def execute(context: StageContext, folder: Path) -> StageResult:
    """Prune the teacher into ``folder``, reusing saved importance scores when there are some."""
    from transformers import AutoTokenizer

    from distillation_runtime.data import load_prompts

    spec = context.spec
    prune = spec.student.prune
    assert prune is not None
    teacher = context.local(spec.teacher.model)
    key = importance_key(context)
    saved = saved_importance(context, key)
    prompts: list[str] = []
    if saved is None:
        loaded = load_prompts(spec.dataset, AutoTokenizer.from_pretrained(teacher))
        prompts = [p.text for p in loaded.train[: prune.calibration_samples]]
    else:
        context.log(f"prune: reusing importance scores {key} (no forward passes)")
    job = PruneJob.from_spec(
        prune,
        teacher=str(teacher),
        prompts=prompts,
        output=str(folder),
        importance=str(saved) if saved else None,
        dtype=spec.teacher.dtype,
    )
    result = run(job)
    metrics = {
        "architecture": result.architecture,
        "teacherParameters": result.teacher_parameters,
        "studentParameters": result.student_parameters,
        "keptLayers": result.kept_layers,
        "student": result.student,
        "calibrationSamples": result.calibration_samples,
        "importanceReused": result.importance_reused,
        "importanceKey": key,
    }
    return StageResult(metrics)
