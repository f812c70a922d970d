"""GPU checks: the paths only a GPU runs, each ending in one PASS, FAIL or SKIP line.

Every model is made (and, where it must carry structure, trained) here: no downloads.

- ``vllm-generate``: the generate stage with ``backend: vllm`` against ``backend: transformers``
  on the same teacher and prompts (greedy): the same answers, and top-k log-probs within
  ``--logprob-tolerance`` of the transformers forward pass's.
- ``fsdp-nccl``: the train stage's FSDP2 path (bf16 compute, fp32 master weights and reduce,
  ``torch.distributed.checkpoint`` checkpoints, the gathered HF save) on NCCL, against ddp on the
  same GPU: every step's loss within ``--loss-tolerance`` (relative), the loss falls, and the saved
  model reloads. One GPU holds one NCCL rank, so it runs at world size 1, where the stage itself
  would keep ddp (nothing to shard): the check asks for fsdp explicitly.
- ``vllm-quantized``: a student trained here is quantised to W4A16 and FP8_DYNAMIC by the quantize
  stage, in the quantize environment (llm-compressor pins versions vLLM does not take: give its
  python with ``--quantize-python`` or ``DISTILL_QUANTIZE_PYTHON``), then loaded by vLLM, which
  must repeat at least ``--min-agreement`` of the unquantised student's greedy answer tokens on
  held-out prompts.

A check that cannot run here says why (no GPU, no vllm package, no quantize environment) and
counts as SKIP; the exit status is 1 when any check FAILs. ``--device cpu`` runs ``fsdp-nccl`` on
gloo instead (how the tests check this script without a GPU). Last line: JSON of every result.

    python bench/gpu_check.py
    DISTILL_QUANTIZE_PYTHON=~/.cache/distillation-operator/venv-quantize/bin/python \\
        python bench/gpu_check.py --only vllm-quantized
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHECKS = ("vllm-generate", "fsdp-nccl", "vllm-quantized")
QUANTIZED_SCHEMES = ("W4A16", "FP8_DYNAMIC")
HELD_OUT = 32
ANSWER_TOKENS = 8
STUDENT_WIDTHS = {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2}
"""Multiples of W4A16's group size (128): the students of the FSDP and quantised checks."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    outcome: str  # PASS, FAIL or SKIP
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.outcome} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Settings:
    device: str  # cuda or cpu
    logprob_tolerance: float
    loss_tolerance: float
    min_agreement: float
    quantize_python: str | None


# --------------------------------------------------------------------------------------------
# What each check needs, and how its figures are judged (pure)
# --------------------------------------------------------------------------------------------


def missing(
    check: str, device: str, cuda: bool, vllm: bool, quantize_python: str | None
) -> str | None:
    """Why ``check`` cannot run here; None when it can."""
    if device == "cpu" and check != "fsdp-nccl":
        return "runs on a GPU only (--device cpu runs fsdp-nccl alone, on gloo)"
    if device == "cuda" and not cuda:
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if check.startswith("vllm-") and not vllm:
        return "needs the vllm package (the project's vllm extra, or the runtime-vllm image)"
    if check == "vllm-quantized" and not quantize_python:
        return (
            "needs the quantize environment's python (--quantize-python or "
            "DISTILL_QUANTIZE_PYTHON; make venv-quantize builds it)"
        )
    return None


def judge_logprobs(
    identical: int, prompts: int, max_gap: float | None, tolerance: float
) -> tuple[bool, str]:
    """vLLM against transformers: every greedy answer the same, and the top-k log-probs of
    those answers within ``tolerance``."""
    if identical < prompts:
        return False, f"{prompts - identical} of {prompts} greedy answers differ"
    if max_gap is None:
        return False, "no top-k log-probs came back"
    if max_gap > tolerance:
        return False, f"top-k log-probs differ by up to {max_gap:.4f} (> {tolerance})"
    return True, f"{prompts} identical answers, top-k log-probs within {max_gap:.4f}"


