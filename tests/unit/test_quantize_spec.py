"""The scheme search's spec and bookkeeping, without llm-compressor: the shorthand and the list
plan alike, what re-runs an attempt and what reuses it, the calibration rows, and what the
stage reports when no scheme held."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distillation_runtime.plan import make_plan
from distillation_runtime.records import Record, write_parquet
from distillation_runtime.spec import (
    PipelineSpec,
    QuantizeSpec,
    QuantScheme,
    SpecError,
    parse_model,
)
from distillation_runtime.stages.quantize import (
    UNQUANTIZED,
    Attempt,
    SearchJob,
    SearchResult,
    attempt_uri,
    attempts_root,
    calibration_rows,
    kept,
    metrics,
    report,
    spread,
    unquantized_uri,
)

BASE: dict[str, Any] = {
    "teacher": {"model": "hf://org/teacher"},
    "student": {"model": "hf://org/student"},
    "dataset": {"prompts": "s3://bucket/prompts.jsonl"},
    "output": "s3://bucket/out",
}


def plan_of(quantize: dict[str, Any], **spec: Any) -> Any:
    return make_plan(PipelineSpec.model_validate({**BASE, "quantize": quantize, **spec}))


def test_scheme_is_the_one_element_list() -> None:
    shorthand = QuantizeSpec.model_validate({"scheme": "W4A16"})
    listed = QuantizeSpec.model_validate({"schemes": ["W4A16"]})
    assert shorthand.candidates == listed.candidates == (QuantScheme.W4A16,)
    assert shorthand.min_retention == "0.97"
    # the same work, so the same artifact: writing it either way re-runs nothing
    assert plan_of({"scheme": "W4A16"}).artifact("quantize") == (
        plan_of({"schemes": ["W4A16"]}).artifact("quantize")
    )


def test_schemes_are_tried_in_the_order_written() -> None:
    spec = QuantizeSpec.model_validate({"schemes": ["W4A16", "W8A8", "FP8_DYNAMIC"]})
    assert [s.value for s in spec.candidates] == ["W4A16", "W8A8", "FP8_DYNAMIC"]
    assert spec.scheme is QuantScheme.W4A16  # the first tried (what the operator's checks read)
    other = plan_of({"schemes": ["W8A8", "W4A16"]}).artifact("quantize")
    assert other != plan_of({"schemes": ["W4A16", "W8A8"]}).artifact("quantize")


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        ({}, "spec.quantize: set exactly one of quantize.scheme (one scheme) or quantize.schemes"),
        ({"scheme": "W8A8", "schemes": ["W8A8"]}, "got both"),
        ({"schemes": ["W8A8", "W8A8"]}, "spec.quantize.schemes: each scheme may appear only once"),
        ({"schemes": []}, "spec.quantize.schemes: List should have at least 1 item"),
        ({"scheme": "W4A16", "minRetention": 0.97}, "spec.quantize.minRetention: must be a quoted"),
        ({"scheme": "W4A16", "gptq": {"actOrder": "group"}}, "'static' or 'off'"),
    ],
)
def test_bad_quantize_sections_name_the_field_and_what_is_allowed(
    quantize: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as err:
        parse_model(PipelineSpec, {**BASE, "quantize": quantize})
    assert message in str(err.value)


def search_job(**quantize: Any) -> SearchJob:
    return SearchJob(
        student="/models/student",
        student_id="train-aaaaaaaaaaaa",
        records_id="generate-bbbbbbbbbbbb",
        calibration="/data/train.parquet",
        eval_records="/data/eval.parquet",
        attempts="s3://bucket/out/quantize-attempts",
        quantize=QuantizeSpec.model_validate(
            {"schemes": ["W4A16", "W8A8", "FP8_DYNAMIC"], **quantize}
        ),
        max_seq_length=512,
    )


def uris(job: SearchJob) -> dict[str, str]:
    return {s.value: attempt_uri(job, s) for s in QuantScheme}


def test_a_new_threshold_or_order_reuses_every_attempt() -> None:
    """minRetention decides which attempt is served, never what an attempt is: raising it
    re-runs the stage but no quantisation."""
    base = uris(search_job())
    assert uris(search_job(minRetention="0.99")) == base
    assert uris(search_job(schemes=["FP8_DYNAMIC", "W4A16"])) | {"W8A8": base["W8A8"]} == base
    assert base["W4A16"].startswith("s3://bucket/out/quantize-attempts/W4A16-")
    assert unquantized_uri(search_job(minRetention="0.9")) == unquantized_uri(search_job())


def test_each_option_reruns_only_the_schemes_it_changes() -> None:
    base = uris(search_job())
    changed = {
        "calibrationSamples": (128, {"W4A16", "W8A8"}),  # FP8_DYNAMIC takes no calibration
        "gptq": ({"dampeningFrac": "0.1"}, {"W4A16", "W8A8"}),
        "w4a16Algorithm": ("AWQ", {"W4A16"}),
        "ignore": (["lm_head", "model.layers.0.mlp.down_proj"], {"W4A16", "W8A8", "FP8_DYNAMIC"}),
    }
    for option, (value, schemes) in changed.items():
        after = uris(search_job(**{option: value}))
        moved = {s for s in base if after[s] != base[s]}
        assert moved == schemes, option


def test_attempts_live_beside_the_stage_artifacts() -> None:
    assert attempts_root("s3://b/out/quantize-0123456789ab") == "s3://b/out/quantize-attempts"
    assert attempts_root("./out/quantize-0123456789ab/") == "./out/quantize-attempts"


def test_kept_is_relative_to_the_unquantised_student() -> None:
    assert kept("tokenF1", 0.45, 0.5) == pytest.approx(0.9)
    assert kept("perplexity", 4.0, 3.0) == pytest.approx(0.75)  # lower is better
    assert kept("tokenF1", 0.0, 0.0) == 1.0  # nothing to lose


def test_spread_samples_evenly() -> None:
    assert spread(10, 3) == [0, 3, 6]
    assert spread(3, 5) == [0, 1, 2]


def test_calibration_takes_distinct_prompts_first_then_more_answers(tmp_path: Path) -> None:
    """Four answers to each of five prompts, as samplesPerPrompt 4 writes them: three rows are
    three prompts (not three answers to the first), seven rows are every prompt first."""
    records = [Record(f"p{p}", f"a{a}", [p], [10 + a, 2]) for p in range(5) for a in range(4)]
    write_parquet(records, tmp_path / "train.parquet")
    three = calibration_rows(str(tmp_path / "train.parquet"), 3, 64)
    assert sorted({row["input_ids"][0] for row in three}) == [0, 1, 3]
    seven = calibration_rows(str(tmp_path / "train.parquet"), 7, 64)
    assert {row["input_ids"][0] for row in seven} == {0, 1, 2, 3, 4}
    short = calibration_rows(str(tmp_path / "train.parquet"), 2, 2)
    assert all(len(row["input_ids"]) == 2 == sum(row["attention_mask"]) for row in short)


def tried(scheme: str, value: float, held: bool) -> Attempt:
    result = {
        "scheme": scheme,
        "format": "pack-quantized",
        "min_compute_capability": "8.0",
        "ignored": ["lm_head"],
        "size_bytes_before": 1000,
        "size_bytes_after": 250,
        "calibration_samples": 512,
        "seconds": 3.0,
        "group_size": 128,
        "algorithm": "GPTQ",
    }
    return Attempt(
        scheme,
        f"s3://b/out/quantize-attempts/{scheme}-x",
        0.4,
        value,
        held,
        250,
        3.0,
        False,
        result=result,
    )


def test_when_no_scheme_holds_the_unquantised_student_is_what_the_stage_reports() -> None:
    result = SearchResult("tokenF1", 0.97, 0.5, 1000, [tried("W4A16", 0.6, False)], None)
    found = metrics(result)
    assert found["scheme"] == UNQUANTIZED
    assert found["quantized"] is False
    assert found["minComputeCapability"] is None  # the operator then places no GPU class
    assert found["sizeBytesAfter"] == found["sizeBytesBefore"] == 1000
    assert found["compression"] == 1.0
    assert found["retention.W4A16"] == 0.6
    written = report(result)
    assert written["served"] == "unquantized"
    assert written["chosen"] is None
    assert [a["scheme"] for a in written["attempts"]] == ["W4A16"]


def test_the_chosen_scheme_is_what_the_stage_reports() -> None:
    chosen = tried("W4A16", 0.98, True)
    result = SearchResult("tokenF1", 0.97, 0.5, 1000, [chosen], chosen)
    found = metrics(result)
    assert (found["scheme"], found["quantized"], found["compression"]) == ("W4A16", True, 4.0)
    assert found["minComputeCapability"] == "8.0"
    assert report(result)["served"] == "W4A16"
