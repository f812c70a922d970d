"""The generate stage: the teacher answers the workload's prompts.

Config in, one pass, records out (``train.parquet`` and ``eval.parquet``, see ``records.py``):

- one generator in this process with every core or its GPU (the stage runs whole on a Ray
  worker node in a cluster, see ``raycluster``); with ``actors > 1``, Ray Data spreads the
  prompts over that many generator actors, each loading the teacher once;
- backend ``transformers`` (batched, left-padded, KV cache; ``generation.generate``) or ``vllm``
  (``vllm.LLM`` with ``SamplingParams(logprobs=k)``, tensor parallelism, prefix caching), chosen
  automatically: vLLM when it is importable and a GPU is there;
- every record keeps the teacher's top-k log-probs per response token (int32 ids, fp16 values)
  when ``generate.topLogprobs`` is set, for offline logit distillation.

The vLLM adapter is kept thin: ``sampling_kwargs`` builds the request and ``records_from_vllm``
reads vLLM's documented ``RequestOutput``/``CompletionOutput``/``Logprob`` objects; both are
plain functions tested without a GPU, and ``bench/gpu_check.py`` runs the real thing on one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillation_runtime.progress import ProgressWriter, progress_uri
from distillation_runtime.records import Record
from distillation_runtime.spec import GenerateBackend, GenerateSpec
from distillation_runtime.stages.base import StageContext, StageResult

TRAIN_FILE = "train.parquet"
EVAL_FILE = "eval.parquet"


@dataclass(frozen=True)
class PromptItem:
    """A prompt to answer, which side of the split it is on, and its expected answer if any."""

    text: str
    split: str  # "train" or "eval"
    reference: str | None = None


def choose_backend(
    requested: GenerateBackend, vllm_importable: bool, gpus: int, sampled_logprobs: bool = False
) -> str:
    """auto picks vLLM only where it can run: importable and at least one GPU, and not for
    sampled log-probs (vLLM returns only the most likely tokens, not the distribution to draw
    from)."""
    if requested is GenerateBackend.AUTO:
        runs_vllm = vllm_importable and gpus > 0 and not sampled_logprobs
        return "vllm" if runs_vllm else "transformers"
    if requested is GenerateBackend.VLLM and sampled_logprobs:
        raise RuntimeError(
            "generate.backend is vllm but train.losses.logits.sparsity is sampled: vLLM returns "
            "only the most likely tokens' log-probs; use backend: transformers or auto"
        )
    if requested is GenerateBackend.VLLM and not (vllm_importable and gpus > 0):
        raise RuntimeError(
            "generate.backend is vllm but vLLM needs the vllm package and a GPU "
            f"(importable: {vllm_importable}, GPUs: {gpus}); use backend: transformers or auto"
        )
    return requested.value


def sampling_kwargs(spec: GenerateSpec) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments for the spec (vLLM's names)."""
    return {
        "n": spec.samples_per_prompt,
        "temperature": float(spec.temperature),
        "top_p": float(spec.top_p),
        "max_tokens": spec.max_new_tokens,
        "stop": list(spec.stop) or None,
        "logprobs": spec.top_logprobs or None,
        "seed": spec.seed,
    }


def records_from_vllm(outputs: Sequence[Any], top_k: int) -> list[Record]:
    """Records from ``LLM.generate`` results.

    Each ``RequestOutput`` has ``prompt``, ``prompt_token_ids`` and ``outputs`` (one
    ``CompletionOutput`` per sample: ``text``, ``token_ids``, ``finish_reason`` and ``logprobs``,
    a list with one ``{token_id: Logprob(logprob, rank, decoded_token)}`` per generated token;
    it holds the top-k and the sampled token, so it can have k + 1 entries).
    """
    records = []
    for request in outputs:
        for completion in request.outputs:
            topk_ids = topk_logprobs = None
            if top_k and completion.logprobs is not None:
                topk_ids, topk_logprobs = [], []
                for position in completion.logprobs:
                    best = sorted(position.items(), key=lambda item: -item[1].logprob)[:top_k]
                    topk_ids.append([token for token, _ in best])
                    topk_logprobs.append([float(lp.logprob) for _, lp in best])
            records.append(
                Record(
                    prompt=request.prompt,
                    response=completion.text,
                    prompt_ids=list(request.prompt_token_ids),
                    response_ids=list(completion.token_ids),
                    topk_ids=topk_ids,
                    topk_logprobs=topk_logprobs,
                    finish_reason=completion.finish_reason,
                )
            )
    return records


