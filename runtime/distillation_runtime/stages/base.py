"""What a stage is: its definition in the stage table, and what running it gets and returns.

Light on purpose (dataclasses; the spec only for types): the operator imports the table to
plan, build RayJobs and name conditions, so nothing here may pull in torch or Ray. The function
that runs a stage is named as ``"module:function"`` and imported only when the stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from distillation_runtime.plan import Plan
    from distillation_runtime.spec import PipelineSpec

MODEL_DIR = "model"
"""The folder, inside an artifact, of a stage's model (Hugging Face layout): the pruned student,
the trained student, the quantised student. Servers and later stages load ``<artifact>/model``."""


SPEC_PROBLEMS = "specProblems"
"""A stage's metric listing why the spec cannot run with these models and data (the preflight
writes it): each names the field, the value and what is allowed. Non-empty means refused:
``distill run`` stops, the operator ends the Distillation InvalidSpec and starts nothing else."""


def spec_problems(metrics: Mapping[str, Any] | None) -> list[str]:
    """The ``SPEC_PROBLEMS`` of a stage's metrics (none when absent or unreadable)."""
    found = (metrics or {}).get(SPEC_PROBLEMS)
    return [str(p) for p in found] if isinstance(found, list) else []


class ImageKind(StrEnum):
    """Which container image a stage's pods run (``images.*`` in the chart)."""

    RUNTIME = "runtime"
    RUNTIME_VLLM = "runtimeVllm"
    """The runtime plus vLLM (the ``vllm`` extra): a stage that generates with vLLM on GPUs
    (``StageDefinition.uses_vllm``)."""
    QUANTIZE = "quantize"  # llm-compressor pins versions the runtime image cannot take


class Role(StrEnum):
    """What later stages and the operator use a stage's artifact for."""

    STUDENT = "student"
    """Writes a student under ``MODEL_DIR``; the last such stage of a plan is the one served."""
    GATE = "gate"
    """Evaluates a student; the last such stage of a plan decides the quality gate."""


@dataclass(frozen=True)
class StageResult:
    """What a stage returns: its metrics (into the manifest and the status) and the artifacts it
    read (recorded in the manifest, for lineage)."""

    metrics: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)


class StageContext(Protocol):
    """What a running stage may ask of its runner (``distill run``, or ``distill stage`` in a
    RayJob)."""

    spec: PipelineSpec
    plan: Plan
    work: Path
    current: str
    """The name of the stage being run (one function may serve several table entries)."""

    def local(self, uri: str) -> Path:
        """A local folder holding ``uri`` (a model, a dataset or an artifact), fetched if remote."""
        ...

    def artifact(self, name: str) -> str:
        """The planned artifact URI of the stage ``name``."""
        ...

    def log(self, text: str) -> None:
        """A line for the person watching."""
        ...


StageFunction = Callable[[StageContext, Path], StageResult]
"""Runs a stage: reads its inputs through the context, writes its files into the folder given
(the staging folder published as the artifact), returns its metrics."""


def _always(spec: PipelineSpec) -> bool:
    return True


def _none(spec: PipelineSpec) -> tuple[str, ...]:
    return ()


def _never(spec: PipelineSpec) -> bool:
    return False


@dataclass(frozen=True)
class StageDefinition:
    """One row of the stage table (``distillation_runtime.stages.STAGES``)."""

    name: str
    """The stage's name: RayJob names and labels, artifact folders, ``distill stage NAME``."""
    condition: str
    """The type of the stage's condition in a Distillation's status (e.g. StudentTrained)."""
    fingerprint: Callable[[PipelineSpec], dict[str, Any]]
    """The slice of the spec that can change the stage's output (hashed into its fingerprint)."""
    run: str | None = None
    """``"module:function"`` of the ``StageFunction`` that runs it (imported when it runs);
    default: ``execute`` of ``distillation_runtime.stages.<name>``."""
    inputs: Callable[[PipelineSpec], tuple[str, ...]] = _none
    """The stages whose artifacts it reads (it starts when they are done)."""
    enabled: Callable[[PipelineSpec], bool] = _always
    """Whether a spec plans this stage at all."""
    format_version: int = 1
    """Version of the artifact's layout: bump it when the stage writes something else, so
    artifacts of the old layout are never reused."""
    image: ImageKind = ImageKind.RUNTIME
    placement: str | None = None
    """The ``placement.stages`` field that sizes its pods (default: its own name)."""
    placement_doc: str = ""
    """Documentation of that field (``kubectl explain``), for the first stage that names it."""
    default_workers: Callable[[PipelineSpec], int] | None = None
    """Worker pods when the placement does not say (default: one)."""
    roles: frozenset[Role] = frozenset()
    exports: Mapping[str, str] = field(default_factory=dict)
    """Final status metric <- this stage's metric, for stages that are not the final gate."""
    results: tuple[str, ...] = ()
    """Metrics ``distill run`` shows in its closing table."""
    requires: str | None = None
    """``"module:function"`` checked before any stage runs when this one will (a missing
    extra is reported before hours of training, not after)."""
    first: bool = False
    """Every other stage waits for it without reading its artifact, so it is not part of their
    fingerprints (adding or changing it re-runs nothing): the preflight."""
    shared_placement: bool = True
    """Whether ``placement.workers`` sizes its pods too; the CPU-only preflight takes only its own
    ``placement.stages`` section (no GPU is held for a config check)."""
    uses_vllm: Callable[[PipelineSpec], bool] = _never
    """Whether the stage generates with vLLM under this spec when its pods have GPUs (backend
    vllm, or auto): those pods then run the runtime image with vLLM (``images.runtimeVllm``)."""
    spreads: Callable[[PipelineSpec], bool] = _never
    """Whether the stage spreads its work over several Ray workers itself (Ray Train with
    ``train.workers > 1``). Such a stage runs in the RayJob's driver on the head; every other
    stage is sent whole to one worker node (``distillation_runtime.raycluster``)."""

    @property
    def placement_section(self) -> str:
        return self.placement or self.name

    @property
    def entrypoint(self) -> str:
        """The command that runs it, as a RayJob's driver runs it (with ``--config-env``)."""
        return f"distill stage {self.name}"

    def function(self) -> StageFunction:
        """The function that runs the stage (imported now)."""
        reference = self.run or f"distillation_runtime.stages.{self.name.replace('-', '_')}:execute"
        function: StageFunction = resolve(reference)
        return function


def resolve(reference: str) -> Any:
    """The object named ``"package.module:attribute"``."""
    module, _, attribute = reference.partition(":")
    if not attribute:
        raise ValueError(f"{reference!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)
