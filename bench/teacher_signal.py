"""Teacher signal: bytes per response token of the generate stage's records, and what each
kind of signal teaches a student.

A Llama-style teacher with a 49,152-token vocabulary (SmolLM2's) made here, random weights (no
downloads: its top-k spread over the whole vocabulary, so the ids compress no better than a real
teacher's), its output layer scaled to a mean entropy of about 2 nats per token (printed),
answers prompts once with the top-64 log-probs kept; the same records cut to k = 8, 20 and 64
are written twice in this process: the way the stage wrote them before (int32 ids, float16
log-probs, Parquet's default snappy) and as ``records.write_parquet`` writes them now (uint16 ids
for a vocabulary up to 65,536, float16, zstd). Prints bytes/token for both and the ratio. The
same teacher's sampled signal (RS-KD: ``sampled_logprobs``, 16 and 64 draws per token, the
distinct ids stored with their shares) is written the current way too. DistillKit's budget
setting is ~114 B/token.

``--quality`` adds the other half: a teacher trained here (``bench/quality.py``'s teacher and
task), then same-size students trained for the same steps from the same records, with the
response loss plus forward KL at T = 1 from: nothing (response only), the top-8 and top-20
log-probs, 16 and 64 draws, and the live teacher's whole distribution (online; the task's
character vocabulary has 54 ids, so a top-64 is the whole distribution). Each is
scored on held-out prompts by exact match and by forward KL to the teacher over the whole
vocabulary (lower is better), per seed and as mean and spread.

    python bench/teacher_signal.py            # sizes: 128 prompts x 32 tokens
    python bench/teacher_signal.py --quick    # 32 prompts
    python bench/teacher_signal.py --quality --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distillation_runtime.demo import ModelSize, make_model, make_tokenizer, sample_examples
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.records import Record, write_parquet

VOCABULARY = 49_152
KS = (8, 20, 64)
DRAWS = (16, 64)
SHARPEN = 40.0
"""The random teacher's output layer times this: a mean entropy of about 2.3 nats per token
(printed) instead of a random model's ~10.8, so draws repeat the likely tokens as a trained
model's do."""
DISTILLKIT_BUDGET = 114


def write_before(records: Sequence[Record], path: Path) -> None:
    """The stage's former format: int32 ids, float16 log-probs, snappy (the baseline)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "prompt": pa.array([r.prompt for r in records], pa.string()),
        "response": pa.array([r.response for r in records], pa.string()),
        "prompt_ids": pa.array([r.prompt_ids for r in records], pa.list_(pa.int32())),
        "response_ids": pa.array([r.response_ids for r in records], pa.list_(pa.int32())),
        "topk_ids": pa.array([r.topk_ids for r in records], pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array(
            [r.topk_logprobs for r in records], pa.list_(pa.list_(pa.float16()))
        ),
    }
    pq.write_table(pa.table(columns), path)


def cut(records: Sequence[Record], k: int) -> list[Record]:
    """The same records with the top ``k`` of each token's log-probs."""
    return [
        dataclasses.replace(
            r,
            topk_ids=[row[:k] for row in r.topk_ids or []],
            topk_logprobs=[row[:k] for row in r.topk_logprobs or []],
        )
        for r in records
    ]


def bytes_per_token(records: Sequence[Record], folder: Path, name: str) -> float:
    """Size of the records as the generate stage writes them, per response token."""
    path = folder / f"{name}.parquet"
    write_parquet(records, path)
    return round(path.stat().st_size / sum(len(r.response_ids) for r in records), 1)


