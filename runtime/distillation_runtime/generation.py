"""Teacher answers with transformers: batched, left-padded, KV-cached, with top-k log-probs.

The log-probs are the teacher's own distribution (log-softmax of the raw logits at temperature
1, before any sampling processor), which is what offline logit distillation needs: its top-k, or
(``sampled_logprobs``) tokens drawn from it with their share of the draws (RS-KD).

Stop strings end a response: its text excludes the stop string, its token ids keep the tokens
that spelled it (so a student learns where to stop), and ``finish_reason`` says ``stop``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from distillation_runtime.records import Record


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode; temperature 0 is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_logprobs: int = 0
    sampled_logprobs: bool = False
    """``top_logprobs`` draws from the teacher's distribution per token instead of its top-k."""
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


class TokenWeights(NamedTuple):
    """Per position: token ids [..., k] and the log of their weights [..., k]."""

    indices: Any
    values: Any


def _top(logprobs: Any, k: int) -> TokenWeights:
    """Each position's ``k`` most likely ids and their log-probs."""
    top = logprobs.topk(k, dim=-1)
    return TokenWeights(top.indices, top.values)


def sampled_logprobs(logprobs: Any, draws: int, seed: int) -> TokenWeights:
    """RS-KD's sparse teacher signal (Anshumann et al. 2025): ``draws`` tokens drawn with
    replacement from each position's distribution ``logprobs`` [..., V]; the distinct ones,
    most drawn first, with the log of their share of the draws. The shares sum to 1 and their
    expectation is the teacher's distribution, so -sum(share * log p_student) is an unbiased
    estimate of the cross-entropy (forward KL up to a constant); a top-k cut is not. Padded to
    ``min(draws, V)`` columns with the first id at weight 0 (log -inf), which adds nothing to a
    loss."""
    import torch

    flat = logprobs.reshape(-1, logprobs.shape[-1])
    width = min(draws, flat.shape[-1])
    generator = torch.Generator(device=flat.device).manual_seed(seed)
    drawn = torch.multinomial(flat.exp(), draws, replacement=True, generator=generator)
    counts = torch.zeros_like(flat).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=flat.dtype))
    best = counts.topk(width, dim=-1)
    unused = best.values == 0
    ids = torch.where(unused, best.indices[:, :1], best.indices)
    weights = (best.values / draws).log()  # log 0 = -inf for the padding
    shape = (*logprobs.shape[:-1], width)
    return TokenWeights(ids.reshape(shape), weights.reshape(shape))


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
    for number, chunk in enumerate(_batches(prompts, config.batch_size)):
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
            top = (
                sampled_logprobs(logprobs, config.top_logprobs, config.seed + number)
                if config.sampled_logprobs
                else _top(logprobs, config.top_logprobs)
            )
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
