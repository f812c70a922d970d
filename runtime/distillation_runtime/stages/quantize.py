"""The quantize stage: the trained student, compressed for serving with llm-compressor, by the
first scheme that keeps its quality.

Config in (``SearchJob``), one visible loop, artifacts out:

1. the unquantised student's score on the held-out prompts, on the gate's metric
   (``evaluate.gate_score``): the baseline every scheme is judged against;
2. for each scheme of ``quantize.schemes`` in order (most compressed first): quantise (``run``),
   score the result the same way, and keep it if it holds ``quantize.minRetention`` of the
   baseline; else try the next. Each attempt, and the baseline, is an artifact of its own,
   ``<output>/quantize-attempts/<scheme>-<key>/``, keyed by the student's and the records'
   artifacts and the options that change that scheme's checkpoint or its score (never by the
   threshold): a re-run, a retried RayJob or a raised minRetention reuses every finished one;
3. out: ``model/`` (the chosen checkpoint, or the unquantised student when no scheme held: what
   evaluate-quantized judges and the operator serves either way) and ``quantize.json`` (every
   attempt with what it kept, its size and seconds; the choice).

One quantisation (``QuantizeJob``, ``run``):

- the recipe for the scheme (``recipe``): FP8_DYNAMIC (per-channel FP8 weights, per-token dynamic
  FP8 activations; no calibration data), W4A16 (int4 weights in groups of 128: GPTQ, or AWQ's
  activation-aware scales with asymmetric int4), W8A8 (SmoothQuant, then GPTQ int8 weights with
  dynamic int8 activations); GPTQ's activation ordering and dampening come from the spec;
  ``lm_head`` is always left in full precision (the output layer is the most sensitive to
  rounding);
- calibration data (W4A16, W8A8): the generate stage's records, the workload's prompts with the
  teacher's answers (the text the student will see in production), spread over the file, each
  truncated at the length the student serves at;
- ``oneshot``, then ``save_pretrained(save_compressed=True)``: a compressed-tensors checkpoint,
  which vLLM loads without flags and transformers loads (decompressing) for evaluation; the
  report records the size on disk before and after and the minimum GPU compute capability the
  scheme needs, which the operator places the InferenceService by.

llm-compressor pins transformers, torch and compressed-tensors to versions vLLM does not accept:
this stage runs in its own environment (the ``quantize`` extra; its own image in the cluster).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillation_runtime.spec import (
    ActivationOrder,
    EvaluateSpec,
    QuantizeSpec,
    QuantScheme,
    W4A16Algorithm,
)
from distillation_runtime.stages.base import MODEL_DIR, StageContext, StageResult
from distillation_runtime.storage import folder_bytes

REPORT_FILE = "quantize.json"
ALWAYS_IGNORED = "lm_head"
ATTEMPTS_DIR = "quantize-attempts"
"""Folder beside the stage artifacts (``<output>/quantize-attempts/``) holding every attempt."""
ATTEMPT_FORMAT = 1
"""Version of an attempt's layout and of how it is scored: part of every attempt's key."""
UNQUANTIZED = "none"
"""The ``scheme`` metric when no scheme held: the unquantised student is served."""

MIN_COMPUTE_CAPABILITY: dict[QuantScheme, str] = {
    QuantScheme.FP8_DYNAMIC: "8.9",  # FP8 tensor cores: Ada Lovelace (L4, L40S), Hopper
    QuantScheme.W4A16: "8.0",  # vLLM's Marlin int4 kernels: Ampere (A100, A10) and newer
    QuantScheme.W8A8: "7.5",  # int8 tensor cores: Turing (T4) and newer
}
"""The lowest NVIDIA compute capability whose vLLM kernels run each scheme."""

CALIBRATED = frozenset({QuantScheme.W4A16, QuantScheme.W8A8})


class QuantizeUnavailableError(RuntimeError):
    """llm-compressor is not installed in this environment."""


class SchemeUnfitError(ValueError):
    """A scheme this student's shapes do not allow (the search tries the next one)."""


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
    """One quantisation: one scheme on one checkpoint (what each attempt of the search runs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Folder of the trained student checkpoint.")
    output: str = Field(description="Folder for the quantised checkpoint and its report.")
    quantize: QuantizeSpec
    scheme: QuantScheme | None = Field(
        default=None, description="The scheme to apply. Default: the spec's first."
    )
    calibration: str | None = Field(
        default=None,
        description="Parquet of generate-stage records (prompt + response tokens); needed by "
        "W4A16 and W8A8.",
    )
    max_seq_length: int = Field(default=512, ge=8)

    @property
    def applied(self) -> QuantScheme:
        return self.scheme or self.quantize.candidates[0]


@dataclass(frozen=True)
class QuantizeResult:
    """What one quantisation reports (also written to ``quantize.json``)."""

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
    algorithm: str | None = None
    """How the weights were rounded: GPTQ, AWQ, or None (FP8_DYNAMIC: round to nearest)."""

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
    raise SchemeUnfitError(
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


def algorithm(scheme: QuantScheme, spec: QuantizeSpec) -> str | None:
    """How ``scheme``'s weights are rounded under ``spec``."""
    if scheme is QuantScheme.W4A16:
        return spec.w4a16_algorithm.value
    return "GPTQ" if scheme is QuantScheme.W8A8 else None


