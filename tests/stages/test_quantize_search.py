"""The scheme search with the real llm-compressor on a tiny Llama: schemes tried in order until
one keeps minRetention of the unquantised student's quality, each attempt an artifact reused by
later searches, the unquantised student served when none holds, and a scheme the student's
shapes do not allow skipped for the next.

The held-out "teacher answers" are the unquantised student's own greedy answers, so the
unquantised student scores exactly 1 and a quantised one scores the share of answers it still
gives unchanged: what quantisation costs, measured the way the stage measures it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillation_runtime.demo import (
    ModelSize,
    gold_records,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
)
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.records import write_parquet
from distillation_runtime.spec import EvaluateSpec, QuantizeSpec
from distillation_runtime.stages.quantize import (
    MODEL_DIR,
    UNQUANTIZED,
    SearchJob,
    metrics,
    search,
    served_model,
)
from distillation_runtime.storage import artifact_complete

MAX_NEW_TOKENS = 6


def make_student(root: Path, size: ModelSize, seed: int) -> Path:
    """A tiny Llama, calibration records, and its own answers to held-out prompts."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, size, seed=seed)
    folder = save_pretrained(model, tokenizer, root / "student")
    write_parquet(
        gold_records(tokenizer, sample_examples("addition", 32, seed=0)), root / "train.parquet"
    )
    prompts = [e.prompt for e in sample_examples("addition", 24, seed=5)]
    answers = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS))
    write_parquet(answers, root / "eval.parquet")
    return folder


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    make_student(root, ModelSize(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2), 3)
    return root


def job(root: Path, out: Path, **quantize: object) -> SearchJob:
    return SearchJob(
        student=str(root / "student"),
        student_id="train-0123456789ab",
        records_id="generate-0123456789ab",
        calibration=str(root / "train.parquet"),
        eval_records=str(root / "eval.parquet"),
        attempts=str(out / "quantize-attempts"),
        quantize=QuantizeSpec.model_validate({"calibrationSamples": 16, **quantize}),
        evaluate=EvaluateSpec.model_validate({"metrics": ["tokenF1"]}),
        max_seq_length=32,
        max_new_tokens=MAX_NEW_TOKENS,
    )


def fetch(uri: str) -> Path:
    return Path(uri)


@pytest.mark.quantize
def test_the_first_scheme_that_holds_is_chosen_and_a_new_bar_reuses_every_attempt(
    student: Path, tmp_path: Path
) -> None:
    schemes = ["W4A16", "FP8_DYNAMIC"]
    lines: list[str] = []

    # A bar nothing can reach: both schemes tried, neither held, the unquantised student served.
    none = search(job(student, tmp_path, schemes=schemes, minRetention="2"), lines.append)
    assert none.unquantized_score == pytest.approx(1.0)  # its own answers
    assert [a.scheme for a in none.attempts] == schemes
    assert none.chosen is None
    w4a16, fp8 = none.attempts
    assert all(a.uri is not None and artifact_complete(a.uri) for a in none.attempts)
    assert w4a16.size_bytes is not None
    assert fp8.size_bytes is not None
    assert w4a16.size_bytes < fp8.size_bytes < none.unquantized_bytes  # 4 bits < 8 bits < 32
    assert w4a16.kept is not None
    assert fp8.kept is not None
    assert max(w4a16.kept, fp8.kept) < 2
    served = served_model(none, student / "student", fetch)
    assert served == student / "student"
    reported = metrics(none)
    assert reported["scheme"] == UNQUANTIZED
    assert reported["quantized"] is False
    assert reported["minComputeCapability"] is None  # no GPU class needed to serve it
    assert reported["compression"] == 1.0
    assert reported["schemesTried"] == "W4A16,FP8_DYNAMIC"
    assert reported["retention.W4A16"] == w4a16.kept

    # The worse scheme first, the bar at what the better one keeps: the first fails it, the
    # second holds; both reused (an attempt's key holds no position and no bar).
    worse, better = sorted(none.attempts, key=lambda a: a.kept or 0.0)
    assert worse.kept is not None
    assert better.kept is not None
    assert worse.kept < better.kept
    order = [worse.scheme, better.scheme]
    lines.clear()
    second = search(
        job(student, tmp_path, schemes=order, minRetention=str(better.kept)), lines.append
    )
    assert second.chosen is not None
    assert second.chosen.scheme == better.scheme
    assert [(a.scheme, a.held, a.reused) for a in second.attempts] == [
        (worse.scheme, False, True),
        (better.scheme, True, True),
    ]
    assert [line for line in lines if "keeps" in line and "reused" not in line] == []
    config = json.loads(
        (served_model(second, student / "student", fetch) / "config.json").read_text()
    )
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    expected = {"W4A16": "8.0", "FP8_DYNAMIC": "8.9"}[better.scheme]
    assert metrics(second)["minComputeCapability"] == expected

    # A bar the first scheme holds: the search stops there.
    first = search(job(student, tmp_path, schemes=order, minRetention=str(worse.kept)))
    assert [a.scheme for a in first.attempts] == [worse.scheme]
    assert first.chosen is not None
    assert first.chosen.scheme == worse.scheme


@pytest.mark.quantize
def test_a_calibration_change_reruns_only_the_calibrated_schemes(
    student: Path, tmp_path: Path
) -> None:
    schemes = ["W8A8", "FP8_DYNAMIC"]
    before = search(job(student, tmp_path, schemes=schemes, minRetention="2"))
    after = search(job(student, tmp_path, schemes=schemes, minRetention="2", calibrationSamples=8))
    assert [a.reused for a in after.attempts] == [False, True]  # FP8 takes no calibration
    assert after.attempts[0].uri != before.attempts[0].uri
    assert after.attempts[1].uri == before.attempts[1].uri
    assert after.attempts[0].result is not None
    assert after.attempts[0].result["calibration_samples"] == 8


@pytest.mark.quantize
def test_a_scheme_the_widths_do_not_allow_is_skipped_for_the_next(tmp_path: Path) -> None:
    """Hidden 72 is no multiple of 16, the smallest int4 group: W4A16 cannot apply, the search
    says why and goes on to FP8_DYNAMIC (per-channel, any width)."""
    make_student(tmp_path, ModelSize(hidden=72, intermediate=128, layers=1, heads=4, kv_heads=2), 1)
    lines: list[str] = []
    result = search(
        job(tmp_path, tmp_path / "out", schemes=["W4A16", "FP8_DYNAMIC"], minRetention="0.01"),
        lines.append,
    )
    skipped, fp8 = result.attempts
    assert skipped.skipped is not None
    assert "not multiples of 16" in skipped.skipped
    assert skipped.uri is None
    assert not skipped.held
    assert result.chosen is fp8
    assert fp8.scheme == "FP8_DYNAMIC"
    assert any("W4A16 skipped" in line for line in lines)
    assert metrics(result)["skipped.W4A16"] == skipped.skipped
    served = served_model(result, tmp_path / "student", fetch)
    assert served.name == MODEL_DIR
    assert served.parent == Path(str(fp8.uri))
