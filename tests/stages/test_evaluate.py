"""The evaluate stage on tiny models: a copy of the teacher passes its gate, a stranger fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
)
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.records import Record, write_parquet
from distillation_runtime.spec import EvaluateSpec
from distillation_runtime.stages.evaluate import MODEL_CARD, REPORT_FILE, EvaluateJob, run


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(), seed=11)
    save_pretrained(teacher, tokenizer, root / "teacher")
    save_pretrained(
        make_model(tokenizer, ModelSize(hidden=32, layers=1), seed=12), tokenizer, root / "stranger"
    )
    examples = sample_examples("addition", 24, seed=4)
    answers = generate(
        teacher, tokenizer, [e.prompt for e in examples], SamplingConfig(max_new_tokens=5)
    )
    records = [
        Record(**{**vars(a), "reference": e.answer}) for a, e in zip(answers, examples, strict=True)
    ]
    write_parquet(answers, root / "eval.parquet")
    write_parquet(records, root / "eval-with-references.parquet")
    (root / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": i, "loss": 3.0 / i, "response": 2.0 / i}) + "\n"
            for i in range(1, 6)
        )
    )
    return root


def job(
    root: Path, student: str, out: str, records: str = "eval.parquet", **evaluate: object
) -> EvaluateJob:
    spec = {
        "metrics": ["tokenF1", "exactMatch", "perplexity"],
        "gate": {"metric": "tokenF1", "minRetention": "0.95"},
        **evaluate,
    }
    return EvaluateJob(
        student=str(root / student),
        teacher=str(root / "teacher"),
        records=str(root / records),
        output=str(root / out),
        evaluate=EvaluateSpec.model_validate(spec),
        max_new_tokens=5,
        train_metrics=str(root / "metrics.jsonl"),
        lineage={"teacher": "demo teacher", "student": student},
    )


def test_a_copy_of_the_teacher_keeps_everything_and_passes(models: Path) -> None:
    report = run(job(models, "teacher", "same"))
    assert report["retention"]["tokenF1"] == pytest.approx(1.0)
    assert report["retention"]["exactMatch"] == pytest.approx(1.0)
    assert report["retention"]["perplexity"] == pytest.approx(1.0, rel=1e-4)
    assert report["gate"]["passed"] is True
    out = models / "same"
    assert json.loads((out / REPORT_FILE).read_text())["gate"]["passed"] is True
    for picture in ("scores.png", "loss.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / MODEL_CARD).read_text()
    assert "PASSED the quality gate" in card
    assert "teacher's mistakes" in card
    # the cost beside the quality, measured on this hardware
    cost = report["cost"]
    assert cost["teacher"]["parameters"] == cost["student"]["parameters"] > 0  # the same model
    assert cost["ratio"]["parameters"] == pytest.approx(1.0)
    assert cost["student"]["tokens_per_second"] > 0
    assert "| parameters |" in card
    assert "| quality kept (tokenF1) | 1.00 | 1.00 | gate: 0.95 |" in card


def test_a_smaller_student_reports_what_it_saves(models: Path) -> None:
    report = run(job(models, "stranger", "stranger-cost"))
    cost = report["cost"]
    assert cost["ratio"]["parameters"] > 1.5  # hidden 64 x 2 layers over hidden 32 x 1 layer
    assert cost["ratio"]["size"] > 1.5
    assert cost["student"]["bytes_on_disk"] < cost["teacher"]["bytes_on_disk"]
    card = (models / "stranger-cost" / MODEL_CARD).read_text()
    assert f"{cost['ratio']['parameters']:.2f}x smaller" in card


def test_a_stranger_fails_the_gate_and_says_why(models: Path) -> None:
    report = run(job(models, "stranger", "stranger"))
    assert report["gate"]["passed"] is False
    assert report["retention"]["tokenF1"] < 0.95
    assert report["student"]["perplexity"] > report["teacher"]["perplexity"]
    assert "FAILED" in (models / "stranger" / MODEL_CARD).read_text()


def test_expected_answers_score_both_models(models: Path) -> None:
    report = run(
        job(models, "teacher", "references", records="eval-with-references.parquet", maxSamples=10)
    )
    assert report["reference"] == "dataset"
    assert report["samples"] == 10
    assert report["teacher"]["exactMatch"] == report["student"]["exactMatch"]  # the same model
    assert report["teacher"]["exactMatch"] < 1.0  # a random teacher does not know addition


def test_answer_checks_are_reported_for_both(models: Path) -> None:
    checks = {"pattern": "[0-9]*", "validJson": True}
    report = run(job(models, "teacher", "checks", checks=checks))
    for name in ("pattern", "validJson"):
        assert report["checks"][name]["teacher"] == report["checks"][name]["student"]
        assert 0.0 <= report["checks"][name]["teacher"] <= 1.0