def gptq_options(spec: QuantizeSpec) -> dict[str, Any]:
    """GPTQModifier's ``actorder`` and ``dampening_frac`` from the spec (``off`` is None)."""
    order = spec.gptq.act_order
    return {
        "actorder": None if order is ActivationOrder.OFF else order.value,
        "dampening_frac": float(spec.gptq.dampening_frac),
    }


def recipe(
    scheme: QuantScheme,
    ignore: list[str],
    group_size: int = 128,
    spec: QuantizeSpec | None = None,
) -> list[Any]:
    """llm-compressor modifiers for ``scheme`` (every Linear layer except ``ignore``), with the
    options of ``spec`` (its defaults when None)."""
    from llmcompressor.modifiers.quantization import (  # type: ignore[import-not-found, unused-ignore]
        GPTQModifier,
        QuantizationModifier,
    )
    from llmcompressor.modifiers.transform import (  # type: ignore[import-not-found, unused-ignore]
        AWQModifier,
        SmoothQuantModifier,
    )

    spec = spec or QuantizeSpec.model_validate({"scheme": scheme.value})
    if scheme is QuantScheme.FP8_DYNAMIC:
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)]
    if scheme is QuantScheme.W4A16:
        from compressed_tensors.quantization import (  # type: ignore[import-not-found, import-untyped, unused-ignore]
            QuantizationArgs,
            QuantizationScheme,
        )

        awq = spec.w4a16_algorithm is W4A16Algorithm.AWQ
        # llm-compressor's W4A16 preset (W4A16_ASYM for AWQ, as its AWQ recipes use) with the
        # group size the model's widths allow.
        weights = QuantizationArgs(
            num_bits=4,
            type="int",
            strategy="group",
            group_size=group_size,
            symmetric=not awq,
            dynamic=False,
        )
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
        if awq:
            return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)]
        return [GPTQModifier(config_groups=groups, ignore=ignore, **gptq_options(spec))]
    if scheme is QuantScheme.W8A8:
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore, **gptq_options(spec)),
        ]
    allowed = ", ".join(s.value for s in QuantScheme)
    raise ValueError(f"spec.quantize.scheme is {scheme!r}: allowed values are {allowed}")


AWQ_NEEDS_CUDA = (
    "spec.quantize.w4a16Algorithm is AWQ, but this llm-compressor's AWQModifier pins its cached "
    "activations in page-locked memory, which needs a CUDA GPU, and this process has none: give "
    "the quantize stage a GPU (placement.stages.quantize.gpus) or use w4a16Algorithm GPTQ"
)