def judge_losses(
    reference: list[float], sharded: list[float], tolerance: float
) -> tuple[bool, str]:
    """fsdp against ddp: the same number of steps, each loss within ``tolerance`` (relative),
    and learning (the last loss below the first)."""
    if not sharded or len(sharded) != len(reference):
        return False, f"fsdp ran {len(sharded)} steps, ddp {len(reference)}"
    gaps = [abs(s - r) / max(abs(r), 1e-12) for r, s in zip(reference, sharded, strict=True)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    if gaps[worst] > tolerance:
        return False, (
            f"step {worst + 1}: fsdp loss {sharded[worst]:.5f}, ddp {reference[worst]:.5f} "
            f"(relative gap {gaps[worst]:.4f} > {tolerance})"
        )
    if sharded[-1] >= sharded[0]:
        return False, f"the loss did not fall ({sharded[0]:.4f} -> {sharded[-1]:.4f})"
    return True, (
        f"{len(sharded)} steps, loss {sharded[0]:.4f} -> {sharded[-1]:.4f}, every step within "
        f"{gaps[worst]:.4f} of ddp"
    )


def judge_agreement(agreements: dict[str, float], minimum: float) -> tuple[bool, str]:
    """Each quantised student served by vLLM repeats at least ``minimum`` of the unquantised
    student's answer tokens."""
    shown = ", ".join(f"{scheme} {value:.3f}" for scheme, value in agreements.items())
    low = [scheme for scheme, value in agreements.items() if value < minimum]
    if low:
        return False, f"below {minimum} for {', '.join(low)} ({shown})"
    return True, f"agreement with the unquantised student: {shown}"


# --------------------------------------------------------------------------------------------
# Models and data made here
# --------------------------------------------------------------------------------------------


def tiny_teacher(folder: Path) -> Path:
    """An untrained Llama-style model: enough for comparing two engines on one model."""
    from distillation_runtime.demo import ModelSize, make_model, make_tokenizer, save_pretrained

    tokenizer = make_tokenizer()
    size = ModelSize(hidden=256, layers=4, heads=8, kv_heads=4)
    return save_pretrained(make_model(tokenizer, size, 0), tokenizer, folder)


def trained_student(root: Path, steps: int) -> tuple[Path, Path, list[str]]:
    """A Llama whose widths are multiples of W4A16's group size (128), trained on reversal so
    its choices carry structure; its records (calibration data) and held-out prompts."""
    from distillation_runtime.demo import (
        ModelSize,
        gold_records,
        make_model,
        make_tokenizer,
        sample_examples,
        save_pretrained,
        train_on_records,
    )
    from distillation_runtime.records import write_parquet

    tokenizer = make_tokenizer()
    size = ModelSize(**STUDENT_WIDTHS)
    start = save_pretrained(make_model(tokenizer, size, seed=0), tokenizer, root / "init")
    examples = sample_examples("reversal", 400, seed=0)
    records = gold_records(tokenizer, examples)
    write_parquet(records, root / "train.parquet")
    model = train_on_records(records, start, root / "training", steps)
    seen = {e.prompt for e in examples}
    held_out = [e.prompt for e in sample_examples("reversal", HELD_OUT, seed=1, exclude=seen)]
    return model, root / "train.parquet", held_out


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def check_vllm_generate(settings: Settings, root: Path) -> CheckResult:
    from distillation_runtime.demo import sample_examples
    from distillation_runtime.records import read_parquet
    from distillation_runtime.spec import GenerateSpec
    from distillation_runtime.stages.generate import PromptItem, run

    teacher = tiny_teacher(root / "teacher")
    items = [PromptItem(e.prompt, "train") for e in sample_examples("addition", 64, seed=0)]
    answers, seconds = {}, {}
    for backend in ("transformers", "vllm"):
        spec = GenerateSpec.model_validate(
            {"backend": backend, "maxNewTokens": 16, "topLogprobs": 5}
        )
        out = run(str(teacher), items, spec, root / backend)
        answers[backend], seconds[backend] = read_parquet(out.train), out.seconds
    hf, vl = answers["transformers"], answers["vllm"]
    identical = sum(a.response_ids == b.response_ids for a, b in zip(hf, vl, strict=True))
    gaps = [
        abs(x - y)
        for a, b in zip(hf, vl, strict=True)
        if a.response_ids == b.response_ids and a.topk_logprobs and b.topk_logprobs
        for ra, rb in zip(a.topk_logprobs, b.topk_logprobs, strict=True)
        for x, y in zip(ra, rb, strict=True)
    ]
    max_gap = max(gaps) if gaps else None
    passed, detail = judge_logprobs(identical, len(items), max_gap, settings.logprob_tolerance)
    figures = {
        "prompts": len(items),
        "identical_responses": identical,
        "max_logprob_gap": max_gap,
        "vllm_seconds": seconds["vllm"],
        "transformers_seconds": seconds["transformers"],
    }
    return CheckResult("vllm-generate", "PASS" if passed else "FAIL", detail, figures)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_losses(job: Any, *, sharded: bool, backend: str) -> list[float]:
    """One train-stage run of ``job`` in this process; fsdp inside a process group of one."""
    import torch.distributed as dist

    from distillation_runtime.spec import TrainStrategy
    from distillation_runtime.stages import train

    if not sharded:
        train.train_worker(job.model_dump(mode="json"))
    else:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
        keep = train.choose_strategy
        train.choose_strategy = lambda *_: TrainStrategy.FSDP
        try:
            train.train_worker(job.model_dump(mode="json"))
        finally:
            train.choose_strategy = keep
            dist.destroy_process_group()
    lines = (Path(job.output) / train.METRICS_FILE).read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    expected = "fsdp" if sharded else "ddp"
    if {p["strategy"] for p in parsed} != {expected}:
        raise RuntimeError(f"{job.output} recorded strategy {parsed[0]['strategy']}")
    return [float(p["loss"]) for p in parsed]


def check_fsdp(settings: Settings, root: Path) -> CheckResult:
    from transformers import AutoModelForCausalLM

    from distillation_runtime.demo import (
        ModelSize,
        gold_records,
        make_model,
        make_tokenizer,
        sample_examples,
        save_pretrained,
    )
    from distillation_runtime.records import write_parquet
    from distillation_runtime.spec import TrainSpec
    from distillation_runtime.stages.train import FINAL_MODEL, TrainJob

    tokenizer = make_tokenizer()
    size = ModelSize(**STUDENT_WIDTHS)
    student = save_pretrained(make_model(tokenizer, size, seed=0), tokenizer, root / "student")
    write_parquet(
        gold_records(tokenizer, sample_examples("addition", 128, seed=0)), root / "data.parquet"
    )
    spec = TrainSpec.model_validate(
        {
            "losses": {"response": "1.0"},
            "batchSize": 16,
            "learningRate": "3e-3",
            "warmupRatio": "0",
            "epochs": 2,
            "gradientCheckpointing": True,
        }
    )

    def job(name: str) -> TrainJob:
        return TrainJob(
            student=str(student),
            data=str(root / "data.parquet"),
            output=str(root / name),
            train=spec,
            checkpoint_every=4,
        )

    backend = "nccl" if settings.device == "cuda" else "gloo"
    reference = _train_losses(job("ddp"), sharded=False, backend=backend)
    sharded = _train_losses(job("fsdp"), sharded=True, backend=backend)
    passed, detail = judge_losses(reference, sharded, settings.loss_tolerance)
    saved = root / "fsdp" / FINAL_MODEL
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    if passed and sum(p.numel() for p in reloaded.parameters()) != sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(student).parameters()
    ):
        passed, detail = False, f"the model saved in {saved} has another parameter count"
    checkpoints = sorted(p.name for p in (root / "fsdp" / "checkpoints").glob("step-*"))
    figures = {
        "backend": backend,
        "ddp_losses": reference,
        "fsdp_losses": sharded,
        "checkpoints": checkpoints,
    }
    return CheckResult("fsdp-nccl", "PASS" if passed else "FAIL", f"{backend}: {detail}", figures)


