"""Quality benchmark: does distillation beat training the same small student from scratch?

No downloads. It trains its own teacher (a small Llama-style model) on a built-in task with
exact answers, then trains same-size students, each for the same number of optimizer steps at
the same batch size (equal training compute):

- scratch:           on a small set of gold (human-labelled) examples;
- response KD:       on many workload prompts answered by the teacher (its text only);
- response+logit KD: the same, plus the teacher's top-k log-probs (offline logit distillation).

Prune then distil (Minitron): the teacher pruned to a smaller shape (the prune stage), then
distilled (response + logits); against a random-init model of exactly the same shape given the
same distillation budget. Quantised: that pruned-and-distilled student through the quantize
stage (FP8_DYNAMIC, W4A16 with the teacher's answers as calibration), reloaded and scored
against its unquantised self. The quantised figures need llm-compressor (the ``quantize``
extra; run in that environment, e.g. ``make venv-quantize``); without it they are null.

It reports exact match on held-out prompts, retention (student / teacher), the spread over
seeds, and compute. Nothing here is tuned towards a result: the settings are the defaults of
the spec unless the comment says otherwise.

    python bench/quality.py            # default size, 3 seeds (~10 min on 2 CPUs)
    python bench/quality.py --quick    # 1 seed, fewer steps (a few minutes)
    python bench/quality.py --task reversal

The last line is JSON with ``retention``, ``vs_scratch_points``, ``pruned_vs_random_points``,
``w4a16_retention`` and ``fp8_retention``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillation_runtime.demo import (
    TASKS,
    Example,
    ModelSize,
    exact_match,
    gold_records,
    make_model,
    make_tokenizer,
    parameter_count,
    sample_examples,
    save_pretrained,
    train_on_records,
)
from distillation_runtime.generation import SamplingConfig, generate

TEACHER = ModelSize(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2)
STUDENT = ModelSize(hidden=96, intermediate=224, layers=2, heads=4, kv_heads=2)  # <= 1/4
# The pruned student: W4A16 quantises in groups of 128 columns, so every width is below 128 or a
# multiple of it (hidden 96; MLP 256; attention 4 heads x 32).
PRUNED = {"hidden_size": 96, "intermediate_size": 256, "num_layers": 2}
HAVE_LLMCOMPRESSOR = importlib.util.find_spec("llmcompressor") is not None


@dataclass(frozen=True)
class Settings:
    task: str
    teacher_steps: int
    student_steps: int
    gold_examples: int  # what the scratch student (and the teacher) learn from
    workload_prompts: int  # unlabelled prompts the teacher answers
    held_out: int
    seeds: int
    batch: int = 32
    top_k: int = 8


# The teacher always trains longer than any student: a teacher that is itself undertrained says
# nothing about distillation.
QUICK = Settings("addition", 3000, 2000, 500, 3000, 200, 1)
DEFAULT = Settings("addition", 4000, 3000, 500, 6000, 300, 3)


def accuracy(model_dir: Path, held_out: list[Example]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = generate(
        model,
        tokenizer,
        [e.prompt for e in held_out],
        SamplingConfig(max_new_tokens=8, batch_size=128),
    )
    return exact_match([r.response for r in records], held_out)


@dataclass
class Teacher:
    """The trained teacher and the held-out examples no model trains on."""

    folder: Path
    accuracy: float
    params: int
    seconds: float
    held_out: list[Example]


def make_teacher(settings: Settings, root: Path) -> Teacher:
    """Train the teacher once on gold examples; students are compared against it."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    held_out = sample_examples(settings.task, settings.held_out, seed=10_000)
    taken = {e.prompt for e in held_out}
    gold = sample_examples(
        settings.task, settings.gold_examples + settings.workload_prompts, seed=0, exclude=taken
    )
    start = save_pretrained(
        make_model(tokenizer, TEACHER, seed=0), tokenizer, root / "teacher-init"
    )
    t0 = time.perf_counter()
    folder = train_on_records(
        gold_records(tokenizer, gold),
        start,
        root / "teacher",
        settings.teacher_steps,
        batch=settings.batch,
    )
    seconds = time.perf_counter() - t0
    params = parameter_count(AutoModelForCausalLM.from_pretrained(folder))
    return Teacher(folder, accuracy(folder, held_out), params, seconds, held_out)


