"""The preflight on real (tiny, and real-shaped) models: what it refuses, and that it refuses
before any other stage runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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
from distillation_runtime.pipeline import Runner
from distillation_runtime.plan import make_plan
from distillation_runtime.spec import PipelineSpec, SpecError
from distillation_runtime.stages.preflight import pruned_student_config
from distillation_runtime.storage import artifact_complete, read_manifest

DISTILL = Path(sys.executable).parent / "distill"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher (4 heads in 2 KV groups, 2 layers), a student of another width and another
    tokenizer, and prompts with an ``answer`` field."""
    root = tmp_path_factory.mktemp("preflight")
    tokenizer = make_tokenizer()
    save_pretrained(make_model(tokenizer, ModelSize(), seed=1), tokenizer, root / "teacher")
    other = make_tokenizer(alphabet="zyxwvutsrqponmlkjihgfedcba 0123456789+-*=:,.;|()[]")
    student = make_model(other, ModelSize(hidden=40, intermediate=80, layers=1), seed=2)
    save_pretrained(student, other, root / "student")
    with (root / "prompts.jsonl").open("w") as f:
        for e in sample_examples("addition", 20, seed=0):
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n")
    return root


def spec(root: Path, **sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "teacher": {"model": str(root / "teacher")},
        "student": {"model": str(root / "teacher")},
        "dataset": {"prompts": str(root / "prompts.jsonl"), "referenceField": "answer"},
        "generate": {"maxNewTokens": 4, "topLogprobs": 4},
        "train": {"losses": {"logits": {}}},
        "output": str(root / "out" / str(time.monotonic_ns())),
    }
    return base | sections


def refusal(data: dict[str, Any]) -> list[str]:
    """What ``distill run``'s runner refuses the spec for (it must refuse)."""
    with pytest.raises(SpecError) as refused:
        Runner(PipelineSpec.model_validate(data), log=lambda _: None).run()
    return refused.value.problems


def preflight_problems(data: dict[str, Any]) -> list[str]:
    """The preflight's findings, from running that stage alone (specs with quantize: this
    environment has no llm-compressor, which ``distill run`` checks first)."""
    runner = Runner(PipelineSpec.model_validate(data), log=lambda _: None)
    problems: list[str] = runner.run_stage(runner.plan["preflight"]).metrics["specProblems"]
    return problems


def test_every_problem_is_reported_at_once_naming_field_value_and_what_is_allowed(
    models: Path,
) -> None:
    data = spec(
        models,
        teacher={"model": str(models / "teacher"), "tensorParallelSize": 3},
        student={"model": str(models / "student")},
        dataset={"prompts": str(models / "prompts.jsonl"), "promptField": "question"},
        train={
            "losses": {
                "logits": {},
                "features": {"layerMap": [{"student": 5, "teacher": 1}]},
            }
        },
        quantize={"scheme": "W4A16"},
    )
    problems = preflight_problems(data)
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "train.losses.features.layerMap[0].student is 5 but the student has 1 layers" in text
    assert "teacher.tensorParallelSize is 3" in text
    assert "use one of 1, 2, 4" in text
    assert "quantize.scheme W4A16" in text
    assert "'model.layers.0.self_attn.q_proj': 40" in text
    assert "train.losses.logits with student.model" in text
    assert "tokenizers disagree" in text
    assert "field 'question' is missing (dataset.promptField is 'question')" in text


@pytest.mark.parametrize(
    ("prune", "expected"),
    [
        ({"numLayers": 5}, "student.prune.numLayers is 5 but the teacher's num_hidden_layers is 2"),
        ({"numAttentionHeads": 3}, "allowed values are 2, 4"),
        ({"hiddenSize": 30}, "hidden size 30 is not a multiple of the 4 attention heads"),
        ({"parameterBudget": 50_000_000}, "the teacher has only"),
    ],
)
def test_an_impossible_prune_target_is_refused_before_the_importance_pass(
    models: Path, prune: dict[str, Any], expected: str
) -> None:
    data = spec(models, student={"prune": prune})
    problems = refusal(data)
    (problem,) = problems
    assert expected in problem
    plan = make_plan(PipelineSpec.model_validate(data))
    assert artifact_complete(plan.artifact("preflight"))
    assert not artifact_complete(plan.artifact("prune"))  # nothing after it ran


def test_a_missing_reference_field_is_found_in_the_first_rows(models: Path) -> None:
    data = spec(models, dataset={"prompts": str(models / "prompts.jsonl"), "referenceField": "x"})
    (problem,) = refusal(data)
    assert "prompts.jsonl, line 1: field 'x' is missing (dataset.referenceField is 'x')" in problem


def test_chat_messages_need_a_chat_template(models: Path) -> None:
    data = spec(models, dataset={"prompts": str(models / "prompts.jsonl"), "messagesField": "m"})
    (problem,) = refusal(data)
    assert "the tokenizer has no chat template" in problem


def test_a_possible_spec_passes_and_records_what_it_checked(models: Path) -> None:
    data = spec(models, student={"prune": {"numLayers": 1}}, quantize={"scheme": "W4A16"})
    runner = Runner(PipelineSpec.model_validate(data), log=lambda _: None)
    outcome = runner.run_stage(runner.plan["preflight"])
    assert outcome.metrics["specProblems"] == []
    assert outcome.metrics["studentLayers"] == 1  # the pruned student's shape, not the teacher's
    manifest = read_manifest(runner.artifact("preflight"))
    assert manifest["metrics"]["checks"][0] == "prune"


def test_distill_run_stops_in_seconds_with_the_problems(models: Path, tmp_path: Path) -> None:
    data = spec(models, student={"prune": {"numLayers": 9}})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    done = subprocess.run([str(DISTILL), "run", str(spec_file)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "student.prune.numLayers is 9" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 120  # an interpreter, torch and two configs: no stage


def write_config_only(folder: Path, config: Any, tokenizer: Any) -> Path:
    """A checkpoint folder without weights (config and tokenizer): the preflight needs no more."""
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_budget_on_a_real_checkpoint_shape_gives_a_shape_transformers_accepts(
    tmp_path: Path,
) -> None:
    """The shape that crashed in save_pretrained: hidden 576, 9 query / 3 KV heads, 30 layers,
    vocabulary 49,152, tied embeddings. Checked from its config alone (no weights exist)."""
    from transformers import AutoConfig, LlamaConfig

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49_152,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    folder = write_config_only(tmp_path / "teacher", config, make_tokenizer())
    data = spec(tmp_path, student={"prune": {"parameterBudget": 70_000_000}})
    pipeline = PipelineSpec.model_validate(data)
    student, problems = pruned_student_config(pipeline, AutoConfig.from_pretrained(folder))
    assert problems == []
    assert student.hidden_size % student.num_attention_heads == 0
    assert student.hidden_size < 576
    assert student.num_attention_heads == 9
    AutoConfig.for_model(**student.to_dict())  # transformers' own validation accepts it