def quantise_in_quantize_environment(
    python: str, model: Path, calibration: Path, scheme: str, output: Path
) -> None:
    """The quantize stage's own function, run by the quantize environment's python."""
    code = (
        "import sys\n"
        "from distillation_runtime.spec import QuantizeSpec\n"
        "from distillation_runtime.stages.quantize import QuantizeJob, run\n"
        "model, calibration, scheme, output = sys.argv[1:]\n"
        "spec = QuantizeSpec.model_validate({'scheme': scheme})\n"
        "run(QuantizeJob(model=model, output=output, quantize=spec, calibration=calibration,"
        " max_seq_length=32))\n"
    )
    subprocess.run(
        [python, "-c", code, str(model), str(calibration), scheme, str(output)], check=True
    )


def vllm_greedy_answer_ids(folder: Path, prompts: list[str], tokens: int) -> list[list[int]]:
    """Greedy answer tokens from vLLM, for prompts tokenised as the transformers path does
    (no special tokens), so both engines answer the very same ids."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(folder)
    requests = [
        {"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts
    ]
    llm = LLM(model=str(folder), gpu_memory_utilization=0.3, enforce_eager=True)
    try:
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=tokens))
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        del llm


def check_vllm_quantized(settings: Settings, root: Path) -> CheckResult:
    from distillation_runtime.generation import greedy_answer_ids
    from distillation_runtime.metrics import token_agreement
    from distillation_runtime.stages import MODEL_DIR

    assert settings.quantize_python is not None
    model, calibration, held_out = trained_student(root, steps=150)
    reference = greedy_answer_ids(model, held_out, ANSWER_TOKENS)
    agreements = {}
    for scheme in QUANTIZED_SCHEMES:
        output = root / scheme
        quantise_in_quantize_environment(
            settings.quantize_python, model, calibration, scheme, output
        )
        answers = vllm_greedy_answer_ids(output / MODEL_DIR, held_out, ANSWER_TOKENS)
        agreements[scheme] = token_agreement(answers, reference)
    passed, detail = judge_agreement(agreements, settings.min_agreement)
    return CheckResult(
        "vllm-quantized", "PASS" if passed else "FAIL", detail, {"agreement": agreements}
    )


RUNNERS: dict[str, Callable[[Settings, Path], CheckResult]] = {
    "vllm-generate": check_vllm_generate,
    "fsdp-nccl": check_fsdp,
    "vllm-quantized": check_vllm_quantized,
}


def run_check(name: str, settings: Settings, cuda: bool, vllm: bool) -> CheckResult:
    """One check in a folder of its own; an error in it is its FAIL line, not the end of the
    others."""
    why = missing(name, settings.device, cuda, vllm, settings.quantize_python)
    if why is not None:
        return CheckResult(name, "SKIP", why)
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
        try:
            return RUNNERS[name](settings, Path(tmp))
        except Exception as error:  # reported as the check's FAIL line, the others still run
            return CheckResult(name, "FAIL", f"{type(error).__name__}: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=CHECKS, help="run this check only")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--logprob-tolerance", type=float, default=0.05)
    parser.add_argument("--loss-tolerance", type=float, default=0.05)
    parser.add_argument("--min-agreement", type=float, default=0.9)
    parser.add_argument(
        "--quantize-python", default=os.environ.get("DISTILL_QUANTIZE_PYTHON") or None
    )
    args = parser.parse_args(argv)
    import torch

    settings = Settings(
        device=args.device,
        logprob_tolerance=args.logprob_tolerance,
        loss_tolerance=args.loss_tolerance,
        min_agreement=args.min_agreement,
        quantize_python=args.quantize_python,
    )
    cuda = torch.cuda.is_available()
    vllm = importlib.util.find_spec("vllm") is not None
    results = [run_check(name, settings, cuda, vllm) for name in args.only or CHECKS]
    for result in results:
        print(result.line(), flush=True)
    print(
        json.dumps(
            {
                "bench": "gpu_check",
                "gpu": torch.cuda.get_device_name(0) if cuda else None,
                "results": [asdict(r) for r in results],
            }
        )
    )
    return 1 if any(r.outcome == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
