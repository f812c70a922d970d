"""Teacher answers with transformers: batched, left-padded, KV-cached, with top-k log-probs.

The log-probs are the teacher's own distribution (log-softmax of the raw logits at temperature
1, before any sampling processor), which is what offline logit distillation needs.

Stop strings end a response: its text excludes the stop string, its token ids keep the tokens
that spelled it (so a student learns where to stop), and ``finish_reason`` says ``stop``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    samples: int = 1
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0


def load_for_inference(folder: str | Path) -> tuple[Any, Any]:
    """A model ready to answer, and its tokenizer: on this process's GPU when it has one (a Ray
    task on a GPU worker sees its own), in the checkpoint's dtype there; fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any
    if torch.cuda.is_available():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        model = model.to("cuda")
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def greedy_answer_ids(
    folder: str | Path, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[list[int]]:
    """The greedy answer tokens of the model saved in ``folder``, as the evaluate stage
    decodes them: what a quantised or re-served model is compared against."""
    model, tokenizer = load_for_inference(folder)
    config = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [answer.response_ids for answer in generate(model, tokenizer, prompts, config)]


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], config: SamplingConfig
) -> list[Record]:
    """``config.samples`` records per prompt, in prompt order. Prompts are encoded without
    special tokens (chat prompts are already rendered by the chat template)."""
    import torch

    model.eval()
    eos = tokenizer.eos_token_id
    sampling = config.temperature > 0
    if sampling:
        torch.manual_seed(config.seed)
    records: list[Record] = []
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    for chunk in _batches(prompts, config.batch_size):
        encoded = tokenizer(
            list(chunk), return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **encoded,
                max_new_tokens=config.max_new_tokens,
                do_sample=sampling,
                temperature=config.temperature if sampling else None,
                top_p=config.top_p if sampling else None,
                top_k=None,
                num_return_sequences=config.samples,
                stop_strings=list(config.stop) or None,
                tokenizer=tokenizer if config.stop else None,
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
        for row in range(generated.shape[0]):
            source = row // config.samples
            ids = generated[row].tolist()
            ended = eos in ids
            if ended:
                ids = ids[: ids.index(eos) + 1]
            else:  # drop padding after a stop string ended this row early
                while ids and ids[-1] == tokenizer.pad_token_id:
                    ids.pop()
            text, stopped = cut_at_stop(
                tokenizer.decode(ids, skip_special_tokens=True), config.stop
            )
            mask = encoded["attention_mask"][source].bool()
            topk_ids = topk_logprobs = None
            if config.top_logprobs > 0:
                topk_ids = top.indices[row, : len(ids)].tolist()
                topk_logprobs = top.values[row, : len(ids)].tolist()
            records.append(
                Record(
                    prompt=chunk[source],
                    response=text,
                    prompt_ids=encoded["input_ids"][source][mask].tolist(),
                    response_ids=ids,
                    topk_ids=topk_ids,
                    topk_logprobs=topk_logprobs,
                    finish_reason="stop" if ended or stopped else "length",
                )
            )
    return records
