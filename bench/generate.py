"""Generation benchmark: batched generation vs one prompt at a time, same model, same prompts;
and the generate stage as ``distill run`` runs it against that batched in-process figure.

The teacher is a small Llama-style model made here (no downloads); greedy decoding, so every
way produces the same tokens (checked). Prints a table and, last, one line of JSON whose
``speedup`` is batched tokens/s over one-at-a-time tokens/s, ``stage_vs_in_process`` the
stage's tokens/s (``stages.generate.run``: its own generator, every core) over plain batched
HF ``generate`` in this process, and ``ray_data_two_actors_vs_in_process`` the same for the way
the stage spreads over several actors (``actors=2``: Ray Data, one CPU each).

    python bench/generate.py            # 256 prompts, batch 64
    python bench/generate.py --quick    # 64 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    parameter_count,
    sample_examples,
)
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.spec import GenerateSpec

MODEL = ModelSize(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=4, max_positions=128)


def timed(
    model: object, tokenizer: object, prompts: list[str], batch: int, tokens: int
) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    records = generate(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=tokens, batch_size=batch)
    )
    return time.perf_counter() - started, [r.response_ids for r in records]


def stage_seconds(
    folder: Path, prompts: list[str], batch: int, tokens: int, actors: int
) -> tuple[float, list[list[int]]]:
    """The generate stage's own path (``stages.generate.run``) on the saved teacher: its
    seconds from choosing the backend to the last record (loading the teacher included, not
    writing the Parquet files) and its token ids."""
    import tempfile

    from distillation_runtime.records import read_parquet
    from distillation_runtime.stages.generate import PromptItem, run

    spec = GenerateSpec.model_validate(
        {"backend": "transformers", "maxNewTokens": tokens, "batchSize": batch}
    )
    items = [PromptItem(p, "train") for p in prompts]
    with tempfile.TemporaryDirectory() as out:
        result = run(str(folder), items, spec, Path(out), actors=actors)
        ids = [r.response_ids for r in read_parquet(result.train)]
    return result.seconds, ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count, batch, new_tokens = (64, 64, 32) if args.quick else (256, 64, 32)
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, MODEL, seed=0)
    # a model that never stops early, so both ways generate exactly new_tokens per prompt
    model.generation_config.eos_token_id = None
    prompts = [e.prompt for e in sample_examples("addition", count, seed=0)]
    timed(model, tokenizer, prompts[:4], 4, 4)  # warm-up
    one_seconds, one_ids = timed(model, tokenizer, prompts, 1, new_tokens)
    batch_seconds, batch_ids = timed(model, tokenizer, prompts, batch, new_tokens)
    import tempfile

    from distillation_runtime.demo import save_pretrained

    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, tokenizer, Path(folder))
        stage_s, stage_ids = stage_seconds(Path(folder), prompts, batch, new_tokens, actors=1)
        actor_s, actor_ids = stage_seconds(Path(folder), prompts, batch, new_tokens, actors=2)
    same = one_ids == batch_ids == stage_ids == actor_ids
    tokens = sum(len(ids) for ids in batch_ids)
    one_rate, batch_rate = tokens / one_seconds, tokens / batch_seconds
    stage_rate = sum(len(i) for i in stage_ids) / stage_s
    actor_rate = sum(len(i) for i in actor_ids) / actor_s
    size = parameter_count(model)
    print(f"model: {size:,} parameters; {count} prompts x {new_tokens} new tokens (greedy)")
    print(f"{'way':<16} {'seconds':>8} {'tokens/s':>10}")
    print(f"{'one at a time':<16} {one_seconds:>8.2f} {one_rate:>10.1f}")
    print(f"{f'batch of {batch}':<16} {batch_seconds:>8.2f} {batch_rate:>10.1f}")
    print(f"{'stage (1 gen.)':<16} {stage_s:>8.2f} {stage_rate:>10.1f}")
    print(f"{'stage, 2 actors':<16} {actor_s:>8.2f} {actor_rate:>10.1f}")
    print(f"speedup: {batch_rate / one_rate:.1f}x; identical tokens: {same}")
    print(
        f"stage / in-process batched: {stage_rate / batch_rate:.2f}; "
        f"2 Ray Data actors / in-process: {actor_rate / batch_rate:.2f}"
    )
    summary = {
        "bench": "generate",
        "speedup": round(batch_rate / one_rate, 2),
        "one_at_a_time_tokens_per_s": round(one_rate, 1),
        "batched_tokens_per_s": round(batch_rate, 1),
        "stage_tokens_per_s": round(stage_rate, 1),
        "stage_vs_in_process": round(stage_rate / batch_rate, 2),
        "ray_data_two_actors_vs_in_process": round(actor_rate / batch_rate, 2),
        "identical_tokens": same,
        "prompts": count,
        "new_tokens": new_tokens,
        "batch_size": batch,
        "parameters": parameter_count(model),
        "cpus": os.cpu_count(),
        "gpu": None,
    }
    print(json.dumps(summary))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
