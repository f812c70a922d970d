"""The stage table is the one place a stage is defined: a stage added here, in the test, shows in
the plan, runs with ``distill stage``, gets a RayJob and appears in the Distillation's status,
without any other file knowing it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillation_operator.api import DistillationSpec, StagePlacements, stage_condition
from distillation_operator.builders.common import Images
from distillation_operator.builders.rayjob import SPEC_ENV, build_rayjob, stage_image
from distillation_operator.observed import Artifact, Observed
from distillation_operator.reconcile import reconcile
from distillation_runtime.cli import main as distill
from distillation_runtime.pipeline import StageOutcome, results_table
from distillation_runtime.plan import make_plan
from distillation_runtime.spec import PipelineSpec
from distillation_runtime.stages import (
    STAGES,
    ImageKind,
    StageContext,
    StageDefinition,
    StageResult,
    added_stage,
    definition,
    placement_sections,
)
from distillation_runtime.storage import read_manifest
from support.statuses import preflight_passed

IMAGES = Images("reg/runtime:1", "reg/quantize:1", "reg/vllm:1")
SUMMARY_FILE = "prompts.txt"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def count_prompts(context: StageContext, folder: Path) -> StageResult:
    """The added stage: counts the workload's prompts and writes them to a file."""
    lines = Path(context.spec.dataset.prompts).read_text().splitlines()
    (folder / SUMMARY_FILE).write_text("\n".join(lines) + "\n")
    return StageResult({"prompts": len(lines), "longest": max(len(x) for x in lines)})


PROMPT_COUNT = StageDefinition(
    name="prompt-count",
    condition="PromptsCounted",
    run=f"{__name__}:count_prompts",
    fingerprint=lambda spec: {"dataset": spec.dataset.model_dump(mode="json", by_alias=True)},
    results=("prompts",),
)


@pytest.fixture
def prompt_count() -> Iterator[StageDefinition]:
    with added_stage(PROMPT_COUNT, after="prune") as entry:
        yield entry
    assert "prompt-count" not in [s.name for s in STAGES]


def pipeline(tmp_path: Path) -> dict[str, Any]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n{"prompt": "22+22="}\n{"prompt": "3+3="}\n')
    return {
        "teacher": {"model": "hf://org/teacher"},
        "student": {"model": "hf://org/student"},
        "dataset": {"prompts": str(prompts)},
        "output": str(tmp_path / "out"),
    }