def one_seed(settings: Settings, teacher: Teacher, seed: int, root: Path) -> dict[str, Any]:
    """Three same-size students from the same initial weights, equal steps, one seed."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    # Workload prompts may repeat what the teacher trained on (it learned from the same kind of
    # traffic); only the held-out prompts are never seen by any model.
    unseen = {e.prompt for e in teacher.held_out}
    gold = sample_examples(settings.task, settings.gold_examples, seed=100 + seed, exclude=unseen)
    workload = sample_examples(
        settings.task, settings.workload_prompts, seed=200 + seed, exclude=unseen
    )
    model = AutoModelForCausalLM.from_pretrained(teacher.folder)
    labelled = generate(
        model,
        tokenizer,
        [e.prompt for e in workload],
        SamplingConfig(max_new_tokens=8, top_logprobs=settings.top_k, batch_size=256),
    )
    student = make_model(tokenizer, STUDENT, seed + 1)
    start = save_pretrained(student, tokenizer, root / "student-init")
    results: dict[str, Any] = {"student_params": parameter_count(student)}
    for name, data, logits in (
        ("scratch", gold_records(tokenizer, gold), False),
        ("response", labelled, False),
        ("response+logits", labelled, True),
    ):
        t0 = time.perf_counter()
        folder = train_on_records(
            data,
            start,
            root / name,
            settings.student_steps,
            batch=settings.batch,
            logits=logits,
            seed=seed,
        )
        results[f"{name}_seconds"] = time.perf_counter() - t0
        results[name] = accuracy(folder, teacher.held_out)
    results.update(prune_then_distil(settings, teacher, seed, root, labelled, workload))
    return results


def prune_then_distil(
    settings: Settings,
    teacher: Teacher,
    seed: int,
    root: Path,
    labelled: list[Any],
    workload: list[Example],
) -> dict[str, Any]:
    """The teacher pruned (calibrated on workload prompts) vs a random init of the same shape,
    both distilled for the same steps; then the pruned student quantised."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distillation_runtime.records import write_parquet
    from distillation_runtime.stages.prune import MODEL_DIR, PruneJob
    from distillation_runtime.stages.prune import run as prune

    tokenizer = make_tokenizer()
    pruned = prune(
        PruneJob(
            teacher=str(teacher.folder),
            prompts=[e.prompt for e in workload[:256]],
            output=str(root / "pruned"),
            **PRUNED,
        )
    )
    config = AutoConfig.from_pretrained(root / "pruned" / MODEL_DIR)
    torch.manual_seed(seed + 1)
    random_init = AutoModelForCausalLM.from_config(config)
    random_start = save_pretrained(random_init, tokenizer, root / "random-init")
    out: dict[str, Any] = {"pruned_params": pruned.student_parameters}
    folders = {}
    for name, start in (("pruned", root / "pruned" / MODEL_DIR), ("random_init", random_start)):
        folders[name] = train_on_records(
            labelled,
            start,
            root / f"{name}-kd",
            settings.student_steps,
            batch=settings.batch,
            logits=True,
            seed=seed,
        )
        out[name] = accuracy(folders[name], teacher.held_out)
    if HAVE_LLMCOMPRESSOR:
        write_parquet(labelled[:128], root / "calibration.parquet")
        for scheme in ("FP8_DYNAMIC", "W4A16"):
            quantized = quantize(folders["pruned"], scheme, root / "calibration.parquet", root)
            out[scheme] = accuracy(quantized, teacher.held_out)
    return out


