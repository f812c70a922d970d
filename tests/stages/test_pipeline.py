"""`distill run` / `distill stage` end to end on tiny models: artifacts, reuse, re-planning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
)
from distillation_runtime.plan import make_plan
from distillation_runtime.progress import progress_uri, read_progress
from distillation_runtime.spec import PipelineSpec
from distillation_runtime.storage import artifact_complete, read_manifest

DISTILL = Path(sys.executable).parent / "distill"


def distill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DISTILL), *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = make_tokenizer()
    save_pretrained(make_model(tokenizer, ModelSize(), seed=1), tokenizer, root / "teacher")
    save_pretrained(
        make_model(tokenizer, ModelSize(hidden=32, layers=1), seed=2), tokenizer, root / "student"
    )
    with (root / "prompts.jsonl").open("w") as f:
        for e in sample_examples("addition", 40, seed=0):
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n")
    return root


def spec(root: Path, **train: Any) -> dict[str, Any]:
    return {
        "teacher": {"model": str(root / "teacher")},
        "student": {"model": str(root / "student")},
        "dataset": {
            "prompts": str(root / "prompts.jsonl"),
            "referenceField": "answer",
            "evalFraction": "0.25",
        },
        "generate": {"maxNewTokens": 4, "topLogprobs": 4},
        "train": {"losses": {"logits": {}}, "epochs": 1, "batchSize": 8, **train},
        "evaluate": {
            "metrics": ["exactMatch", "tokenF1"],
            "gate": {"metric": "tokenF1", "minRetention": "0.5"},
        },
        "output": str(root / "artifacts"),
    }


def write(root: Path, name: str, data: dict[str, Any]) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_reuse_and_replan(project: Path) -> None:
    first = write(project, "spec.yaml", spec(project))
    out = distill("run", str(first), cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = make_plan(PipelineSpec.model_validate(spec(project)))
    for stage in plan.stages:
        assert artifact_complete(plan.artifact(stage.name)), stage.name
    manifest = read_manifest(plan.artifact("evaluate"))
    assert manifest["fingerprint"] == plan["evaluate"].fingerprint
    assert isinstance(manifest["metrics"]["gatePassed"], bool)
    assert (Path(plan.artifact("evaluate")) / "README.md").exists()
    states = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[1:]}
    assert states == dict.fromkeys(["preflight", "generate", "train", "evaluate"], "ran")
    assert "preflight  ran" in out.stdout
    # what the operator shows while they run: each stage's last progress record, beside it
    trained = read_progress(progress_uri(plan.artifact("train")))
    assert trained is not None
    assert (trained["unit"], trained["done"]) == ("steps", trained["total"])
    assert trained["done"] == read_manifest(plan.artifact("train"))["metrics"]["steps"]
    assert "loss" in trained
    generated = read_progress(progress_uri(plan.artifact("generate")))
    assert generated is not None
    assert generated["done"] == generated["total"] == 40  # every prompt answered once
    assert "problems=0" in out.stdout

    again = distill("run", str(first), cwd=project)
    assert again.returncode == 0
    assert [line.split()[1] for line in again.stdout.splitlines()[1:]] == ["reused"] * 4

    edited = write(project, "edited.yaml", spec(project, learningRate="1e-3"))
    third = distill("run", str(edited), cwd=project)
    assert third.returncode == 0, third.stderr[-3000:]
    states = {line.split()[0]: line.split()[1] for line in third.stdout.splitlines()[1:]}
    # the preflight checks models and data, not learning rates: reused too
    assert states == {
        "preflight": "reused",
        "generate": "reused",
        "train": "ran",
        "evaluate": "ran",
    }


def test_stage_refuses_to_run_before_its_inputs(project: Path) -> None:
    lonely = spec(project, learningRate="5e-4")
    lonely["generate"]["maxNewTokens"] = 3  # a generate nobody has run yet
    out = distill(
        "stage", "train", "--config", str(write(project, "lonely.yaml", lonely)), cwd=project
    )
    assert out.returncode == 3
    assert "inputs not complete yet: generate" in out.stderr
    unknown = distill(
        "stage", "distil", "--config", str(write(project, "x.yaml", spec(project))), cwd=project
    )
    assert unknown.returncode == 2
    assert "no stage 'distil'" in unknown.stderr