def distillation(tmp_path: Path, status: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = pipeline(tmp_path) | {
        "dataset": {"prompts": "s3://b/prompts.jsonl"},
        "output": "s3://b/out",
    }
    return {
        "apiVersion": "distillation.dev/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": spec,
        "status": status or preflight_passed(spec),
    }


def test_the_table_names_every_stage_once() -> None:
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    conditions = [s.condition for s in STAGES]
    assert len(conditions) == len(set(conditions))
    assert definition("train").condition == stage_condition("train") == "StudentTrained"
    assert definition("quantize").image is ImageKind.QUANTIZE
    # placement.stages in the CRD has a field per placement section of the table
    assert set(StagePlacements.model_fields) == set(placement_sections())
    with pytest.raises(KeyError, match="the stages are"):
        definition("distil")


def test_an_added_stage_is_planned_with_its_own_fingerprint(
    prompt_count: StageDefinition, tmp_path: Path
) -> None:
    spec = PipelineSpec.model_validate(pipeline(tmp_path))
    plan = make_plan(spec)
    assert plan.names == ["preflight", "prompt-count", "generate", "train", "evaluate"]
    assert plan["prompt-count"].inputs == ()
    assert plan.artifact("prompt-count").endswith(
        f"/prompt-count-{plan['prompt-count'].fingerprint}"
    )
    edited = spec.model_copy(update={"generate": spec.generate.model_copy(update={"stop": ["."]})})
    assert make_plan(edited)["prompt-count"].fingerprint == plan["prompt-count"].fingerprint


def test_an_added_stage_runs_with_distill_stage(
    prompt_count: StageDefinition, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(pipeline(tmp_path)))
    assert distill(["plan", str(spec_file)]) == 0
    assert "prompt-count" in capsys.readouterr().out
    assert distill(["stage", "prompt-count", "--config", str(spec_file)]) == 0
    artifact = make_plan(PipelineSpec.model_validate(pipeline(tmp_path))).artifact("prompt-count")
    assert Path(artifact, SUMMARY_FILE).read_text().count("prompt") == 3
    manifest = read_manifest(artifact)
    assert manifest["metrics"] == {"prompts": 3, "longest": 20}
    table = results_table([StageOutcome("prompt-count", "ran", artifact, 0.1, manifest["metrics"])])
    assert "prompts=3" in table
    assert "longest" not in table  # only the result columns the table entry names


def test_a_stage_writes_where_the_operator_planned(
    prompt_count: StageDefinition, tmp_path: Path
) -> None:
    """An image of another version may plan other URIs; ``--artifact`` (what the RayJob passes)
    wins, so the stage writes exactly where the operator will look."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(pipeline(tmp_path)))
    planned_elsewhere = tmp_path / "planned" / "prompt-count-0123456789ab"
    argv = ["stage", "prompt-count", "--config", str(spec_file)]
    assert distill([*argv, "--artifact", f"prompt-count={planned_elsewhere}"]) == 0
    assert read_manifest(str(planned_elsewhere))["metrics"]["prompts"] == 3
    own = make_plan(PipelineSpec.model_validate(pipeline(tmp_path))).artifact("prompt-count")
    assert not Path(own).exists()
    assert distill([*argv, "--artifact", "prompt-count"]) == 2  # not NAME=URI


def test_an_added_stage_gets_a_rayjob_and_a_condition(
    prompt_count: StageDefinition, tmp_path: Path
) -> None:
    obj = distillation(tmp_path)
    spec = DistillationSpec.model_validate(obj["spec"])
    plan = make_plan(spec.pipeline())
    rayjob = build_rayjob(obj, spec, plan, "prompt-count", 1, IMAGES)
    assert rayjob["spec"]["entrypoint"] == (
        f"distill stage prompt-count --config-env {SPEC_ENV} "
        f"--artifact prompt-count={plan.artifact('prompt-count')} "
        f"--artifact preflight={plan.artifact('preflight')}"
    )
    assert rayjob["metadata"]["labels"]["distillation.dev/stage"] == "prompt-count"
    assert stage_image(spec, "prompt-count", IMAGES) == IMAGES.runtime

    first = reconcile(Observed(obj, [], now=NOW), IMAGES)
    started = {c["metadata"]["labels"]["distillation.dev/stage"] for c in first.create}
    assert started == {"prompt-count", "generate"}  # neither has inputs: they start together
    obj["status"] = first.status
    conditions = {c["type"]: c for c in first.status["conditions"]}
    assert conditions["PromptsCounted"]["status"] == "False"
    assert conditions["PromptsCounted"]["reason"] == "Running"

    job = next(
        c
        for c in first.create
        if c["metadata"]["labels"]["distillation.dev/stage"] == "prompt-count"
    )
    done = job | {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}
    manifest = {"metrics": {"prompts": 3, "longest": 20}}
    artifacts = {plan.artifact("prompt-count"): Artifact(manifest)}
    second = reconcile(Observed(obj, [done], artifacts=artifacts, now=NOW), IMAGES)
    conditions = {c["type"]: c for c in second.status["conditions"]}
    assert conditions["PromptsCounted"]["status"] == "True"
    record = next(s for s in second.status["stages"] if s["name"] == "prompt-count")
    assert record["metrics"] == {"prompts": "3", "longest": "20"}
    assert second.status["progress"] == "2/5"  # with the preflight
    assert any(e.reason == "StageSucceeded" and "prompt-count" in e.message for e in second.events)
