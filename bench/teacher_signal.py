"""Teacher-signal size: bytes per response token of the generate stage's Parquet records.

A Llama-style teacher with a 49,152-token vocabulary (SmolLM2's) made here, random weights (no
downloads: its top-k spread over the whole vocabulary, so the ids compress no better than a real
teacher's), answers prompts once with the top-64 log-probs kept; the same records cut to k = 8,
20 and 64 are written twice in this process: the way the stage wrote them before (int32 ids,
float16 log-probs, Parquet's default snappy) and as ``records.write_parquet`` writes them now
(uint16 ids for a vocabulary up to 65,536, float16, zstd). Prints bytes/token for both and the
ratio, and last one JSON line. DistillKit's budget setting is ~114 B/token.

    python bench/teacher_signal.py            # 128 prompts x 32 tokens
    python bench/teacher_signal.py --quick    # 32 prompts
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from distillation_runtime.demo import ModelSize, make_model, make_tokenizer, sample_examples
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.records import Record, write_parquet

VOCABULARY = 49_152
KS = (8, 20, 64)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    count = 32 if args.quick else 128
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, ModelSize(hidden=64, layers=2, heads=4, kv_heads=2), seed=0)
    model.resize_token_embeddings(VOCABULARY, mean_resizing=False)  # new rows: random init
    model.generation_config.eos_token_id = None  # every answer the full length
    prompts = [e.prompt for e in sample_examples("addition", count, seed=0)]
    records = generate(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=32, top_logprobs=max(KS))
    )
    tokens = sum(len(r.response_ids) for r in records)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
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
    print(f"vocabulary {VOCABULARY:,}; {count} prompts x 32 tokens = {tokens} response tokens")
    print(f"{'k':>3} {'before B/tok':>13} {'now B/tok':>10} {'now/before':>11}")
    for row in rows:
        ratio = row["after_bytes_per_token"] / row["before_bytes_per_token"]
        row["ratio"] = round(ratio, 2)
        print(
            f"{row['k']:>3} {row['before_bytes_per_token']:>13} "
            f"{row['after_bytes_per_token']:>10} {ratio:>11.2f}"
        )
    summary = {
        "bench": "teacher_signal",
        "vocabulary": VOCABULARY,
        "tokens": tokens,
        "rows": rows,
        "distillkit_budget_bytes_per_token": DISTILLKIT_BUDGET,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
