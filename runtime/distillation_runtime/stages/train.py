"""The train stage: the student learns from the teacher's answers (and, optionally, its logits
and hidden states).

Reads top to bottom like nanoGPT's train.py: config in, one visible loop, artifacts out.

- Data: the generate stage's records (Parquet), each worker taking every ``world``-th record.
- Losses: response (cross-entropy on the teacher's tokens) and logits (online from the live
  teacher, or offline from its stored top-k) through the memory-bounded chunked loss, which
  never materialises [batch, sequence, vocabulary]; features (hidden states through a learned
  projection) when a layer map is given.
- Optimiser: AdamW, warm-up then cosine/linear/constant, gradient accumulation and clipping.
- Workers: one process, or N Ray Train workers (gloo on CPU). Gradients are averaged with one
  all-reduce per step, so the loss code sees plain modules.
- Checkpoints every ``checkpoint_every`` optimizer steps under ``<output>/checkpoints`` (written
  to a temporary folder, then renamed): a killed run resumes from the last one and loses at most
  one interval.
- Out: ``<output>/model`` (safetensors, config, tokenizer, generation config) and
  ``<output>/metrics.jsonl`` (one line per step: each loss part, learning rate, tokens/s).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillation_runtime.spec import LogitSource, TrainSpec

CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"
METRICS_FILE = "metrics.jsonl"


class TrainJob(BaseModel):
    """One training run: what ``distill run`` and the RayJob both execute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(description="Folder of the student's starting checkpoint.")
    teacher: str | None = Field(
        default=None, description="Folder of the teacher (needed for online logits/features)."
    )
    data: str = Field(description="Parquet file of teacher records.")
    output: str = Field(description="Folder for checkpoints, metrics and the final model.")
    train: TrainSpec = Field(default_factory=TrainSpec)
    checkpoint_every: int = Field(default=50, ge=1, description="Optimizer steps per checkpoint.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (equal-compute runs)."
    )
    keep_checkpoints: int = Field(default=2, ge=1)

    @property
    def needs_teacher(self) -> bool:
        losses = self.train.losses
        online = losses.logits is not None and losses.logits.source is LogitSource.ONLINE
        return online or losses.features is not None


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def steps_per_epoch(records: int, batch_size: int, accumulation: int, world: int) -> int:
    """Optimizer steps in one pass over ``records`` split across ``world`` workers."""
    per_worker = math.ceil(records / world)
    return max(1, math.ceil(per_worker / (batch_size * accumulation)))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(count: int, epoch: int, seed: int) -> list[int]:
    """The record order of an epoch: shuffled, the same on every worker and after a resume."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def checkpoint_step(folder: Path) -> int | None:
    """N for a complete checkpoint folder ``step-N``; None for anything else (``.partial``)."""
    prefix, _, number = folder.name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def complete_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in (output / CHECKPOINTS).glob("step-*") if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint: written as ``step-N.partial``, renamed when whole."""
    done = complete_checkpoints(output)
    return done[-1] if done else None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _load(path: str, dtype: str, device: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)


def _device() -> Any:
    """This worker's GPU (Ray Train gives each worker its own) or the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(precision: str, device_type: str, bf16_supported: bool) -> str | None:
    """The dtype forward passes run in; None for full fp32. Weights stay fp32 (master copy)."""
    if precision == "auto":
        return "bfloat16" if device_type == "cuda" and bf16_supported else None
    return {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}[precision]


def _world() -> tuple[int, int]:
    """(rank, world size): Ray Train's when running under it, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(model: Any, world: int) -> None:
    import torch.distributed as dist

    if world == 1:
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past a resumed checkpoint: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept))
    partial.replace(path)


