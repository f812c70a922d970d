"""Quantisation quality on a model that quantises like a real one: what each scheme keeps.

The project's other quantised figures come from width-96 students trained in the tests, whose
weights round far more easily than a pretrained model's. Here a Llama-style model at a real
width (hidden 384, tied embeddings, as small Llamas have) is trained with the project's own
train stage for several hundred steps on synthetic but structured text (small stories with state
to track: who has how many of what, gifts that change it, questions answered from it, and
arithmetic), until its weights carry structure; then every scheme, and the options the spec
exposes, go through the quantize stage (``run``, real llm-compressor) and are compared with the
unquantised model on held-out documents:

- ``agree``: share of greedy continuation tokens identical to the unquantised model's, position
  by position;
- ``kept``: the stage's own measure (``evaluate.gate_score``, the gate's tokenF1 against the
  unquantised model's answers): what the scheme search compares with ``minRetention``;
- ``ppl``: perplexity on the held-out text (teacher-forced), and its ratio to the unquantised
  model's (``ppl kept`` = unquantised / quantised, the gate's perplexity retention);
- ``MB``: the checkpoint's size on disk.

Last, the scheme search itself (``search``, the stage's loop) with [W4A16, W8A8, FP8_DYNAMIC] and
the default minRetention: which scheme it serves on this model.

Needs llm-compressor: run it in the quantize environment. Everything runs as the stage runs it
(AWQ on a CPU without llm-compressor's page-locked pinning, as the stage does there).
FP8_DYNAMIC is evaluated as transformers runs
it here (weights decompressed; activations fake-quantised per token), not with vLLM's FP8
kernels, which need a GPU of compute capability 8.9+.

    python bench/quantize_quality.py            # ~10 min on 2 idle CPUs (5-6 of it training)
    python bench/quantize_quality.py --quick    # 150 steps, fewer documents and samples
    python bench/quantize_quality.py --out bench/results/quantize_quality.json

The last line is JSON with every row and the search's choice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distillation_runtime.demo import make_tokenizer, parameter_count, save_pretrained
from distillation_runtime.generation import greedy_answer_ids, load_for_inference
from distillation_runtime.metrics import token_agreement
from distillation_runtime.records import Record, write_parquet
from distillation_runtime.spec import EvaluateSpec, QuantizeSpec, TrainSpec
from distillation_runtime.stages.evaluate import perplexity
from distillation_runtime.stages.quantize import MODEL_DIR, SearchJob, search
from distillation_runtime.storage import folder_bytes

# --------------------------------------------------------------------------------------------
# Structured text
# --------------------------------------------------------------------------------------------

NAMES = ["ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal", "ida", "jo", "kit", "lu"]
THINGS = ["apples", "books", "cups", "keys", "lamps", "pens", "rocks", "shells", "coins"]
COLOURS = ["red", "blue", "green", "tan", "gold", "grey"]


def story(rng: random.Random) -> str:
    """A few people, what each has, a gift or two, and questions answered from the state: text
    whose next tokens depend on what came many tokens before."""
    people = rng.sample(NAMES, 3)
    thing, colour = rng.choice(THINGS), rng.choice(COLOURS)
    have = {p: rng.randrange(1, 9) for p in people}
    lines = [f"{p} has {have[p]} {colour} {thing}." for p in people]
    for _ in range(rng.randrange(1, 3)):
        giver, taker = rng.sample([p for p in people if have[p] > 0], 2)
        count = rng.randrange(1, have[giver] + 1)
        have[giver] -= count
        have[taker] += count
        lines.append(f"{giver} gives {taker} {count}.")
    for person in rng.sample(people, 2):
        lines.append(f"how many has {person}? {have[person]}.")
    return " ".join(lines)


def sums(rng: random.Random) -> str:
    """Arithmetic facts: exact answers the weights must compute."""
    facts = []
    for _ in range(4):
        a, b = rng.randrange(100), rng.randrange(100)
        facts.append(f"{a}+{b}={a + b};")
    return " ".join(facts)


def document(rng: random.Random) -> str:
    return story(rng) if rng.random() < 0.75 else sums(rng)


def records_of(texts: list[str], tokenizer: Any, prompt_chars: int) -> list[Record]:
    """Documents as prompt (the first ``prompt_chars`` characters) and continuation (+ EOS)."""
    out = []
    for text in texts:
        prompt, rest = text[:prompt_chars], text[prompt_chars:]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rest_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
        out.append(Record(prompt, rest, prompt_ids, [*rest_ids, tokenizer.eos_token_id]))
    return out


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    hidden: int = 384
    intermediate: int = 1024
    layers: int = 2
    heads: int = 6
    kv_heads: int = 2
    steps: int = 600
    batch: int = 8
    documents: int = 8000
    held_out: int = 48
    calibration: int = 512  # the spec's default
    continuation: int = 40
    seq: int = 128


QUICK = Settings(steps=150, documents=2000, held_out=24, calibration=128)


def make_model(tokenizer: Any, s: Settings) -> Any:
    """A Llama with tied input/output embeddings (demo.make_model unties them)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def train(s: Settings, root: Path, tokenizer: Any, texts: list[str]) -> Path:
    """The project's train stage (one process), response loss on the continuations."""
    from distillation_runtime.stages.train import TrainJob
    from distillation_runtime.stages.train import run as train_run

    start = save_pretrained(make_model(tokenizer, s), tokenizer, root / "init")
    write_parquet(records_of(texts, tokenizer, prompt_chars=12), root / "train.parquet")
    spec = TrainSpec.model_validate(
        {
            "batchSize": s.batch,
            "epochs": 1000,  # bounded by max_steps
            "learningRate": "1e-3",
            "warmupRatio": "0.05",
            "weightDecay": "0.01",
            "maxSeqLength": s.seq,
        }
    )
    job = TrainJob(
        student=str(start),
        data=str(root / "train.parquet"),
        output=str(root / "train"),
        train=spec,
        max_steps=s.steps,
        checkpoint_every=s.steps,
    )
    return train_run(job, use_ray=False)


