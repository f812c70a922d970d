"""The quantize stage with the real llm-compressor on a tiny Llama trained here: compressed-tensors
checkpoints that reload with transformers and answer held-out prompts as the unquantised
student does, lm_head in full precision, sizes and the GPU class in the report.

llm-compressor lives in its own environment (the ``quantize`` extra): ``make test-quantize``
runs these tests there with ``DISTILL_REQUIRE_QUANTIZE=1``, which turns a skip into a failure
(conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from distillation_runtime.demo import (
    ModelSize,
    gold_records,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
    train_on_records,
)
from distillation_runtime.generation import greedy_answer_ids
from distillation_runtime.metrics import token_agreement
from distillation_runtime.records import write_parquet
from distillation_runtime.spec import QuantizeSpec
from distillation_runtime.stages.quantize import (
    MODEL_DIR,
    REPORT_FILE,
    QuantizeJob,
    QuantizeResult,
    run,
)

MIN_AGREEMENT = 0.95
"""Share of the unquantised student's held-out answer tokens each scheme must reproduce. Seen
here: 1.000 for FP8_DYNAMIC, W4A16 (group 128) and W8A8; a random model of the same shape
0.005, the student after 20 of its 150 steps 0.18."""
TASK = "reversal"
TRAIN_EXAMPLES = 400
TRAIN_STEPS = 150
HELD_OUT = 32
ANSWER_TOKENS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A tiny Llama whose widths are multiples of W4A16's production group size (128), trained
    on the reversal task until its weights carry structure (a random model's logits are so
    close that any rounding flips its choices: agreement would measure noise), its training
    records as calibration data in the generate stage's format, and held-out prompts."""
    root = tmp_path_factory.mktemp("quantize")
    tokenizer = make_tokenizer()
    size = ModelSize(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2)
    start = save_pretrained(make_model(tokenizer, size, seed=0), tokenizer, root / "init")
    examples = sample_examples(TASK, TRAIN_EXAMPLES, seed=0)
    records = gold_records(tokenizer, examples)
    write_parquet(records, root / "train.parquet")
    model = train_on_records(records, start, root / "training", TRAIN_STEPS)
    seen = {e.prompt for e in examples}
    held_out = [e.prompt for e in sample_examples(TASK, HELD_OUT, seed=1, exclude=seen)]
    return model, root / "train.parquet", held_out


@pytest.fixture(scope="module")
def student(trained: tuple[Path, Path, list[str]]) -> tuple[Path, Path]:
    """The trained student and its calibration records."""
    return trained[0], trained[1]


@pytest.fixture(scope="module")
def unquantised_answers(trained: tuple[Path, Path, list[str]]) -> list[list[int]]:
    return greedy_answer_ids(trained[0], trained[2], ANSWER_TOKENS, HELD_OUT)


def quantise(student: tuple[Path, Path], output: Path, spec: QuantizeSpec) -> QuantizeResult:
    """One quantisation of the test student, calibrated on its records at length 32."""
    model, calibration = student
    job = QuantizeJob(
        model=str(model),
        output=str(output),
        quantize=spec,
        calibration=str(calibration),
        max_seq_length=32,
    )
    return run(job)


def tensor_dtypes(folder: Path) -> dict[str, Any]:
    dtypes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                dtypes[key] = handle.get_slice(key).get_dtype()
    return dtypes