def _save_checkpoint(output: Path, step: int, state: dict[str, Any], keep: int) -> None:
    import torch

    folder = output / CHECKPOINTS
    final = folder / f"step-{step}"
    partial = folder / f"step-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(state, partial / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in complete_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def train_worker(job_data: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train calls it with the job as a dict)."""
    import torch

    from distillation_runtime import losses as kd
    from distillation_runtime.records import collate, read_parquet

    job = TrainJob.model_validate(job_data)
    spec = job.train
    rank, world = _world()
    output = Path(job.output)
    torch.manual_seed(spec.seed)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.student)
    device = _device()
    student = _load(job.student, "float32", device)
    amp = autocast_dtype(
        spec.precision.value,
        device.type,
        device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    teacher = None
    compare_vocab = None
    if job.teacher is not None and (spec.losses.logits or spec.losses.features):
        # Logit and feature losses compare token by token: refuse another tokenizer up front.
        from transformers import AutoConfig

        teacher_tokenizer = AutoTokenizer.from_pretrained(job.teacher)
        kd.check_same_tokenizer(tokenizer, teacher_tokenizer)
        compare_vocab = kd.shared_vocab_size(
            student.get_output_embeddings().weight.shape[0],
            AutoConfig.from_pretrained(job.teacher).vocab_size,
            len(tokenizer),
            len(teacher_tokenizer),
        )
    if job.needs_teacher:
        if job.teacher is None:
            raise ValueError("online logits and features need the teacher: TrainJob.teacher")
        teacher = _load(job.teacher, "auto", device).eval().requires_grad_(False)
    logits_spec = spec.losses.logits
    features_spec = spec.losses.features
    projector = None
    if features_spec is not None and teacher is not None:
        pairs = [(p.student, p.teacher) for p in features_spec.layer_map]
        projector = kd.FeatureProjector(
            pairs, student.config.hidden_size, teacher.config.hidden_size
        ).to(device)
    trainable = list(student.parameters()) + (list(projector.parameters()) if projector else [])
    optimizer = torch.optim.AdamW(
        trainable, lr=float(spec.learning_rate), weight_decay=float(spec.weight_decay)
    )

    records = read_parquet(Path(job.data))
    per_epoch = steps_per_epoch(len(records), spec.batch_size, spec.gradient_accumulation, world)
    total = per_epoch * spec.epochs
    if job.max_steps is not None:
        total = min(total, job.max_steps)
    warmup = int(float(spec.warmup_ratio) * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, spec.scheduler.value)
    )

    step = 0
    resume = latest_checkpoint(output)
    if resume is not None:
        state = torch.load(resume / "state.pt", weights_only=False, map_location=device)
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if projector is not None and state.get("projector"):
            projector.load_state_dict(state["projector"])
        step = state["step"]
        if rank == 0:
            _truncate_metrics(output / METRICS_FILE, step)
            print(f"train: resuming from {resume} (step {step} of {total})", file=sys.stderr)

    head = student.get_output_embeddings().weight
    micro = spec.batch_size
    metrics_path = output / METRICS_FILE
    output.mkdir(parents=True, exist_ok=True)
    progress = _progress(total, step) if rank == 0 else None
    student.train()
    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        order = epoch_order(len(records), epoch, spec.seed)[rank::world]
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        tokens = 0
        for micro_step in range(spec.gradient_accumulation):
            first = (in_epoch * spec.gradient_accumulation + micro_step) * micro
            chosen = [records[i] for i in order[first : first + micro]]
            if not chosen:
                continue
            top_k = logits_spec.top_k if logits_spec is not None else None
            batch = collate(chosen, tokenizer.pad_token_id, spec.max_seq_length, top_k).to(device)
            with torch.autocast(
                device.type, dtype=getattr(torch, amp or "float32"), enabled=bool(amp)
            ):
                parts = _loss_parts(student, teacher, projector, head, batch, spec, compare_vocab)
            (parts["loss"] / spec.gradient_accumulation).backward()
            tokens += batch.tokens
            for name, value in parts.items():
                parts_sum[name] = (
                    parts_sum.get(name, 0.0) + float(value.detach()) / spec.gradient_accumulation
                )
        _average_gradients(student, world)
        if projector is not None:
            _average_gradients(projector, world)
        if float(spec.max_grad_norm) > 0:
            torch.nn.utils.clip_grad_norm_(trainable, float(spec.max_grad_norm))
        optimizer.step()
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - started
        if rank == 0:
            line = {
                "step": step,
                "epoch": epoch,
                **{k: round(v, 6) for k, v in parts_sum.items()},
                "lr": scheduler.get_last_lr()[0],
                "tokens": tokens * world,
                "tokens_per_s": round(tokens * world / max(elapsed, 1e-9), 1),
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(line) + "\n")
            if progress is not None:
                progress(step, parts_sum.get("loss", 0.0))
            if step % job.checkpoint_every == 0 or step == total:
                state = {
                    "model": student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "projector": projector.state_dict() if projector else None,
                    "step": step,
                }
                _save_checkpoint(output, step, state, job.keep_checkpoints)

    if rank == 0:
        final = output / FINAL_MODEL
        partial = output / f"{FINAL_MODEL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        student.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)