# --------------------------------------------------------------------------------------------
# Measuring a checkpoint against the unquantised one
# --------------------------------------------------------------------------------------------


def continuations(folder: Path, records: list[Record], tokens: int) -> list[list[int]]:
    return greedy_answer_ids(folder, [r.prompt for r in records], tokens)


def held_out_perplexity(folder: Path, records: list[Record]) -> float:
    model, _ = load_for_inference(folder)
    return perplexity(model, records, batch_size=32)


@dataclass(frozen=True)
class Row:
    name: str
    scheme: str
    options: str
    agree: float
    kept: float
    ppl: float
    ppl_kept: float
    mb: float
    seconds: float


VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("FP8_DYNAMIC", {"scheme": "FP8_DYNAMIC"}),
    ("W8A8", {"scheme": "W8A8"}),
    ("W4A16 GPTQ (defaults)", {"scheme": "W4A16"}),
    ("W4A16 GPTQ actOrder off", {"scheme": "W4A16", "gptq": {"actOrder": "off"}}),
    ("W4A16 GPTQ damp 0.1", {"scheme": "W4A16", "gptq": {"dampeningFrac": "0.1"}}),
    ("W4A16 GPTQ 32 samples", {"scheme": "W4A16", "calibrationSamples": 32}),
    ("W4A16 GPTQ 128 samples", {"scheme": "W4A16", "calibrationSamples": 128}),
    ("W4A16 GPTQ length 32", {"scheme": "W4A16", "calibrationMaxSeqLength": 32}),
    ("W4A16 AWQ", {"scheme": "W4A16", "w4a16Algorithm": "AWQ"}),
]
"""Every scheme at the spec's defaults, then one W4A16 option changed at a time."""