def mean_entropy(model: Any, records: Sequence[Record]) -> float:
    """The teacher's mean entropy (nats) over the response tokens it predicts."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            answer = slice(len(r.prompt_ids) - 1, ids.shape[1] - 1)
            logprobs = model(ids).logits[0, answer].float().log_softmax(-1)
            total += float(-(logprobs.exp() * logprobs).sum())
            count += logprobs.shape[0]
    return total / count


def sizes(quick: bool) -> dict[str, Any]:
    """Bytes per token of top-k (before and now) and of sampled draws, on a 49k vocabulary."""
    count = 32 if quick else 128
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, ModelSize(hidden=64, layers=2, heads=4, kv_heads=2), seed=0)
    model.resize_token_embeddings(VOCABULARY, mean_resizing=False)  # new rows: random init
    model.generation_config.eos_token_id = None  # every answer the full length
    with torch.no_grad():  # a random model's distribution is nearly uniform: sharpen it
        model.lm_head.weight.mul_(SHARPEN)
    prompts = [e.prompt for e in sample_examples("addition", count, seed=0)]
    records = generate(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=32, top_logprobs=max(KS))
    )
    tokens = sum(len(r.response_ids) for r in records)
    entropy = mean_entropy(model, records)
    rows: list[dict[str, Any]] = []
    sampled = {}
    with tempfile.TemporaryDirectory() as tmp:
        for draws in DRAWS:
            config = SamplingConfig(max_new_tokens=32, top_logprobs=draws, sampled_logprobs=True)
            drawn = generate(model, tokenizer, prompts, config)
            sampled[draws] = bytes_per_token(drawn, Path(tmp), f"sampled-{draws}")
        for k in KS:
            records_k = cut(records, k)
            before, after = Path(tmp) / f"before-{k}.parquet", Path(tmp) / f"after-{k}.parquet"
            write_before(records_k, before)
            write_parquet(records_k, after)
            rows.append(
                {
                    "k": k,
                    "before_bytes_per_token": round(before.stat().st_size / tokens, 1),
                    "after_bytes_per_token": round(after.stat().st_size / tokens, 1),
                }
            )
    print(
        f"vocabulary {VOCABULARY:,}; {count} prompts x 32 tokens = {tokens} response tokens; "
        f"the teacher's mean entropy {entropy:.2f} nats per token"
    )
    print(f"{'k':>3} {'before B/tok':>13} {'now B/tok':>10} {'now/before':>11}")
    for row in rows:
        ratio = row["after_bytes_per_token"] / row["before_bytes_per_token"]
        row["ratio"] = round(ratio, 2)
        print(
            f"{row['k']:>3} {row['before_bytes_per_token']:>13} "
            f"{row['after_bytes_per_token']:>10} {ratio:>11.2f}"
        )
    for draws, size in sampled.items():
        print(f"sampled, {draws} draws: {size} B/token")
    return {
        "vocabulary": VOCABULARY,
        "tokens": tokens,
        "teacher_entropy_nats": round(entropy, 3),
        "rows": rows,
        "sampled_bytes_per_token": {str(d): b for d, b in sampled.items()},
        "distillkit_budget_bytes_per_token": DISTILLKIT_BUDGET,
    }


# --------------------------------------------------------------------------------------------
# What each signal teaches
# --------------------------------------------------------------------------------------------

SIGNALS: dict[str, dict[str, Any] | None] = {
    "response only": None,
    "top-8": {"topK": 8},
    "top-20": {"topK": 20},
    "sampled-16": {"sparsity": "sampled"},
    "sampled-64": {"sparsity": "sampled"},
    "dense (online)": {"source": "online"},
}
"""The logit loss of each student (forward KL, T = 1, weight 1) beside the response loss."""


def signal_records(name: str, top: list[Record], drawn: dict[int, list[Record]]) -> list[Record]:
    """The records a student of ``name`` trains on (the same answers for every signal)."""
    if name.startswith("top-"):
        return cut(top, int(name.removeprefix("top-")))
    if name.startswith("sampled-"):
        return drawn[int(name.removeprefix("sampled-"))]
    return top


def one_seed(settings: Any, teacher: Any, seed: int, root: Path) -> dict[str, dict[str, float]]:
    """Every signal's student for one seed: same start, same answers, same steps."""
    from transformers import AutoModelForCausalLM

    from distillation_runtime.demo import exact_match, save_pretrained, train_on_records
    from distillation_runtime.stages.evaluate import teacher_kl

    quality = _quality_script()
    tokenizer = make_tokenizer()
    unseen = {e.prompt for e in teacher.held_out}
    workload = sample_examples(
        settings.task, settings.workload_prompts, seed=200 + seed, exclude=unseen
    )
    model = AutoModelForCausalLM.from_pretrained(teacher.folder)
    prompts = [e.prompt for e in workload]
    top = generate(model, tokenizer, prompts, SamplingConfig(8, top_logprobs=20, batch_size=256))
    drawn = {
        d: generate(
            model,
            tokenizer,
            prompts,
            SamplingConfig(8, top_logprobs=d, sampled_logprobs=True, batch_size=256, seed=seed),
        )
        for d in DRAWS
    }
    held_prompts = [e.prompt for e in teacher.held_out]
    held_answers = generate(model, tokenizer, held_prompts, SamplingConfig(8, batch_size=256))
    start = save_pretrained(
        make_model(tokenizer, quality.STUDENT, seed + 1), tokenizer, root / "student-init"
    )
    results = {}
    for name, logits in SIGNALS.items():
        section = None if logits is None else {"weight": "1.0", "temperature": "1.0"} | logits
        folder = train_on_records(
            signal_records(name, top, drawn),
            start,
            root / name.replace(" ", "-").replace("(", "").replace(")", ""),
            settings.student_steps,
            batch=settings.batch,
            logits=section or False,
            teacher=teacher.folder if logits and logits.get("source") == "online" else None,
            seed=seed,
        )
        student = AutoModelForCausalLM.from_pretrained(folder)
        answers = generate(student, tokenizer, held_prompts, SamplingConfig(8, batch_size=256))
        results[name] = {
            "exact_match": exact_match([a.response for a in answers], teacher.held_out),
            "teacher_kl": teacher_kl(student, model, held_answers, batch_size=256),
        }
        print(f"seed {seed} {name}: {json.dumps(results[name])}", file=sys.stderr)
    return results