def _loss_parts(
    student: Any,
    teacher: Any,
    projector: Any,
    head: Any,
    batch: Any,
    spec: TrainSpec,
    compare_vocab: int | None,
) -> dict[str, Any]:
    """Forward the student (and the teacher when needed) and compute every loss part."""
    import torch

    from distillation_runtime import losses as kd

    losses = spec.losses
    logits_spec = losses.logits
    features_spec = losses.features
    want_states = features_spec is not None
    out = student.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=want_states,
    )
    mask = batch.loss_mask.reshape(-1)
    hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
    teacher_source: Any = None
    teacher_out = None
    if teacher is not None:
        with torch.no_grad():
            teacher_out = teacher.get_decoder()(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=want_states,
            )
    if (
        logits_spec is not None
        and logits_spec.source is LogitSource.ONLINE
        and teacher_out is not None
    ):
        t_hidden = teacher_out.last_hidden_state
        teacher_source = kd.OnlineTeacher(
            t_hidden.reshape(-1, t_hidden.shape[-1]), teacher.get_output_embeddings().weight
        )
    elif logits_spec is not None and batch.topk_ids is not None:
        k = batch.topk_ids.shape[-1]
        teacher_source = kd.OfflineTeacher(
            batch.topk_ids.reshape(-1, k), batch.topk_logprobs.reshape(-1, k)
        )
    parts: dict[str, Any] = kd.chunked_logit_losses(
        hidden,
        head,
        target_ids=batch.targets.reshape(-1),
        mask=mask,
        teacher=teacher_source,
        response_weight=float(losses.response),
        kd_weight=float(logits_spec.weight) if logits_spec is not None else 0.0,
        divergence=logits_spec.divergence.value if logits_spec is not None else "forwardKL",
        beta=logits_spec.jsd_beta if logits_spec is not None else 0.5,
        temperature=float(logits_spec.temperature) if logits_spec is not None else 1.0,
        missing_mass=logits_spec.missing_mass.value if logits_spec is not None else "ignore",
        chunk_size=logits_spec.chunk_size if logits_spec is not None else 512,
        compare_vocab=compare_vocab,
    )
    if features_spec is not None and projector is not None and teacher_out is not None:
        s_states = [
            out.hidden_states[p.student + 1].reshape(mask.numel(), -1)
            for p in features_spec.layer_map
        ]
        t_states = [
            teacher_out.hidden_states[p.teacher + 1].reshape(mask.numel(), -1)
            for p in features_spec.layer_map
        ]
        feature = kd.feature_loss(s_states, t_states, projector, mask, features_spec.distance.value)
        parts["features"] = feature
        parts["loss"] = parts["loss"] + float(features_spec.weight) * feature
    return parts


def _progress(total: int, start: int) -> Any:
    """A one-line progress bar on a terminal; nothing when output is not a terminal."""
    if not sys.stderr.isatty():
        return None
    begun = time.perf_counter()

    def show(step: int, loss: float) -> None:
        done = step - start
        rate = done / max(time.perf_counter() - begun, 1e-9)
        width = 30
        filled = int(width * step / total)
        eta = (total - step) / rate if rate > 0 else 0
        bar = "#" * filled + "-" * (width - filled)
        print(
            f"\rtrain [{bar}] {step}/{total} loss {loss:.4f} eta {eta:.0f}s",
            end="",
            file=sys.stderr,
        )
        if step == total:
            print(file=sys.stderr)

    return show


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def run(job: TrainJob, *, use_ray: bool | None = None) -> Path:
    """Train; returns the final model's folder. Ray Train when ``workers > 1`` (or asked)."""
    workers = job.train.workers
    if use_ray is None:
        use_ray = workers > 1
    if not use_ray:
        train_worker(job.model_dump(mode="json"))
    else:
        _run_with_ray(job)
    return Path(job.output) / FINAL_MODEL


def _run_with_ray(job: TrainJob) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    import torch

    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.train.workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name="train",
            storage_path=str(Path(job.output).resolve() / "ray"),
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    trainer.fit()
