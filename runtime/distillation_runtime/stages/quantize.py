"""The quantize stage: the trained student, compressed for serving with llm-compressor.

Config in (``QuantizeJob``), one pass, artifacts out:

1. the recipe for the scheme (``recipe``): FP8_DYNAMIC (per-channel FP8 weights, per-token
   dynamic FP8 activations; no calibration data), W4A16 (GPTQ int4 weights in groups of 128),
   W8A8 (SmoothQuant, then GPTQ int8 weights with dynamic int8 activations); ``lm_head`` is always
   left in full precision (the output layer is the most sensitive to rounding);
2. calibration data (W4A16, W8A8): the generate stage's prompt + response tokens, the text the
   student will see in production;
3. ``oneshot``, then ``save_pretrained(save_compressed=True)``: a compressed-tensors checkpoint,
   which vLLM loads without flags and transformers loads (decompressing) for evaluation;
4. out: ``model/`` and ``quantize.json``: the scheme, the size on disk before and after, and the
   minimum GPU compute capability the scheme needs, which the operator places the
   InferenceService by.

llm-compressor pins transformers, torch and compressed-tensors to versions vLLM does not accept:
this stage runs in its own environment (the ``quantize`` extra; its own image in the cluster).
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillation_runtime.spec import QuantizeSpec, QuantScheme
from distillation_runtime.stages.base import MODEL_DIR, StageContext, StageResult
from distillation_runtime.storage import folder_bytes

REPORT_FILE = "quantize.json"
ALWAYS_IGNORED = "lm_head"

MIN_COMPUTE_CAPABILITY: dict[QuantScheme, str] = {
    QuantScheme.FP8_DYNAMIC: "8.9",  # FP8 tensor cores: Ada Lovelace (L4, L40S), Hopper
    QuantScheme.W4A16: "8.0",  # vLLM's Marlin int4 kernels: Ampere (A100, A10) and newer
    QuantScheme.W8A8: "7.5",  # int8 tensor cores: Turing (T4) and newer
}
"""The lowest NVIDIA compute capability whose vLLM kernels run each scheme."""

CALIBRATED = frozenset({QuantScheme.W4A16, QuantScheme.W8A8})


class QuantizeUnavailableError(RuntimeError):
    """llm-compressor is not installed in this environment."""


def require_llmcompressor(what: str = "spec.quantize") -> None:
    """Refuse early, naming the extra to install, when llm-compressor is missing (found without
    importing it: the import alone takes seconds)."""
    if importlib.util.find_spec("llmcompressor") is None:
        raise QuantizeUnavailableError(
            f"{what} is set but llm-compressor is not installed in this environment. Install the "
            "`quantize` extra in its own environment (pip install 'distillation-operator"
            "[runtime,quantize]', or `make venv-quantize`) and run there; it cannot share an "
            "environment with the `vllm` extra. Or remove spec.quantize."
        )


class QuantizeJob(BaseModel):
    """One quantisation: what ``distill run`` and the RayJob both execute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Folder of the trained student checkpoint.")
    output: str = Field(description="Folder for the quantised checkpoint and its report.")
    quantize: QuantizeSpec
    calibration: str | None = Field(
        default=None,
        description="Parquet of generate-stage records (prompt + response tokens); needed by "
        "W4A16 and W8A8.",
    )
    max_seq_length: int = Field(default=512, ge=8)


@dataclass(frozen=True)
class QuantizeResult:
    """What the stage reports (also written to ``quantize.json``)."""

    scheme: str
    format: str
    min_compute_capability: str
    ignored: list[str]
    size_bytes_before: int
    size_bytes_after: int
    calibration_samples: int
    seconds: float
    group_size: int | None = None
    """W4A16's weight group size (None for the per-channel schemes)."""

    @property
    def compression(self) -> float:
        return self.size_bytes_before / max(1, self.size_bytes_after)


def ignored_modules(spec: QuantizeSpec) -> list[str]:
    """The spec's ignore list, with ``lm_head`` always in it."""
    return list(dict.fromkeys([ALWAYS_IGNORED, *spec.ignore]))


INT4_GROUP_SIZES = (128, 64, 32, 16)
"""W4A16 shares one scale per group of input columns: 128 (llm-compressor's preset, what vLLM's
Marlin kernels are tuned for) whenever every quantised layer's width allows it."""


def int4_group_size(in_features: dict[str, int]) -> int:
    """The largest group size that divides the input width of every quantised Linear layer.

    Real models (widths that are multiples of 128) get 128; small or pruned models whose widths
    are not get a smaller group instead of a crash deep inside GPTQ."""
    for size in INT4_GROUP_SIZES:
        if all(width % size == 0 for width in in_features.values()):
            return size
    odd = {name: width for name, width in in_features.items() if width % INT4_GROUP_SIZES[-1]}
    raise ValueError(
        f"spec.quantize.scheme W4A16 quantises weights in groups of {INT4_GROUP_SIZES[-1]} or more "
        f"input columns, but these layers' widths are not multiples of "
        f"{INT4_GROUP_SIZES[-1]}: {odd}; prune to multiples of 128 (student.prune) or use "
        "FP8_DYNAMIC / W8A8 (per-channel)"
    )