def reload_and_generate(folder: Path) -> tuple[Any, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(["12+34="], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    return model, [int(t) for t in out[0, ids["input_ids"].shape[1] :]]


@pytest.mark.quantize
@pytest.mark.parametrize(
    ("scheme", "fmt", "capability", "packed_key"),
    [
        ("FP8_DYNAMIC", "float-quantized", "8.9", "weight"),
        ("W4A16", "pack-quantized", "8.0", "weight_packed"),
        ("W8A8", "int-quantized", "7.5", "weight"),
    ],
)
def test_scheme_writes_a_compressed_tensors_checkpoint_that_answers_like_the_student(
    trained: tuple[Path, Path, list[str]],
    student: tuple[Path, Path],
    unquantised_answers: list[list[int]],
    tmp_path: Path,
    scheme: str,
    fmt: str,
    capability: str,
    packed_key: str,
) -> None:
    result = quantise(
        student, tmp_path, QuantizeSpec.model_validate({"scheme": scheme, "calibrationSamples": 16})
    )
    config = json.loads((tmp_path / MODEL_DIR / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["format"] == fmt == result.format
    assert "lm_head" in quantization["ignore"]
    assert result.min_compute_capability == capability
    assert result.calibration_samples == (0 if scheme == "FP8_DYNAMIC" else 16)
    assert result.size_bytes_after < result.size_bytes_before

    dtypes = tensor_dtypes(tmp_path / MODEL_DIR)
    assert dtypes["lm_head.weight"] == "F32"  # the output layer stays in full precision
    quantized = dtypes[f"model.layers.0.mlp.down_proj.{packed_key}"]
    assert quantized in {"F8_E4M3", "I32", "I8"}
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["scheme"] == scheme
    assert report["min_compute_capability"] == capability

    model, tokens = reload_and_generate(tmp_path / MODEL_DIR)
    assert len(tokens) >= 1
    assert model.lm_head.weight.dtype == torch.float32
    answers = greedy_answer_ids(tmp_path / MODEL_DIR, trained[2], ANSWER_TOKENS, HELD_OUT)
    agreement = token_agreement(answers, unquantised_answers)
    print(f"{scheme}: {agreement:.3f} of the unquantised student's held-out answer tokens")
    assert agreement >= MIN_AGREEMENT, agreement


@pytest.mark.quantize
def test_calibrated_scheme_without_records_names_the_field(
    student: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"spec\.quantize\.scheme W4A16 calibrates"):
        run(
            QuantizeJob(
                model=str(student[0]),
                output=str(tmp_path),
                quantize=QuantizeSpec.model_validate({"scheme": "W4A16"}),
            )
        )


@pytest.mark.quantize
def test_lm_head_stays_ignored_when_the_user_lists_other_modules(
    student: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = QuantizeSpec.model_validate(
        {"scheme": "FP8_DYNAMIC", "ignore": ["model.layers.0.mlp.down_proj"]}
    )
    result = run(QuantizeJob(model=str(student[0]), output=str(tmp_path), quantize=spec))
    assert result.ignored == ["lm_head", "model.layers.0.mlp.down_proj"]
    dtypes = tensor_dtypes(tmp_path / MODEL_DIR)
    assert dtypes["lm_head.weight"] == "F32"
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "F32"
    assert dtypes["model.layers.1.mlp.down_proj.weight"] == "F8_E4M3"


@pytest.mark.quantize
def test_w4a16_on_widths_that_are_not_multiples_of_128(tmp_path: Path) -> None:
    """A small pruned student (hidden 96): W4A16 picks a group size that divides every width
    instead of failing inside GPTQ, records it, and the checkpoint reloads and generates."""
    tokenizer = make_tokenizer()
    size = ModelSize(hidden=96, intermediate=256, layers=2, heads=4, kv_heads=2)
    folder = save_pretrained(make_model(tokenizer, size, seed=1), tokenizer, tmp_path / "student")
    write_parquet(
        gold_records(tokenizer, sample_examples("addition", 16, seed=1)), tmp_path / "train.parquet"
    )
    job = QuantizeJob(
        model=str(folder),
        output=str(tmp_path / "out"),
        quantize=QuantizeSpec(scheme="W4A16", calibration_samples=16),
        calibration=str(tmp_path / "train.parquet"),
    )
    result = run(job)
    assert result.group_size == 32
    config = json.loads((tmp_path / "out" / MODEL_DIR / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert next(iter(groups.values()))["weights"]["group_size"] == 32
    _, tokens = reload_and_generate(tmp_path / "out" / MODEL_DIR)
    assert len(tokens) == 4


def int4_weights(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / MODEL_DIR / "config.json").read_text())
    weights: dict[str, Any] = next(iter(config["quantization_config"]["config_groups"].values()))[
        "weights"
    ]
    return weights


@pytest.mark.quantize
@pytest.mark.parametrize(("order", "written"), [("static", "static"), ("off", None)])
def test_gptq_activation_order_and_dampening_reach_the_checkpoint(
    student: tuple[Path, Path], tmp_path: Path, order: str, written: str | None
) -> None:
    spec = QuantizeSpec.model_validate(
        {
            "scheme": "W4A16",
            "calibrationSamples": 16,
            "gptq": {"actOrder": order, "dampeningFrac": "0.1"},
        }
    )
    result = quantise(student, tmp_path, spec)
    assert result.algorithm == "GPTQ"
    weights = int4_weights(tmp_path)
    assert weights["actorder"] == written  # vLLM reads it: group needs its reordering kernels
    assert weights["symmetric"] is True
    _, tokens = reload_and_generate(tmp_path / MODEL_DIR)
    assert len(tokens) >= 1


@pytest.mark.quantize
def test_awq_writes_asymmetric_int4_with_zero_points_that_generates(
    student: tuple[Path, Path], tmp_path: Path
) -> None:
    """AWQ's scales, then asymmetric int4 (on this CPU without the page-locked pinning that
    llm-compressor 0.14 does for GPUs)."""
    spec = QuantizeSpec.model_validate(
        {"scheme": "W4A16", "calibrationSamples": 16, "w4a16Algorithm": "AWQ"}
    )
    result = quantise(student, tmp_path, spec)
    assert result.algorithm == "AWQ"
    assert result.format == "pack-quantized"
    assert int4_weights(tmp_path)["symmetric"] is False
    dtypes = tensor_dtypes(tmp_path / MODEL_DIR)
    assert "model.layers.0.mlp.down_proj.weight_zero_point" in dtypes
    assert dtypes["lm_head.weight"] == "F32"
    _, tokens = reload_and_generate(tmp_path / MODEL_DIR)
    assert len(tokens) >= 1
