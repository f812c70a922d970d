"""Generation benchmark: batched generation vs one prompt at a time, same model, same prompts.

The teacher is a small Llama-style model made here (no downloads); greedy decoding, so both
ways produce the same tokens (checked). Prints a table and, last, one line of JSON whose
``speedup`` is batched tokens/s over one-at-a-time tokens/s.

    python bench/generate.py            # 256 prompts, batch 64
    python bench/generate.py --quick    # 64 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    parameter_count,
    sample_examples,
)
from distillation_runtime.generation import SamplingConfig, generate

MODEL = ModelSize(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=4, max_positions=128)


def timed(
    model: object, tokenizer: object, prompts: list[str], batch: int, tokens: int
) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    records = generate(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=tokens, batch_size=batch)
    )
    return time.perf_counter() - started, [r.response_ids for r in records]


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
    same = one_ids == batch_ids
    tokens = sum(len(ids) for ids in batch_ids)
    one_rate, batch_rate = tokens / one_seconds, tokens / batch_seconds
    size = parameter_count(model)
    print(f"model: {size:,} parameters; {count} prompts x {new_tokens} new tokens (greedy)")
    print(f"{'way':<16} {'seconds':>8} {'tokens/s':>10}")
    print(f"{'one at a time':<16} {one_seconds:>8.2f} {one_rate:>10.1f}")
    print(f"{f'batch of {batch}':<16} {batch_seconds:>8.2f} {batch_rate:>10.1f}")
    print(f"speedup: {batch_rate / one_rate:.1f}x; identical tokens: {same}")
    summary = {
        "bench": "generate",
        "speedup": round(batch_rate / one_rate, 2),
        "one_at_a_time_tokens_per_s": round(one_rate, 1),
        "batched_tokens_per_s": round(batch_rate, 1),
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
