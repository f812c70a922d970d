"""Teacher answers with transformers: batched, left-padded, KV-cached, with top-k log-probs.

The log-probs are the teacher's own distribution (log-softmax of the raw logits at temperature
1, before any sampling processor), which is what offline logit distillation needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from distillation_runtime.records import Record


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode; temperature 0 is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_logprobs: int = 0
    batch_size: int = 32


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], config: SamplingConfig
) -> list[Record]:
    """One record per prompt, in order. Prompts are encoded without special tokens."""
    import torch

    model.eval()
    eos = tokenizer.eos_token_id
    records: list[Record] = []
    for chunk in _batches(prompts, config.batch_size):
        tokenizer.padding_side = "left"
        encoded = tokenizer(
            list(chunk), return_tensors="pt", padding=True, add_special_tokens=False
        )
        sampling = config.temperature > 0
        with torch.no_grad():
            out = model.generate(
                **encoded,
                max_new_tokens=config.max_new_tokens,
                do_sample=sampling,
                temperature=config.temperature if sampling else None,
                top_p=config.top_p if sampling else None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=config.top_logprobs > 0,
            )
        width = encoded["input_ids"].shape[1]
        generated = out.sequences[:, width:]
        if config.top_logprobs > 0:
            logprobs = torch.stack(out.logits, dim=1).float().log_softmax(dim=-1)
            top = logprobs.topk(config.top_logprobs, dim=-1)
        for row, prompt in enumerate(chunk):
            ids = generated[row].tolist()
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            prompt_ids = encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist()
            topk_ids = topk_logprobs = None
            if config.top_logprobs > 0:
                topk_ids = top.indices[row, : len(ids)].tolist()
                topk_logprobs = top.values[row, : len(ids)].tolist()
            records.append(
                Record(
                    prompt=prompt,
                    response=tokenizer.decode(ids, skip_special_tokens=True),
                    prompt_ids=prompt_ids,
                    response_ids=ids,
                    topk_ids=topk_ids,
                    topk_logprobs=topk_logprobs,
                )
            )
    return records