def options_text(options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if k != "scheme"}
    return json.dumps(shown, separators=(",", ":")) if shown else "defaults"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the table and JSON here")
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    started = time.perf_counter()
    rng = random.Random(0)
    tokenizer = make_tokenizer()
    texts = list(dict.fromkeys(document(rng) for _ in range(s.documents)))
    train_texts, held_texts = texts[: -s.held_out], texts[-s.held_out :]

    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        root = Path(tmp)
        trained = train(s, root, tokenizer, train_texts)
        trained_seconds = time.perf_counter() - started
        import torch
        from transformers import AutoModelForCausalLM

        params = parameter_count(AutoModelForCausalLM.from_pretrained(trained))
        # held-out prompts: each document cut a little before its end, so the continuation
        # holds an answer that depends on the state built up before it
        held = records_of(held_texts, tokenizer, prompt_chars=12)
        prompts = [
            Record(t[: max(12, len(t) - s.continuation)], "", [], [], None) for t in held_texts
        ]
        reference = continuations(trained, prompts, s.continuation)
        judged = [
            Record(p.prompt, tokenizer.decode(ids, skip_special_tokens=True), [], ids)
            for p, ids in zip(prompts, reference, strict=True)
        ]
        write_parquet(judged, root / "eval.parquet")
        calibration_texts = train_texts[:1024]
        write_parquet(records_of(calibration_texts, tokenizer, 12), root / "calibration.parquet")
        judge = EvaluateSpec.model_validate({"metrics": ["tokenF1"]})
        base_ppl = held_out_perplexity(trained, held)
        base_mb = folder_bytes(trained) / 1e6
        rows = [
            Row("unquantised", "-", "-", 1.0, 1.0, base_ppl, 1.0, base_mb, 0.0),
        ]
        print(
            f"model: hidden {s.hidden}, {s.layers} layers, tied embeddings, {params / 1e6:.2f}M "
            f"parameters, {s.steps} steps ({trained_seconds:.0f} s); held-out ppl {base_ppl:.3f}",
            file=sys.stderr,
        )

        def search_job(quantize: dict[str, Any]) -> SearchJob:
            """The stage's search on this model; every variant's attempt lands in one attempts
            folder, so the closing search reuses the ones it shares with the table."""
            spec = QuantizeSpec.model_validate({"calibrationSamples": s.calibration, **quantize})
            return SearchJob(
                student=str(trained),
                student_id="bench",
                records_id="bench",
                calibration=str(root / "calibration.parquet"),
                eval_records=str(root / "eval.parquet"),
                attempts=str(root / "attempts"),
                quantize=spec,
                evaluate=judge,
                max_seq_length=spec.calibration_max_seq_length or s.seq,
                max_new_tokens=s.continuation,
            )

        def log(line: str) -> None:
            print(line, file=sys.stderr)

        for name, options in VARIANTS:
            scheme = options["scheme"]
            variant = {k: v for k, v in options.items() if k != "scheme"}
            tried = search(search_job({"schemes": [scheme], "minRetention": "2", **variant}), log)
            attempt = tried.attempts[0]
            if attempt.uri is None or attempt.kept is None:
                raise RuntimeError(f"{name} could not be applied: {attempt.skipped}")
            folder = Path(attempt.uri) / MODEL_DIR
            ours = continuations(folder, prompts, s.continuation)
            ppl = held_out_perplexity(folder, held)
            rows.append(
                Row(
                    name,
                    scheme,
                    options_text(variant),
                    token_agreement(ours, reference),
                    attempt.kept,
                    ppl,
                    base_ppl / ppl,
                    folder_bytes(folder) / 1e6,
                    attempt.seconds,
                )
            )
            log(f"{name}: {asdict(rows[-1])}")

        # the stage's own loop at its defaults, most compressed first (the attempts reused)
        schemes = ["W4A16", "W8A8", "FP8_DYNAMIC"]
        searched = search(search_job({"schemes": schemes}), log)

    header = (
        f"{'variant':<26} {'agree':>6} {'kept':>6} {'ppl':>7} {'ppl kept':>8} {'MB':>6} {'s':>5}"
    )
    lines = [
        f"Model: Llama, hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers, "
        f"{s.heads} heads ({s.kv_heads} KV), tied embeddings, {params / 1e6:.2f}M parameters; "
        f"trained {s.steps} steps x {s.batch} on structured synthetic text; {s.held_out} "
        f"held-out documents, {s.continuation}-token greedy continuations; calibration "
        f"{s.calibration} samples unless stated.",
        header,
        "-" * len(header),
    ]
    for r in rows:
        lines.append(
            f"{r.name:<26} {r.agree:>6.3f} {r.kept:>6.3f} {r.ppl:>7.3f} {r.ppl_kept:>8.3f} "
            f"{r.mb:>6.2f} {r.seconds:>5.1f}"
        )
    chosen = searched.chosen.scheme if searched.chosen else "none (unquantised served)"
    tried_text = ", ".join(
        f"{a.scheme} kept {a.kept:.3f}{' (reused)' if a.reused else ''}"
        if a.kept is not None
        else f"{a.scheme} skipped"
        for a in searched.attempts
    )
    lines.append(f"\nScheme search [W4A16, W8A8, FP8_DYNAMIC], minRetention 0.97: {tried_text}")
    lines.append(f"-> serves {chosen}")
    table = "\n".join(lines)
    summary = {
        "rows": [asdict(r) for r in rows],
        "search": {"tried": [asdict(a) for a in searched.attempts], "chosen": chosen},
        "settings": asdict(s),
        "parameters": params,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    print(table)
    print(json.dumps(summary))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".txt").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
