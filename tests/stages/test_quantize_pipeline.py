"""`distill run` with student.prune and quantize: the whole recipe (prune -> generate -> train ->
evaluate -> quantize -> evaluate-quantized) on tiny models, reuse of the importance scores when
only the target changes, and the refusal where llm-compressor is missing."""

from __future__ import annotations

import importlib.util
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
from distillation_runtime.serve import Engine, GenerationRequest, ServeOptions
from distillation_runtime.spec import PipelineSpec
from distillation_runtime.stages import MODEL_DIR, STAGES
from distillation_runtime.storage import artifact_complete, read_manifest

DISTILL = Path(sys.executable).parent / "distill"
HAVE_LLMCOMPRESSOR = importlib.util.find_spec("llmcompressor") is not None


def distill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DISTILL), *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    tokenizer = make_tokenizer()
    teacher = ModelSize(hidden=64, intermediate=192, layers=3, heads=4, kv_heads=2)
    save_pretrained(make_model(tokenizer, teacher, seed=1), tokenizer, root / "teacher")
    with (root / "prompts.jsonl").open("w") as f:
        for e in sample_examples("addition", 32, seed=0):
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n")
    return root


def spec(root: Path, layers: int, output: str = "artifacts") -> dict[str, Any]:
    return {
        "teacher": {"model": str(root / "teacher")},
        "student": {"prune": {"numLayers": layers, "intermediateSize": 128}},
        "dataset": {
            "prompts": str(root / "prompts.jsonl"),
            "referenceField": "answer",
            "evalFraction": "0.25",
        },
        "generate": {"maxNewTokens": 4},
        "train": {"epochs": 1, "batchSize": 8, "learningRate": "1e-3"},
        "quantize": {"scheme": "FP8_DYNAMIC"},
        "evaluate": {"metrics": ["tokenF1"], "gate": {"minRetention": "0.01"}},
        "output": str(root / output),
    }


def write(root: Path, name: str, data: dict[str, Any]) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.quantize
def test_prune_distill_quantize_and_evaluate_the_quantised_student(project: Path) -> None:
    out = distill("run", str(write(project, "two.yaml", spec(project, 2))), cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = make_plan(PipelineSpec.model_validate(spec(project, 2)))
    assert plan.names == [s.name for s in STAGES]  # every stage of the table (order: test_plan)
    for stage in plan.stages:
        assert artifact_complete(plan.artifact(stage.name)), stage.name
    pruned = read_manifest(plan.artifact("prune"))["metrics"]
    assert pruned["student"]["layers"] == 2
    assert pruned["studentParameters"] < pruned["teacherParameters"]
    assert not pruned["importanceReused"]
    quantized = read_manifest(plan.artifact("quantize"))["metrics"]
    assert quantized["scheme"] == "FP8_DYNAMIC"
    assert quantized["minComputeCapability"] == "8.9"
    assert quantized["sizeBytesAfter"] < quantized["sizeBytesBefore"]
    evaluated = read_manifest(plan.artifact("evaluate-quantized"))
    assert evaluated["inputs"]["quantize"] == plan.artifact("quantize")
    report = json.loads(Path(plan.artifact("evaluate-quantized"), "report.json").read_text())
    assert report["lineage"]["quantize artifact"] == plan.artifact("quantize")
    # what `serve.gpus: 0` serves: `distill serve` loads the compressed-tensors checkpoint with
    # transformers (decompressed on the CPU, as evaluate-quantized loaded it) and answers
    engine = Engine.load(ServeOptions(model=str(Path(plan.artifact("quantize"), MODEL_DIR))), print)
    [answer] = engine.answer(GenerationRequest(prompts=("12+34=",), max_tokens=4, temperature=0))
    assert answer.response_ids

    # Another target for the same teacher and prompts: the scores are reused, no forward pass.
    again = distill("run", str(write(project, "one.yaml", spec(project, 1))), cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing importance scores" in again.stderr
    replan = make_plan(PipelineSpec.model_validate(spec(project, 1)))
    assert read_manifest(replan.artifact("prune"))["metrics"]["importanceReused"]


@pytest.mark.skipif(HAVE_LLMCOMPRESSOR, reason="checks the environment without llm-compressor")
def test_run_refuses_quantize_without_llmcompressor_before_any_stage(project: Path) -> None:
    data = spec(project, 2, output="refused")
    out = distill("run", str(write(project, "refused.yaml", data)), cwd=project)
    assert out.returncode != 0
    assert "llm-compressor is not installed" in out.stderr
    assert "`quantize` extra" in out.stderr
    assert not (project / "refused").exists()  # refused before the first stage ran


def safetensors_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))


@pytest.mark.quantize
def test_distill_run_serves_the_unquantised_student_when_no_scheme_holds_then_reuses(
    project: Path,
) -> None:
    """The scheme search in `distill run`: a bar no scheme reaches leaves the trained student as
    the stage's model (what evaluate-quantized judges and the operator serves), and a lower bar
    re-plans the stage without quantising again."""
    data = spec(project, 2)
    data["quantize"] = {"schemes": ["W4A16", "FP8_DYNAMIC"], "minRetention": "2"}
    out = distill("run", str(write(project, "search.yaml", data)), cwd=project)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = make_plan(PipelineSpec.model_validate(data))
    quantized = read_manifest(plan.artifact("quantize"))["metrics"]
    assert quantized["scheme"] == "none"
    assert quantized["quantized"] is False
    assert quantized["schemesTried"] == "W4A16,FP8_DYNAMIC"
    assert quantized["minComputeCapability"] is None
    served = Path(plan.artifact("quantize"), "model")
    trained = Path(plan.artifact("train"), "model")
    assert "quantization_config" not in json.loads((served / "config.json").read_text())
    assert safetensors_bytes(served) == safetensors_bytes(trained)
    report = json.loads(Path(plan.artifact("quantize"), "quantize.json").read_text())
    assert report["served"] == "unquantized"
    assert [a["scheme"] for a in report["attempts"]] == ["W4A16", "FP8_DYNAMIC"]
    judged = read_manifest(plan.artifact("evaluate-quantized"))["metrics"]
    unquantized = read_manifest(plan.artifact("evaluate"))["metrics"]
    assert judged["student.tokenF1"] == unquantized["student.tokenF1"]

    data["quantize"]["minRetention"] = "0.01"
    again = distill("run", str(write(project, "search-low.yaml", data)), cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "W4A16 keeps" in again.stderr
    assert "(reused)" in again.stderr
    assert "Quantizing" in out.stdout + out.stderr  # llm-compressor's log of its GPTQ pass...
    assert "Quantizing" not in again.stdout + again.stderr  # ...not there: the attempt reused
    replan = make_plan(PipelineSpec.model_validate(data))
    assert replan.artifact("quantize") != plan.artifact("quantize")
    chosen = read_manifest(replan.artifact("quantize"))["metrics"]
    assert chosen["scheme"] == "W4A16"
    assert chosen["minComputeCapability"] == "8.0"
    served = Path(replan.artifact("quantize"), "model")
    assert json.loads((served / "config.json").read_text())["quantization_config"]