def _quality_script() -> Any:
    """bench/quality.py, whose teacher, task settings and student shape this reuses."""
    import importlib.util

    path = Path(__file__).with_name("quality.py")
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = module
    spec.loader.exec_module(module)
    return module


def quality(seeds: int, student_steps: int) -> dict[str, Any]:
    quality_bench = _quality_script()
    # DEFAULT's teacher (4000 steps; QUICK's 3000-step one reached 21% here)
    settings = dataclasses.replace(quality_bench.DEFAULT, student_steps=student_steps)
    per_seed: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = quality_bench.make_teacher(settings, Path(tmp))
        print(f"teacher: {teacher.accuracy:.3f} exact match", file=sys.stderr)
        for seed in range(seeds):
            per_seed.append(one_seed(settings, teacher, seed, Path(tmp) / f"seed-{seed}"))
    table = {}
    print(
        f"\n{settings.task}: teacher {teacher.accuracy:.3f} exact match; {seeds} seeds; "
        f"students {settings.student_steps} steps x batch {settings.batch}, response + forward "
        "KL at T = 1"
    )
    print(f"{'signal':<16} {'exact match':>18} {'KL to teacher':>18}")
    for name in SIGNALS:
        match = [run[name]["exact_match"] for run in per_seed]
        kl = [run[name]["teacher_kl"] for run in per_seed]
        table[name] = {"exact_match": match, "teacher_kl": kl}
        print(f"{name:<16} {spread(match, 3):>18} {spread(kl, 4):>18}")
    return {
        "task": settings.task,
        "teacher_exact_match": teacher.accuracy,
        "seeds": seeds,
        "student_steps": settings.student_steps,
        "signals": table,
    }


def spread(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quality", action="store_true", help="also train a student per signal")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--student-steps", type=int, default=1000)
    args = parser.parse_args()
    summary: dict[str, Any] = {"bench": "teacher_signal", **sizes(args.quick)}
    if args.quality:
        summary["quality"] = quality(args.seeds, args.student_steps)
    summary.update(cpus=os.cpu_count(), gpu=None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
