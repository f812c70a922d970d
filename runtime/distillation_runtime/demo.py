"""Tiny models, tokenizers and tasks made on the spot, so that nothing is downloaded.

Who uses it: the tiny demo (``examples/tiny/prepare.py`` makes the teacher, the student and the
prompts that ``distill run examples/tiny/spec.yaml`` distils), the benchmarks in ``bench/``
(``quality.py``, ``generate.py``, ``gpu_check.py``) and the stage tests in ``tests/stages/``. They
all need real Hugging Face checkpoints that load with ``from_pretrained``, small enough to train
in seconds on a CPU, and answers that can be checked exactly; downloading a model would make
them slow, flaky and dependent on the network.

What it holds:

- a character-level tokenizer (``make_tokenizer``), saved as a real ``tokenizer.json`` that
  ``AutoTokenizer`` loads;
- a Llama-style causal LM of any small shape (``ModelSize``, ``make_model``), built from
  transformers' own config class, so every stage treats it as it treats a real Llama;
- built-in tasks whose answers are checked exactly (``TASKS``: arithmetic, string reversal),
  their examples (``sample_examples``) and score (``exact_match``);
- ``gold_records`` and ``train_on_records``, which train such a model (a teacher on the correct
  answers, or a student) with the project's own train stage, so what is distilled is a real,
  imperfect model rather than an oracle.

This module is part of the public API: examples and benchmarks outside the test suite import
it, so its names (``__all__``) change only with the rest of the public surface. It is as cheap
to import as the rest of the package: torch, transformers and tokenizers load inside the
functions that need them.
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

__all__ = [
    "ALPHABET",
    "SPECIALS",
    "TASKS",
    "Example",
    "ModelSize",
    "addition",
    "exact_match",
    "gold_records",
    "make_model",
    "make_tokenizer",
    "parameter_count",
    "reversal",
    "sample_examples",
    "save_pretrained",
    "train_on_records",
]

#: The tokenizer's special tokens, in id order (pad is 0).
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
#: The characters the default tokenizer knows: digits, lower-case letters and the punctuation
#: the built-in tasks' prompts use.
ALPHABET = "0123456789+-*=:,.;|()[] abcdefghijklmnopqrstuvwxyz"


def make_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character of ``alphabet``, plus pad/bos/eos/unk.

    It pads on the left, as batched generation needs (every prompt ends where the answer starts),
    and saves as a fast tokenizer that ``AutoTokenizer.from_pretrained`` loads back.
    """
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
    """Shape of a tiny Llama-style model (the defaults train in seconds on one CPU).

    ``heads`` must be a multiple of ``kv_heads`` (grouped-query attention, as in real Llamas, so
    pruning meets KV groups); ``max_positions`` bounds prompt plus answer.
    """

    hidden: int = 64
    intermediate: int = 192
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 64


def make_model(
    tokenizer: PreTrainedTokenizerFast, size: ModelSize, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM for ``tokenizer``, the same for one ``seed``.

    Its special-token ids come from ``tokenizer``, so generation stops at EOS and pads with PAD.
    """
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
    """Number of parameters of ``model`` (every tensor, trainable or not): how benchmarks and
    tests compare the sizes of teachers, students and pruned models."""
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
    """The sum of two numbers of up to ``digits`` digits: ``"37+58="`` -> ``"95"``."""
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return Example(f"{a}+{b}=", str(a + b))


def reversal(rng: random.Random, length: int = 5) -> Example:
    """A word of ``length`` letters, reversed: ``"rev:abcde="`` -> ``"edcba"``."""
    word = "".join(rng.choice("abcdefghij") for _ in range(length))
    return Example(f"rev:{word}=", word[::-1])


#: The built-in tasks by name: each makes one ``Example`` from a random generator.
TASKS: dict[str, Callable[[random.Random], Example]] = {
    "addition": addition,
    "reversal": reversal,
}


def sample_examples(
    task: str, count: int, seed: int, exclude: set[str] | None = None
) -> list[Example]:
    """``count`` distinct examples of ``task``, the same for one ``seed``.

    None has a prompt in ``exclude``: pass the training prompts to draw held-out ones, so an
    evaluation never scores a memorised answer. Raises ``ValueError`` when the task has too few
    distinct prompts.
    """
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
    """Save as a Hugging Face checkpoint (safetensors, config, tokenizer) that the stages load
    like any other model folder; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def gold_records(tokenizer: PreTrainedTokenizerFast, examples: list[Example]) -> list[Record]:
    """Examples as training records with the correct answer (ending in EOS) as the response:
    what a teacher is trained on (no top-k log-probs, so response loss only)."""
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
    logits: bool | dict[str, Any] = False,
    teacher: Path | None = None,
    seed: int = 0,
    learning_rate: str = "3e-3",
) -> Path:
    """Train the checkpoint in ``start`` for exactly ``steps`` optimizer steps (the train stage,
    one process); ``logits`` adds logit distillation: True for offline from the records' top-k
    at temperature 2, or the ``train.losses.logits`` section itself (``teacher``: the teacher's
    folder, for ``source: online``). Returns the trained model's folder (under ``work``)."""
    from distillation_runtime.records import write_parquet
    from distillation_runtime.spec import TrainSpec
    from distillation_runtime.stages.train import TrainJob, run

    losses: dict[str, Any] = {"response": "1.0"}
    if logits is True:
        losses["logits"] = {"weight": "1.0", "temperature": "2.0", "source": "offline"}
    elif logits:
        losses["logits"] = logits
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
        teacher=str(teacher) if teacher is not None else None,
        data=str(work / "records.parquet"),
        output=str(work / "train"),
        train=spec,
        max_steps=steps,
        checkpoint_every=steps,
    )
    return run(job, use_ray=False)