def quantize(model: Path, scheme: str, calibration: Path, root: Path) -> Path:
    """The quantize stage on ``model``; returns the compressed-tensors checkpoint's folder."""
    from distillation_runtime.spec import QuantizeSpec
    from distillation_runtime.stages.quantize import MODEL_DIR, QuantizeJob, run

    output = root / f"quantized-{scheme}"
    spec = QuantizeSpec.model_validate({"scheme": scheme, "calibrationSamples": 128})
    run(
        QuantizeJob(
            model=str(model), output=str(output), quantize=spec, calibration=str(calibration)
        )
    )
    return output / MODEL_DIR


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:5.1f}%"
    return f"{100 * mean:5.1f}% ± {100 * statistics.stdev(values):4.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument(
        "--task", choices=sorted(TASKS), default="addition", help="built-in task (demo.TASKS)"
    )
    args = parser.parse_args()
    settings = dataclasses.replace(QUICK if args.quick else DEFAULT, task=args.task)
    seeds = args.seeds or settings.seeds
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_teacher(settings, Path(tmp))
        print(
            f"teacher: {teacher.accuracy:.3f} exact match, {teacher.seconds:.0f} s", file=sys.stderr
        )
        for seed in range(seeds):
            runs.append(one_seed(settings, teacher, seed, Path(tmp) / f"seed-{seed}"))
            runs[-1].update(teacher=teacher.accuracy, teacher_params=teacher.params)
            print(
                f"seed {seed}: {json.dumps({k: round(v, 3) for k, v in runs[-1].items()})}",
                file=sys.stderr,
            )
    names = ["teacher", "scratch", "response", "response+logits"]
    mean = {n: statistics.fmean(r[n] for r in runs) for n in names}
    best = max(("response", "response+logits"), key=lambda n: mean[n])
    print(f"\nTask: {settings.task}; held-out prompts: {settings.held_out}; seeds: {seeds}")
    print(
        f"Teacher {runs[0]['teacher_params']:,} parameters, {settings.teacher_steps} steps "
        f"({teacher.seconds:.0f} s); "
        f"students {runs[0]['student_params']:,} parameters "
        f"({runs[0]['student_params'] / runs[0]['teacher_params']:.2f}x), "
        f"{settings.student_steps} steps x batch {settings.batch} each (equal compute)."
    )
    print(f"{'model':<18} {'exact match':>16} {'retention':>10} {'train data':>28}")
    data = {
        "teacher": f"{settings.gold_examples + settings.workload_prompts} gold",
        "scratch": f"{settings.gold_examples} gold",
        "response": f"{settings.workload_prompts} teacher answers",
        "response+logits": f"{settings.workload_prompts} answers + top-{settings.top_k}",
    }
    for n in names:
        retention = mean[n] / mean["teacher"] if mean["teacher"] else 0.0
        print(f"{n:<18} {spread([r[n] for r in runs]):>16} {retention:>10.2f} {data[n]:>28}")
    extra = ["pruned", "random_init"] + (["FP8_DYNAMIC", "W4A16"] if HAVE_LLMCOMPRESSOR else [])
    mean.update({n: statistics.fmean(r[n] for r in runs) for n in extra})
    print(
        f"\nPrune then distil: {runs[0]['pruned_params']:,} parameters "
        f"({runs[0]['pruned_params'] / runs[0]['teacher_params']:.2f}x the teacher), "
        f"response+logits KD, {settings.student_steps} steps each."
    )
    start = {
        "pruned": "teacher pruned",
        "random_init": "random, same shape",
        "FP8_DYNAMIC": "pruned+KD, FP8",
        "W4A16": "pruned+KD, GPTQ int4",
    }
    for n in extra:
        retention = mean[n] / mean["teacher"] if mean["teacher"] else 0.0
        print(f"{n:<18} {spread([r[n] for r in runs]):>16} {retention:>10.2f} {start[n]:>28}")
    if not HAVE_LLMCOMPRESSOR:
        print("(quantised students: llm-compressor not installed; run in the quantize environment)")

    def kept(scheme: str) -> float | None:
        if not HAVE_LLMCOMPRESSOR or not mean["pruned"]:
            return None
        return round(mean[scheme] / mean["pruned"], 4)

    summary = {
        "task": settings.task,
        "seeds": seeds,
        "teacher_accuracy": round(mean["teacher"], 4),
        "scratch_accuracy": round(mean["scratch"], 4),
        "response_accuracy": round(mean["response"], 4),
        "response_logits_accuracy": round(mean["response+logits"], 4),
        "best_distilled": best,
        "retention": round(mean[best] / mean["teacher"], 4) if mean["teacher"] else 0.0,
        "vs_scratch_points": round(100 * (mean[best] - mean["scratch"]), 2),
        "logits_minus_response_points": round(
            100 * (mean["response+logits"] - mean["response"]), 2
        ),
        "pruned_accuracy": round(mean["pruned"], 4),
        "random_init_accuracy": round(mean["random_init"], 4),
        "pruned_vs_random_points": round(100 * (mean["pruned"] - mean["random_init"]), 2),
        "w4a16_retention": kept("W4A16"),
        "fp8_retention": kept("FP8_DYNAMIC"),
        "teacher_params": runs[0]["teacher_params"],
        "pruned_params": runs[0]["pruned_params"],
        "student_params": runs[0]["student_params"],
        "student_steps": settings.student_steps,
        "batch": settings.batch,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(),
        "gpu": None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
