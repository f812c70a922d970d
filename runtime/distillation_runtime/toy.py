"""Tiny models, tokenizers and tasks made on the spot: tests, benchmarks and examples download
nothing.

A character-level tokenizer (saved as a real ``tokenizer.json`` that ``AutoTokenizer`` loads), a
Llama-style model from transformers' own config class, and built-in tasks whose answers can be
checked exactly (arithmetic, string reversal). ``train_on_records`` trains such a model (a teacher
on gold answers, or a student) with the project's own train stage, so what is distilled is a
real, imperfect model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from distillation_runtime.records import Record

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = "0123456789+-*=:,.;|()[] abcdefghijklmnopqrstuvwxyz"


def make_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character, plus pad/bos/eos/unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *dict.fromkeys(alphabet)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


@dataclass(frozen=True)
class ModelSize:
    """Shape of a tiny Llama-style model."""

    hidden: int = 64
    intermediate: int = 192
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 64


def make_model(
    tokenizer: PreTrainedTokenizerFast, size: ModelSize, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A prompt and its correct answer."""

    prompt: str
    answer: str


def addition(rng: random.Random, digits: int = 2) -> Example:
    """``"37+58="`` -> ``"95"``."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return Example(f"{a}+{b}=", str(a + b))


def reversal(rng: random.Random, length: int = 5) -> Example:
    """``"rev:abcde="`` -> ``"edcba"``."""
    word = "".join(rng.choice("abcdefghij") for _ in range(length))
    return Example(f"rev:{word}=", word[::-1])


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "addition": addition,
    "reversal": reversal,
}


def sample_examples(
    task: str, count: int, seed: int, exclude: set[str] | None = None
) -> list[Example]:
    """``count`` distinct examples of ``task`` (none whose prompt is in ``exclude``)."""
    rng = random.Random(seed)
    make = TASKS[task]
    seen = set(exclude or ())
    out: list[Example] = []
    for _ in range(count * 50):
        example = make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            out.append(example)
            if len(out) == count:
                return out
    raise ValueError(f"task {task!r} has fewer than {count} distinct prompts for seed {seed}")


def save_pretrained(model: Any, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    """Save as a Hugging Face checkpoint (safetensors, config, tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def gold_records(tokenizer: PreTrainedTokenizerFast, examples: list[Example]) -> list[Record]:
    """Examples as training records with the correct answer (ending in EOS) as the response."""
    from distillation_runtime.records import Record

    records = []
    for example in examples:
        prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        records.append(
            Record(
                prompt=example.prompt,
                response=example.answer,
                prompt_ids=prompt_ids,
                response_ids=[*answer_ids, tokenizer.eos_token_id],
            )
        )
    return records


def exact_match(answers: list[str], examples: list[Example]) -> float:
    """Share of answers equal to the correct one (surrounding whitespace ignored)."""
    hits = sum(a.strip() == e.answer for a, e in zip(answers, examples, strict=True))
    return hits / max(1, len(examples))


def train_on_records(
    records: list[Record],
    start: Path,
    work: Path,
    steps: int,
    *,
    batch: int = 32,
    logits: bool = False,
    seed: int = 0,
    learning_rate: str = "3e-3",
) -> Path:
    """Train the checkpoint in ``start`` for exactly ``steps`` optimizer steps (the train stage,
    one process); ``logits`` adds offline logit distillation from the records' top-k. Returns
    the trained model's folder (under ``work``)."""
    from distillation_runtime.records import write_parquet
    from distillation_runtime.spec import TrainSpec
    from distillation_runtime.stages.train import TrainJob, run

    losses: dict[str, Any] = {"response": "1.0"}
    if logits:
        losses["logits"] = {"weight": "1.0", "temperature": "2.0", "source": "offline"}
    spec = TrainSpec.model_validate(
        {
            "losses": losses,
            "batchSize": batch,
            "epochs": 1000,  # bounded by max_steps: equal step budgets make runs comparable
            "learningRate": learning_rate,
            "warmupRatio": "0.05",
            "maxSeqLength": 32,
            "seed": seed,
        }
    )
    write_parquet(records, work / "records.parquet")
    job = TrainJob(
        student=str(start),
        data=str(work / "records.parquet"),
        output=str(work / "train"),
        train=spec,
        max_steps=steps,
        checkpoint_every=steps,
    )
    return run(job, use_ray=False)