@contextlib.contextmanager
def unpinned_awq(scheme: QuantScheme, spec: QuantizeSpec) -> Iterator[None]:
    """AWQ on a machine without CUDA: llm-compressor 0.14 pins its cached activations in
    page-locked memory before each grid search (to copy them to the GPU faster), which fails
    with "Found no NVIDIA driver" where there is no GPU to copy to. Without CUDA the pinning is
    skipped while the recipe runs (it changes no number); a version without that method is
    refused, naming the field, before any work."""
    import torch

    awq = scheme is QuantScheme.W4A16 and spec.w4a16_algorithm is W4A16Algorithm.AWQ
    if not awq or torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines import cache  # type: ignore[import-not-found, unused-ignore]

    pinning = getattr(getattr(cache, "IntermediatesCache", None), "pin_memory", None)
    if pinning is None:
        raise RuntimeError(AWQ_NEEDS_CUDA)
    cache.IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        cache.IntermediatesCache.pin_memory = pinning


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spaced evenly over ``range(count)`` (all of them when fewer)."""
    if wanted >= count:
        return list(range(count))
    return [i * count // wanted for i in range(wanted)]


def calibration_rows(path: str, samples: int, max_seq_length: int) -> list[dict[str, list[int]]]:
    """Token ids (prompt then the teacher's answer, truncated) of ``samples`` records spread
    over the file: one per distinct prompt first, so several answers to one prompt do not
    crowd out other prompts, and a file sorted by topic is sampled across its topics."""
    from distillation_runtime.records import read_parquet

    records = read_parquet(Path(path))
    first: dict[str, int] = {}
    for index, record in enumerate(records):
        first.setdefault(record.prompt, index)
    distinct = list(first.values())
    rest = sorted(set(range(len(records))) - set(distinct))
    chosen = [distinct[i] for i in spread(len(distinct), samples)]
    chosen += [rest[i] for i in spread(len(rest), samples - len(chosen))]
    rows = []
    for index in sorted(chosen):
        record = records[index]
        ids = [*record.prompt_ids, *record.response_ids][:max_seq_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def run(job: QuantizeJob) -> QuantizeResult:
    """Quantise the student with one scheme and write the artifact folder."""
    require_llmcompressor()
    from datasets import Dataset  # type: ignore[import-untyped, unused-ignore]
    from llmcompressor import oneshot  # type: ignore[import-not-found, unused-ignore]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    spec, scheme = job.quantize, job.applied
    output = Path(job.output)
    output.mkdir(parents=True, exist_ok=True)
    ignore = ignored_modules(spec)
    data: dict[str, Any] = {}
    rows: list[dict[str, list[int]]] = []
    if scheme in CALIBRATED:
        if job.calibration is None:
            raise ValueError(
                f"spec.quantize.scheme {scheme.value} calibrates on the generate stage's "
                "records, but none were given"
            )
        rows = calibration_rows(job.calibration, spec.calibration_samples, job.max_seq_length)
        data = {
            "dataset": Dataset.from_list(rows),
            "num_calibration_samples": len(rows),
            "max_seq_length": job.max_seq_length,
            "shuffle_calibration_samples": False,  # the rows are chosen: same rows, same result
        }

    model = AutoModelForCausalLM.from_pretrained(job.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    group_size = (
        int4_group_size(linear_widths(model, ignore)) if scheme is QuantScheme.W4A16 else None
    )
    with unpinned_awq(scheme, spec):
        oneshot(model=model, recipe=recipe(scheme, ignore, group_size or 128, spec), **data)
    model.save_pretrained(output / MODEL_DIR, save_compressed=True)
    tokenizer.save_pretrained(output / MODEL_DIR)

    config = json.loads((output / MODEL_DIR / "config.json").read_text())
    result = QuantizeResult(
        scheme=scheme.value,
        format=str(config.get("quantization_config", {}).get("format", "")),
        min_compute_capability=MIN_COMPUTE_CAPABILITY[scheme],
        ignored=ignore,
        size_bytes_before=folder_bytes(Path(job.model)),
        size_bytes_after=folder_bytes(output / MODEL_DIR),
        calibration_samples=len(rows),
        seconds=round(time.perf_counter() - started, 3),
        group_size=group_size,
        algorithm=algorithm(scheme, spec),
    )
    (output / REPORT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# The scheme search
# --------------------------------------------------------------------------------------------


class SearchJob(BaseModel):
    """The scheme search: what ``distill run`` and the RayJob both execute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(description="Folder of the unquantised student checkpoint.")
    student_id: str = Field(
        description="What names the student's weights (its artifact, content-addressed): part "
        "of every attempt's key."
    )
    records_id: str = Field(
        description="What names the calibration and held-out records (their artifact)."
    )
    calibration: str | None = Field(
        default=None, description="Parquet of the generate stage's training records."
    )
    eval_records: str = Field(description="Parquet of the teacher's answers on the eval split.")
    attempts: str = Field(description="Storage URI under which each attempt is an artifact.")
    quantize: QuantizeSpec
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    max_seq_length: int = Field(default=2048, ge=8)
    max_new_tokens: int = Field(default=512, ge=1)


@dataclass(frozen=True)
class Attempt:
    """One scheme tried: what it kept of the unquantised student's quality, and its cost."""

    scheme: str
    uri: str | None
    """Its artifact (None when it was skipped)."""
    score: float | None
    """Its score on the gate's metric."""
    kept: float | None
    """Its score relative to the unquantised student's (perplexity: theirs over its)."""
    held: bool
    size_bytes: int | None
    seconds: float
    """Quantising and scoring it, when it ran (the run that made it)."""
    reused: bool
    skipped: str | None = None
    """Why it could not be applied to this student (then the next scheme is tried)."""
    result: dict[str, Any] | None = None
    """Its ``QuantizeResult``, as data."""


@dataclass(frozen=True)
class SearchResult:
    """The search: the baseline, every attempt in order, and the one chosen (None: no scheme
    held, the unquantised student is served)."""

    metric: str
    min_retention: float
    unquantized_score: float
    unquantized_bytes: int
    attempts: list[Attempt] = field(default_factory=list)
    chosen: Attempt | None = None


def _key(data: dict[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def judge(job: SearchJob) -> dict[str, Any]:
    """What a score depends on besides the checkpoint: the records, the metric and decoding."""
    return {
        "format": ATTEMPT_FORMAT,
        "records": job.records_id,
        "metric": job.evaluate.gate.metric.value,
        "maxSamples": job.evaluate.max_samples,
        "maxNewTokens": job.max_new_tokens,
    }


def scheme_options(spec: QuantizeSpec, scheme: QuantScheme, max_seq_length: int) -> dict[str, Any]:
    """The options that change ``scheme``'s checkpoint (FP8_DYNAMIC takes no calibration, so a
    new sample count re-runs only the calibrated schemes)."""
    options: dict[str, Any] = {"scheme": scheme.value, "ignore": ignored_modules(spec)}
    if scheme in CALIBRATED:
        options["calibration"] = {"samples": spec.calibration_samples, "length": max_seq_length}
        options["algorithm"] = algorithm(scheme, spec)
    if options.get("algorithm") == "GPTQ":
        options["gptq"] = spec.gptq.model_dump(mode="json", by_alias=True)
    return options


def attempt_uri(job: SearchJob, scheme: QuantScheme) -> str:
    """``<attempts>/<scheme>-<key>``: keyed by the student, the records, the scheme's options
    and the scoring, never by the threshold."""
    options = scheme_options(job.quantize, scheme, job.max_seq_length)
    key = _key({"student": job.student_id, "judge": judge(job), "options": options})
    return f"{job.attempts.rstrip('/')}/{scheme.value}-{key}"


def unquantized_uri(job: SearchJob) -> str:
    return (
        f"{job.attempts.rstrip('/')}/unquantized-{_key({'student': job.student_id, **judge(job)})}"
    )


def kept(metric: str, score: float, unquantized: float) -> float:
    """``score`` relative to the unquantised student's; 1 when the unquantised student scores
    0 on a text metric (nothing to lose)."""
    from distillation_runtime.metrics import retention

    value = retention(metric, score, unquantized)
    return 1.0 if value is None else value


def _publish(
    uri: str,
    folder: Path,
    kind: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    started: datetime,
) -> None:
    from distillation_runtime.storage import make_manifest, write_artifact

    manifest = make_manifest(kind, config, {}, metrics, started, datetime.now(UTC))
    write_artifact(uri, folder, manifest)


def _stored_metrics(uri: str) -> dict[str, Any] | None:
    """The metrics of a finished attempt (None when there is none: it must run)."""
    from distillation_runtime.storage import artifact_complete, read_manifest

    if not artifact_complete(uri):
        return None
    return dict(read_manifest(uri).get("metrics", {}))


def unquantized_score(job: SearchJob, log: Callable[[str], None]) -> float:
    """The unquantised student's score on the gate's metric (reused when already measured)."""
    from distillation_runtime.records import read_parquet
    from distillation_runtime.stages.evaluate import gate_score
    from distillation_runtime.storage import staging_dir

    uri = unquantized_uri(job)
    stored = _stored_metrics(uri)
    if stored is not None:
        return float(stored["score"])
    started = datetime.now(UTC)
    records = read_parquet(Path(job.eval_records))
    score = gate_score(job.student, records, job.evaluate, job.max_new_tokens)
    log(f"quantize: the unquantised student scores {score:.4f} ({judge(job)['metric']})")
    with staging_dir() as folder:
        _publish(uri, folder, "quantize-unquantized", judge(job), {"score": score}, started)
    return score


def try_scheme(
    job: SearchJob, scheme: QuantScheme, baseline: float, log: Callable[[str], None]
) -> Attempt:
    """One attempt: reused when its artifact is complete, else quantised, scored and
    published; skipped (with the reason) when the scheme cannot apply to this student."""
    from distillation_runtime.records import read_parquet
    from distillation_runtime.stages.evaluate import gate_score
    from distillation_runtime.storage import staging_dir

    metric, threshold = job.evaluate.gate.metric.value, float(job.quantize.min_retention)
    uri = attempt_uri(job, scheme)
    stored = _stored_metrics(uri)
    reused = stored is not None
    if stored is None:
        started = datetime.now(UTC)
        with staging_dir() as folder:
            quantize = QuantizeJob(
                model=job.student,
                output=str(folder),
                quantize=job.quantize,
                scheme=scheme,
                calibration=job.calibration,
                max_seq_length=job.max_seq_length,
            )
            try:
                result = run(quantize)
            except SchemeUnfitError as err:
                log(f"quantize: {scheme.value} skipped: {err}")
                return Attempt(scheme.value, None, None, None, False, None, 0.0, False, str(err))
            records = read_parquet(Path(job.eval_records))
            score = gate_score(str(folder / MODEL_DIR), records, job.evaluate, job.max_new_tokens)
            seconds = (datetime.now(UTC) - started).total_seconds()
            stored = {"score": score, "seconds": round(seconds, 3), "result": asdict(result)}
            config = {"options": scheme_options(job.quantize, scheme, job.max_seq_length)}
            _publish(
                uri, folder, "quantize-attempt", config | {"judge": judge(job)}, stored, started
            )
    value = kept(metric, float(stored["score"]), baseline)
    attempt = Attempt(
        scheme=scheme.value,
        uri=uri,
        score=float(stored["score"]),
        kept=value,
        held=value >= threshold,
        size_bytes=int(stored["result"]["size_bytes_after"]),
        seconds=float(stored["seconds"]),
        reused=reused,
        result=dict(stored["result"]),
    )
    verdict = ">=" if attempt.held else "<"
    log(
        f"quantize: {scheme.value} keeps {value:.4f} of the unquantised student's {metric} "
        f"({verdict} {threshold}){' (reused)' if reused else ''}"
    )
    return attempt


def search(job: SearchJob, log: Callable[[str], None] = print) -> SearchResult:
    """Try the schemes in order; stop at the first that holds minRetention."""
    require_llmcompressor()
    baseline = unquantized_score(job, log)
    attempts: list[Attempt] = []
    chosen = None
    for scheme in job.quantize.candidates:
        attempt = try_scheme(job, scheme, baseline, log)
        attempts.append(attempt)
        if attempt.held:
            chosen = attempt
            break
    if chosen is None:
        log("quantize: no scheme held minRetention: the unquantised student is served")
    return SearchResult(
        metric=job.evaluate.gate.metric.value,
        min_retention=float(job.quantize.min_retention),
        unquantized_score=baseline,
        unquantized_bytes=folder_bytes(Path(job.student)),
        attempts=attempts,
        chosen=chosen,
    )


def attempts_root(artifact: str) -> str:
    """``<output>/quantize-attempts`` for the stage artifact ``<output>/quantize-<fp>``."""
    return f"{artifact.rstrip('/').rsplit('/', 1)[0]}/{ATTEMPTS_DIR}"


def served_model(result: SearchResult, student: Path, fetch: Callable[[str], Path]) -> Path:
    """The checkpoint the stage publishes as its ``model/``: the chosen attempt's, else the
    unquantised student's."""
    if result.chosen is None or result.chosen.uri is None:
        return student
    return fetch(result.chosen.uri) / MODEL_DIR


def report(result: SearchResult) -> dict[str, Any]:
    """``quantize.json``: every attempt and the choice, and the chosen checkpoint's details."""
    chosen = result.chosen
    return {
        "served": chosen.scheme if chosen is not None else "unquantized",
        "chosen": chosen.scheme if chosen is not None else None,
        "metric": result.metric,
        "min_retention": result.min_retention,
        "unquantized": {"score": result.unquantized_score, "size_bytes": result.unquantized_bytes},
        "attempts": [asdict(a) for a in result.attempts],
        **((chosen.result or {}) if chosen is not None else {}),
    }


def metrics(result: SearchResult) -> dict[str, Any]:
    """The stage's metrics (status.metrics reads the flat ones): the chosen scheme or ``none``,
    and what each scheme tried kept, weighed and took."""
    chosen = result.chosen.result if result.chosen is not None else None
    size_after = chosen["size_bytes_after"] if chosen else result.unquantized_bytes
    found: dict[str, Any] = {
        "scheme": chosen["scheme"] if chosen else UNQUANTIZED,
        "quantized": chosen is not None,
        "schemesTried": ",".join(a.scheme for a in result.attempts),
        "retentionMetric": result.metric,
        "minRetention": result.min_retention,
        "unquantizedScore": result.unquantized_score,
        "format": chosen["format"] if chosen else None,
        "minComputeCapability": chosen["min_compute_capability"] if chosen else None,
        "ignored": chosen["ignored"] if chosen else None,
        "sizeBytesBefore": result.unquantized_bytes,
        "sizeBytesAfter": size_after,
        "groupSize": chosen["group_size"] if chosen else None,
        "algorithm": chosen.get("algorithm") if chosen else None,
        "compression": round(result.unquantized_bytes / max(1, size_after), 3),
        "calibrationSamples": chosen["calibration_samples"] if chosen else 0,
    }
    for attempt in result.attempts:
        found[f"retention.{attempt.scheme}"] = attempt.kept
        found[f"sizeBytes.{attempt.scheme}"] = attempt.size_bytes
        found[f"seconds.{attempt.scheme}"] = attempt.seconds
        if attempt.skipped is not None:
            found[f"skipped.{attempt.scheme}"] = attempt.skipped
    return found


def execute(context: StageContext, folder: Path) -> StageResult:
    """The stage: search the schemes for the trained student, calibrated on the teacher's
    training records and judged on its held-out answers; publish the one served."""
    from distillation_runtime.stages.generate import EVAL_FILE, TRAIN_FILE

    spec = context.spec
    assert spec.quantize is not None
    train_uri, generate_uri = context.artifact("train"), context.artifact("generate")
    trained, generated = context.local(train_uri), context.local(generate_uri)
    job = SearchJob(
        student=str(trained / MODEL_DIR),
        student_id=train_uri.rstrip("/").rsplit("/", 1)[-1],
        records_id=generate_uri.rstrip("/").rsplit("/", 1)[-1],
        calibration=str(generated / TRAIN_FILE),
        eval_records=str(generated / EVAL_FILE),
        attempts=attempts_root(context.artifact(context.current)),
        quantize=spec.quantize,
        evaluate=spec.evaluate,
        max_seq_length=spec.quantize.calibration_max_seq_length or spec.train.max_seq_length,
        max_new_tokens=spec.generate.max_new_tokens,
    )
    result = search(job, context.log)
    shutil.copytree(served_model(result, trained / MODEL_DIR, context.local), folder / MODEL_DIR)
    (folder / REPORT_FILE).write_text(json.dumps(report(result), indent=2) + "\n")
    return StageResult(metrics(result), {"train": train_uri, "generate": generate_uri})