class TransformersGenerator:
    """A Ray Data actor: loads the teacher once, answers batches of prompts."""

    def __init__(self, teacher: str, spec: dict[str, Any], sampled_logprobs: bool = False) -> None:
        from distillation_runtime.generation import SamplingConfig, load_for_inference

        self.model, self.tokenizer = load_for_inference(teacher)
        generate = GenerateSpec.model_validate(spec)
        self.config = SamplingConfig(
            max_new_tokens=generate.max_new_tokens,
            temperature=float(generate.temperature),
            top_p=float(generate.top_p),
            top_logprobs=generate.top_logprobs,
            sampled_logprobs=sampled_logprobs,
            batch_size=generate.batch_size,
            samples=generate.samples_per_prompt,
            stop=tuple(generate.stop),
            seed=generate.seed,
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from distillation_runtime.generation import generate

        prompts = list(batch["prompt"])
        records = generate(self.model, self.tokenizer, prompts, self.config)
        per_prompt = self.config.samples
        columns: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
        for i, record in enumerate(records):
            source = i // per_prompt
            row = {
                **vars(record),
                "split": batch["split"][source],
                "reference": batch["reference"][source],
            }
            for name in _COLUMNS:
                columns[name].append(row[name])
        return columns


_COLUMNS = (
    "prompt",
    "response",
    "prompt_ids",
    "response_ids",
    "topk_ids",
    "topk_logprobs",
    "reference",
    "finish_reason",
    "split",
)


@dataclass(frozen=True)
class GenerateResult:
    """What the stage wrote and how fast."""

    train: Path
    eval: Path
    records: int
    response_tokens: int
    seconds: float
    bytes_per_token: float
    backend: str


def run(
    teacher: str,
    prompts: Sequence[PromptItem],
    spec: GenerateSpec,
    output: Path,
    *,
    actors: int = 1,
    tensor_parallel_size: int = 1,
    progress: str | None = None,
    sampled_logprobs: bool = False,
) -> GenerateResult:
    """Answer every prompt; write ``train.parquet`` and ``eval.parquet`` under ``output``
    (and, when ``progress`` is a URI, how many records are done there while it runs).
    ``sampled_logprobs``: ``spec.top_logprobs`` draws per token instead of the top-k (RS-KD)."""
    import importlib.util

    import torch

    from distillation_runtime.records import write_parquet

    vllm_importable, gpus = importlib.util.find_spec("vllm") is not None, torch.cuda.device_count()
    backend = choose_backend(spec.backend, vllm_importable, gpus, sampled_logprobs)
    signal = "sampled" if sampled_logprobs else "top"
    print(
        f"generate: backend {backend} (asked {spec.backend.value}; vllm importable: "
        f"{vllm_importable}, GPUs here: {gpus}); teacher log-probs: {signal} "
        f"{spec.top_logprobs} per token",
        file=sys.stderr,
    )
    started = time.perf_counter()
    reported = ProgressWriter(
        progress, "generate", len(prompts) * spec.samples_per_prompt, "records"
    )
    reported.update(0)
    if backend == "vllm":
        rows = _generate_vllm(teacher, prompts, spec, tensor_parallel_size)
    elif actors == 1:
        rows = _generate_here(teacher, prompts, spec, reported, sampled_logprobs)
    else:
        rows = _generate_ray_data(teacher, prompts, spec, actors, reported, sampled_logprobs)
    reported.update(len(rows))
    seconds = time.perf_counter() - started
    by_split: dict[str, list[Record]] = {"train": [], "eval": []}
    for split, record in rows:
        by_split[split].append(record)
    output.mkdir(parents=True, exist_ok=True)
    write_parquet(by_split["train"], output / TRAIN_FILE)
    write_parquet(by_split["eval"], output / EVAL_FILE)
    tokens = sum(len(r.response_ids) for _, r in rows)
    size = (output / TRAIN_FILE).stat().st_size + (output / EVAL_FILE).stat().st_size
    return GenerateResult(
        train=output / TRAIN_FILE,
        eval=output / EVAL_FILE,
        records=len(rows),
        response_tokens=tokens,
        seconds=seconds,
        bytes_per_token=size / tokens if tokens else 0.0,
        backend=backend,
    )


def _generate_here(
    teacher: str,
    prompts: Sequence[PromptItem],
    spec: GenerateSpec,
    reported: ProgressWriter,
    sampled_logprobs: bool,
) -> list[tuple[str, Record]]:
    """One generator in this process, with every core (or this process's GPU): no Ray actor
    holding one CPU, and no actor to wait for inside a Ray task that already holds its node."""
    generator = TransformersGenerator(
        teacher, spec.model_dump(mode="json", by_alias=True), sampled_logprobs
    )
    rows: list[tuple[str, Record]] = []
    for start in range(0, len(prompts), spec.batch_size):
        chunk = prompts[start : start + spec.batch_size]
        columns = generator(
            {
                "prompt": [p.text for p in chunk],
                "split": [p.split for p in chunk],
                "reference": [p.reference for p in chunk],
            }
        )
        for i, split in enumerate(columns["split"]):
            fields = {name: columns[name][i] for name in _COLUMNS if name != "split"}
            rows.append((str(split), Record(**fields)))
        reported.update(len(rows))
    return rows


def _generate_ray_data(
    teacher: str,
    prompts: Sequence[PromptItem],
    spec: GenerateSpec,
    actors: int,
    reported: ProgressWriter | None = None,
    sampled_logprobs: bool = False,
) -> list[tuple[str, Record]]:
    import ray

    from distillation_runtime.raycluster import init_address

    if not ray.is_initialized():
        ray.init(address=init_address(), include_dashboard=False, log_to_driver=False)
    items = [{"prompt": p.text, "split": p.split, "reference": p.reference} for p in prompts]
    dataset = ray.data.from_items(items).map_batches(
        TransformersGenerator,
        fn_constructor_kwargs={
            "teacher": teacher,
            "spec": spec.model_dump(mode="json", by_alias=True),
            "sampled_logprobs": sampled_logprobs,
        },
        batch_size=spec.batch_size,
        concurrency=actors,
        batch_format="numpy",
    )
    order = {p.text: i for i, p in enumerate(prompts)}
    rows = []
    for row in dataset.iter_rows():
        fields = {name: _plain(row[name]) for name in _COLUMNS if name != "split"}
        for name in _TEXT_OR_MISSING:
            fields[name] = text_or_none(fields[name])
        record = Record(**fields)
        rows.append((str(row["split"]), record))
        if reported is not None:
            reported.update(len(rows))
    rows.sort(key=lambda pair: order[pair[1].prompt])  # stable: samples keep their order
    return rows


_TEXT_OR_MISSING = ("reference", "finish_reason")
"""Optional text columns: Ray Data may hand a column of missing values back as NaN floats."""


def text_or_none(value: Any) -> str | None:
    """A text value, or None for a missing one (None, or NaN after a trip through Ray Data)."""
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """numpy arrays and scalars from Ray Data back into plain Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _generate_vllm(
    teacher: str, prompts: Sequence[PromptItem], spec: GenerateSpec, tensor_parallel_size: int
) -> list[tuple[str, Record]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=teacher,
        tensor_parallel_size=tensor_parallel_size,
        enable_prefix_caching=True,
        seed=spec.seed,
    )
    outputs = llm.generate([p.text for p in prompts], SamplingParams(**sampling_kwargs(spec)))
    rows = []
    for prompt, output in zip(prompts, outputs, strict=True):
        for record in records_from_vllm([output], spec.top_logprobs):
            rows.append((prompt.split, Record(**{**vars(record), "reference": prompt.reference})))
    return rows


def execute(context: StageContext, folder: Path) -> StageResult:
    """The stage: load the workload's prompts, split them, let the teacher answer into
    ``folder``."""
    from transformers import AutoTokenizer

    from distillation_runtime.data import load_prompts

    spec = context.spec
    teacher = context.local(spec.teacher.model)
    prompts = load_prompts(spec.dataset, AutoTokenizer.from_pretrained(teacher))
    items = [PromptItem(p.text, "train", p.reference) for p in prompts.train]
    items += [PromptItem(p.text, "eval", p.reference) for p in prompts.eval]
    result = run(
        str(teacher),
        items,
        spec.generate,
        folder,
        tensor_parallel_size=spec.teacher.tensor_parallel_size,
        progress=progress_uri(context.artifact(context.current)),
        sampled_logprobs=spec.sampled_teacher_signal,
    )
    metrics = {
        "prompts": len(items),
        "trainPrompts": len(prompts.train),
        "evalPrompts": len(prompts.eval),
        "duplicatesDropped": prompts.duplicates,
        "records": result.records,
        "responseTokens": result.response_tokens,
        "tokensPerSecond": round(result.response_tokens / max(result.seconds, 1e-9), 2),
        "bytesPerToken": round(result.bytes_per_token, 2),
        "backend": result.backend,
        "teacherLogprobs": "sampled" if spec.sampled_teacher_signal else "topK",
    }
    return StageResult(metrics)