def linear_widths(model: Any, ignore: list[str]) -> dict[str, int]:
    """Input width of every Linear layer the recipe quantises (not the ignored ones)."""
    import torch

    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name not in ignore
        and name.rsplit(".", 1)[-1] not in ignore
    }


def recipe(scheme: QuantScheme, ignore: list[str], group_size: int = 128) -> list[Any]:
    """llm-compressor modifiers for ``scheme`` (every Linear layer except ``ignore``)."""
    from llmcompressor.modifiers.quantization import (  # type: ignore[import-not-found, unused-ignore]
        GPTQModifier,
        QuantizationModifier,
    )
    from llmcompressor.modifiers.transform import (  # type: ignore[import-not-found, unused-ignore]
        SmoothQuantModifier,
    )

    if scheme is QuantScheme.FP8_DYNAMIC:
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    if scheme is QuantScheme.W4A16:
        from compressed_tensors.quantization import (  # type: ignore[import-not-found, unused-ignore]
            QuantizationArgs,
            QuantizationScheme,
        )

        # llm-compressor's W4A16 preset with the group size the model's widths allow.
        weights = QuantizationArgs(
            num_bits=4,
            type="int",
            strategy="group",
            group_size=group_size,
            symmetric=True,
            dynamic=False,
        )
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
        return [GPTQModifier(config_groups=groups, ignore=ignore)]
    if scheme is QuantScheme.W8A8:
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore),
        ]
    allowed = ", ".join(s.value for s in QuantScheme)
    raise ValueError(f"spec.quantize.scheme is {scheme!r}: allowed values are {allowed}")


def calibration_rows(path: str, samples: int, max_seq_length: int) -> list[dict[str, list[int]]]:
    """Token ids of the first ``samples`` records (prompt then response), truncated."""
    from distillation_runtime.records import read_parquet

    rows = []
    for record in read_parquet(Path(path))[:samples]:
        ids = [*record.prompt_ids, *record.response_ids][:max_seq_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def run(job: QuantizeJob) -> QuantizeResult:
    """Quantise the student and write the artifact folder."""
    require_llmcompressor()
    from datasets import Dataset  # type: ignore[import-untyped, unused-ignore]
    from llmcompressor import oneshot  # type: ignore[import-not-found, unused-ignore]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    spec = job.quantize
    output = Path(job.output)
    output.mkdir(parents=True, exist_ok=True)
    ignore = ignored_modules(spec)
    data: dict[str, Any] = {}
    rows: list[dict[str, list[int]]] = []
    if spec.scheme in CALIBRATED:
        if job.calibration is None:
            raise ValueError(
                f"spec.quantize.scheme {spec.scheme.value} calibrates on the generate stage's "
                "records, but none were given"
            )
        rows = calibration_rows(job.calibration, spec.calibration_samples, job.max_seq_length)
        data = {
            "dataset": Dataset.from_list(rows),
            "num_calibration_samples": len(rows),
            "max_seq_length": job.max_seq_length,
        }

    model = AutoModelForCausalLM.from_pretrained(job.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    group_size = (
        int4_group_size(linear_widths(model, ignore)) if spec.scheme is QuantScheme.W4A16 else None
    )
    oneshot(model=model, recipe=recipe(spec.scheme, ignore, group_size or 128), **data)
    model.save_pretrained(output / MODEL_DIR, save_compressed=True)
    tokenizer.save_pretrained(output / MODEL_DIR)

    config = json.loads((output / MODEL_DIR / "config.json").read_text())
    result = QuantizeResult(
        scheme=spec.scheme.value,
        format=str(config.get("quantization_config", {}).get("format", "")),
        min_compute_capability=MIN_COMPUTE_CAPABILITY[spec.scheme],
        ignored=ignore,
        size_bytes_before=folder_bytes(Path(job.model)),
        size_bytes_after=folder_bytes(output / MODEL_DIR),
        calibration_samples=len(rows),
        seconds=round(time.perf_counter() - started, 3),
        group_size=group_size,
    )
    (output / REPORT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def execute(context: StageContext, folder: Path) -> StageResult:
    """The stage: quantise the trained student into ``folder``, calibrated on the teacher's
    training records."""
    from distillation_runtime.stages.generate import TRAIN_FILE

    spec = context.spec
    assert spec.quantize is not None
    trained = context.local(context.artifact("train"))
    generated = context.local(context.artifact("generate"))
    result = run(
        QuantizeJob(
            model=str(trained / MODEL_DIR),
            output=str(folder),
            quantize=spec.quantize,
            calibration=str(generated / TRAIN_FILE),
            max_seq_length=spec.train.max_seq_length,
        )
    )
    metrics = {
        "scheme": result.scheme,
        "format": result.format,
        "minComputeCapability": result.min_compute_capability,
        "ignored": result.ignored,
        "sizeBytesBefore": result.size_bytes_before,
        "sizeBytesAfter": result.size_bytes_after,
        "groupSize": result.group_size,
        "compression": round(result.compression, 3),
        "calibrationSamples": result.calibration_samples,
    }
    inputs = {"train": context.artifact("train"), "generate": context.artifact("generate")}
    return StageResult(metrics, inputs)
