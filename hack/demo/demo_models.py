"""The demo's tiny teacher, student and prompts, made here (nothing downloaded).

Built with ``distillation_runtime.demo`` (the helpers the tiny example, the benchmarks and the
stage tests use): a character-level tokenizer, Llama-style models of a few hundred thousand
parameters, and a task whose answers are checked exactly. The task is string reversal
(``rev:cjbeb=`` -> ``bebjc``): a two-layer model learns it in a few hundred steps, so the
teacher is good (100% exact match on the held-out prompts in our runs) after about 45 s on two
CPUs, and a student of half its size trained on its answers keeps that, which is what makes the
whole demo fit in a few minutes. (The tiny example's 2-digit addition needs a 4-layer teacher
and 3000 steps.)

All three are cached under the demo's cache folder, keyed by their recipe: only the first run
trains the teacher, and a later one copies the files without even importing torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

EXAMPLE_PROMPT = "rev:badge="
EXPECTED = "egdab"
"""What the demo asks the served student at the end, and its correct answer (the task draws
its words from the letters a to j, so a word outside them is not a fair question)."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the demo's inputs (their cache key)."""

    task: str = "reversal"
    teacher_hidden: int = 96
    teacher_intermediate: int = 288
    teacher_layers: int = 2
    teacher_examples: int = 3000
    teacher_steps: int = 600
    student_hidden: int = 64
    student_intermediate: int = 192
    student_layers: int = 2
    prompts: int = 800
    """The workload's prompts (the Distillation holds a tenth out for evaluation)."""

    def key(self) -> str:
        """Short hash of the recipe: a changed recipe makes new inputs."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


RECIPE = Recipe()


def quiet_transformers() -> None:
    """No progress bars from transformers between the demo's lines (saving and loading these
    models takes milliseconds)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def make_inputs(folder: Path, recipe: Recipe) -> None:
    """Train the teacher on the correct answers (the project's own train stage, so it is a
    real, slightly imperfect model rather than an oracle), make the untrained student and
    write the prompts with their reference answers, all into ``folder``."""
    from transformers import AutoModelForCausalLM

    from distillation_runtime.demo import (
        ModelSize,
        gold_records,
        make_model,
        make_tokenizer,
        sample_examples,
        save_pretrained,
        train_on_records,
    )

    quiet_transformers()
    tokenizer = make_tokenizer()
    teacher = ModelSize(
        hidden=recipe.teacher_hidden,
        intermediate=recipe.teacher_intermediate,
        layers=recipe.teacher_layers,
    )
    gold = gold_records(tokenizer, sample_examples(recipe.task, recipe.teacher_examples, seed=0))
    start = save_pretrained(make_model(tokenizer, teacher, seed=0), tokenizer, folder / "init")
    (folder / "training").mkdir()
    trained = train_on_records(gold, start, folder / "training", recipe.teacher_steps)
    save_pretrained(AutoModelForCausalLM.from_pretrained(trained), tokenizer, folder / "teacher")
    student = ModelSize(
        hidden=recipe.student_hidden,
        intermediate=recipe.student_intermediate,
        layers=recipe.student_layers,
    )
    save_pretrained(make_model(tokenizer, student, seed=1), tokenizer, folder / "student")
    with (folder / "prompts.jsonl").open("w") as f:
        for example in sample_examples(recipe.task, recipe.prompts, seed=1):
            f.write(json.dumps({"prompt": example.prompt, "answer": example.answer}) + "\n")
    for scratch in ("init", "training"):
        shutil.rmtree(folder / scratch)


def cached_inputs(cache: Path, recipe: Recipe = RECIPE) -> tuple[Path, bool]:
    """The folder in ``cache`` holding ``teacher/``, ``student/`` and ``prompts.jsonl`` for
    ``recipe`` (made now when missing), and whether it was there already. Made in a temporary
    sibling and renamed, so an interrupted run leaves nothing half-made behind."""
    folder = cache / f"inputs-{recipe.key()}"
    if (folder / "prompts.jsonl").exists():
        return folder, True
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
    try:
        make_inputs(partial, recipe)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone after the rename; else half-made
    return folder, False


def write_inputs(cache: Path, pvc_root: Path) -> bool:
    """Put the teacher, the student and the prompts on the demo's claims: ``pvc://models/
    teacher``, ``pvc://models/student`` and ``pvc://data/prompts.jsonl``. Returns whether they
    came from the cache."""
    inputs, cached = cached_inputs(cache)
    for model in ("teacher", "student"):
        shutil.copytree(inputs / model, pvc_root / "models" / model)
    (pvc_root / "data").mkdir(parents=True)
    shutil.copy(inputs / "prompts.jsonl", pvc_root / "data" / "prompts.jsonl")
    return cached
