"""The train stage: the student learns from the teacher's answers (and, optionally, its logits
and hidden states).

Reads like a recipe (torchtune's setup, train, save; nanoGPT's one visible loop)::

    state = setup(job)                      # models, optimizer, schedule, data; resumes
    while state.step < state.total:
        parts, tokens = train_step(state)   # one optimizer step
        ...                                 # a metrics line; a checkpoint every so often
    save(state)                             # the final model

- Data: the generate stage's records (Parquet), each worker taking every ``world``-th record.
- Losses: response (cross-entropy on the teacher's tokens) and logits (online from the live
  teacher, or offline from its stored top-k) through the memory-bounded chunked loss, which
  never materialises [batch, sequence, vocabulary], with its options built once from the spec
  (``losses.LogitLossOptions``); features (hidden states through a learned projection) when a
  layer map is given. A step's loss is the mean over all its tokens, on every worker and
  micro-batch together.
- Optimiser: AdamW, warm-up then cosine/linear/constant, gradient accumulation and clipping.
- Workers: one process, or N Ray Train workers (gloo on CPU, NCCL on GPU), as ``train.strategy``
  says (:func:`choose_strategy`). ddp: every worker holds the whole student and gradients are
  averaged with one all-reduce per step. fsdp: FSDP2 (``fully_shard``) shards each decoder layer
  and then the rest over the workers; its hooks gather a layer's parameters for its forward and
  backward and reduce-scatter its gradients, so each worker keeps 1/N of the weights, gradients
  and AdamW state. The loss is computed inside one module's forward (:class:`LossModel`) so the
  root's hooks also gather what the loss reads outside the layers (embeddings, output head).
- Checkpoints every ``checkpoint_every`` optimizer steps under ``<output>/checkpoints`` (written
  to a temporary folder, then renamed): a killed run resumes from the last one and loses at most
  one interval. ddp: rank 0 writes ``state.pt``; fsdp: every rank writes its shards with
  torch.distributed.checkpoint (any world size can load them) and rank 0 ``trainer.pt``. The
  checkpoints live in the output store: beside the artifacts on a shared file system, or, for
  an object store, in a scratch folder mirrored to it (a new pod restores the newest).
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from distillation_runtime.progress import ProgressWriter, progress_uri
from distillation_runtime.raycluster import TrainWorkers, in_ray_job
from distillation_runtime.spec import LogitSource, TrainSpec, TrainStrategy
from distillation_runtime.stages.base import MODEL_DIR, StageContext, StageResult
from distillation_runtime.storage import parse_uri

if TYPE_CHECKING:
    from distillation_runtime.losses import LogitLossOptions
    from distillation_runtime.records import Batch, Record

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.pt"
"""In a sharded checkpoint, beside torch.distributed.checkpoint's files: schedule and step."""
BYTES_PER_PARAMETER = 16
"""Training state per parameter without sharding: fp32 weights, gradients, two AdamW moments."""
FINAL_MODEL = MODEL_DIR
METRICS_FILE = "metrics.jsonl"
WORK_FOLDER = "_work"
"""Under the output store: stages' resumable work in progress (training's checkpoints)."""


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
    checkpoint_mirror: str | None = Field(
        default=None,
        description="Object-store prefix (s3://, gs://) that keeps a copy of each checkpoint "
        "with the metrics so far, when ``output`` is a pod's own disk: a new pod resumes from "
        "it. None when ``output`` is on storage every pod mounts.",
    )
    progress: str | None = Field(
        default=None,
        description="Where rank 0 writes its progress record (progress.progress_uri of the "
        "stage's artifact); none when not given.",
    )

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


def choose_strategy(
    spec: TrainSpec, world: int, parameters: int, gpu_memory: int | None
) -> TrainStrategy:
    """ddp or fsdp for ``train.strategy``. auto shards only when it must: several workers on
    GPUs (``gpu_memory``: the smallest worker's, None on CPU) where ddp's training state would
    take more than half of one GPU. On CPU workers auto keeps ddp: their memory is the node's,
    shared and with no per-worker figure to compare. One worker has nothing to shard."""
    if world == 1:
        return TrainStrategy.DDP
    if spec.strategy is not TrainStrategy.AUTO:
        return spec.strategy
    if gpu_memory is None or BYTES_PER_PARAMETER * parameters <= gpu_memory // 2:
        return TrainStrategy.DDP
    logits, features = spec.losses.logits, spec.losses.features
    if features is not None or (logits is not None and logits.source is LogitSource.ONLINE):
        raise ValueError(
            f"the student ({parameters / 1e9:.1f}B parameters, about "
            f"{BYTES_PER_PARAMETER * parameters / 2**30:.0f} GiB to train) needs train.strategy "
            f"fsdp on GPUs of {gpu_memory / 2**30:.0f} GiB, and fsdp cannot run the teacher live "
            "in every worker: use train.losses.logits.source: offline and no features, more "
            "GPU memory per worker, or train.strategy: ddp to try anyway"
        )
    return TrainStrategy.FSDP


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
# Setup: everything the loop needs, resumed from the latest checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """What the loop reads and advances: :func:`setup` builds it, checkpoints keep it.

    ``step`` counts the optimizer steps done (the loop moves it, with the weights and the
    optimizer's and scheduler's state); ``total`` is where it stops, ``per_epoch`` steps a pass.
    """

    job: TrainJob
    rank: int
    world: int
    strategy: TrainStrategy
    device: Any
    amp: str | None  # the dtype forward passes run in (autocast_dtype); None for fp32
    tokenizer: Any
    student: Any
    teacher: Any  # None unless online logits or features need it live
    projector: Any  # the feature projection (losses.FeatureProjector); None without features
    model: LossModel  # student and projector; its forward is the loss (the FSDP root)
    trainable: list[Any]
    optimizer: Any
    scheduler: Any
    records: list[Record]
    loss_options: LogitLossOptions
    per_epoch: int
    total: int
    step: int = 0

    @property
    def spec(self) -> TrainSpec:
        return self.job.train

    @property
    def output(self) -> Path:
        return Path(self.job.output)


def setup(job: TrainJob) -> TrainingState:
    """Models, optimizer, schedule and data for this worker, resumed from the latest checkpoint."""
    from distillation_runtime.losses import LogitLossOptions
    from distillation_runtime.records import read_parquet

    spec = job.train
    rank, world = _world()
    torch.manual_seed(spec.seed)
    device = _device()
    tokenizer, student, teacher, compare_vocab = _models(job, device)
    amp = autocast_dtype(
        spec.precision.value,
        device.type,
        device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    parameters = sum(p.numel() for p in student.parameters())
    strategy = choose_strategy(spec, world, parameters, _smallest_gpu_memory(device, world))
    if rank == 0:
        print(
            f"train: strategy {strategy.value} ({world} worker(s), {parameters:,} student "
            f"parameters, ~{BYTES_PER_PARAMETER * parameters / 2**30:.2f} GiB of training state "
            f"{'sharded over the workers' if strategy is TrainStrategy.FSDP else 'per worker'})",
            file=sys.stderr,
        )
    if spec.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    projector = _projector(spec, student, teacher, device)
    model = LossModel(student, projector)
    if strategy is TrainStrategy.FSDP:
        _shard(model, student, amp, device, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
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
    state = TrainingState(
        job=job,
        rank=rank,
        world=world,
        strategy=strategy,
        device=device,
        amp=amp,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        projector=projector,
        model=model,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        records=records,
        loss_options=LogitLossOptions.from_spec(spec.losses, compare_vocab),
        per_epoch=per_epoch,
        total=total,
    )
    model.state = state
    _resume(state)
    state.output.mkdir(parents=True, exist_ok=True)
    student.train()
    return state


class LossModel(torch.nn.Module):
    """The student (and the feature projection) under one module whose forward computes every
    loss part (:func:`_loss_parts`). Under FSDP it is the root: its hooks gather the parameters
    outside the decoder layers (embeddings, final norm, output head, which the chunked loss
    reads directly) for the whole forward and backward, and reduce-scatter their gradients."""

    def __init__(self, student: Any, projector: Any) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.state: TrainingState | None = None  # set by setup; not a module, not in state_dict

    def forward(self, batch: Batch) -> dict[str, Any]:
        assert self.state is not None
        return _loss_parts(self.state, batch)


def _shard(model: LossModel, student: Any, amp: str | None, device: Any, world: int) -> None:
    """FSDP2: each decoder layer its own unit (gathered only while it runs), the root the rest.
    On GPUs with bf16 the gathered parameters are bf16 (compute) while the sharded fp32 ones
    are what AdamW updates, and gradients are reduced in fp32; on CPU everything stays fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    low = torch.bfloat16 if amp == "bfloat16" and device.type == "cuda" else None
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for layer in getattr(student.get_decoder(), "layers", []):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # the root's input is the batch: the teacher's stored log-probs stay fp32
    fully_shard(model, mesh=mesh, mp_policy=replace(policy, cast_forward_inputs=False))


def _smallest_gpu_memory(device: Any, world: int) -> int | None:
    """The smallest worker's GPU memory in bytes (every worker must choose the same strategy);
    None on CPU."""
    import torch.distributed as dist

    if device.type != "cuda":
        return None
    memory = torch.tensor([torch.cuda.get_device_properties(device).total_memory], device=device)
    if world > 1:
        dist.all_reduce(memory, op=dist.ReduceOp.MIN)
    return int(memory.item())


def _load(path: str, dtype: str, device: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)


def _models(job: TrainJob, device: Any) -> tuple[Any, Any, Any, int | None]:
    """Tokenizer, student, teacher (None unless needed live) and how many ids the logits compare.

    Logit and feature losses compare the models token by token: a teacher with another
    tokenizer is refused up front, before any step runs.
    """
    from transformers import AutoConfig, AutoTokenizer

    from distillation_runtime import losses as kd

    losses = job.train.losses
    tokenizer = AutoTokenizer.from_pretrained(job.student)
    student = _load(job.student, "float32", device)
    compare_vocab = None
    if job.teacher is not None and (losses.logits is not None or losses.features is not None):
        teacher_tokenizer = AutoTokenizer.from_pretrained(job.teacher)
        kd.check_same_tokenizer(tokenizer, teacher_tokenizer)
        compare_vocab = kd.shared_vocab_size(
            student.get_output_embeddings().weight.shape[0],
            AutoConfig.from_pretrained(job.teacher).vocab_size,
            len(tokenizer),
            len(teacher_tokenizer),
        )
    teacher = None
    if job.needs_teacher:
        if job.teacher is None:
            raise ValueError("online logits and features need the teacher: TrainJob.teacher")
        teacher = _load(job.teacher, "auto", device).eval().requires_grad_(False)
    return tokenizer, student, teacher, compare_vocab


def _projector(spec: TrainSpec, student: Any, teacher: Any, device: Any) -> Any:
    """The learned feature projection, trained with the student; None without feature losses."""
    from distillation_runtime import losses as kd

    features = spec.losses.features
    if features is None or teacher is None:
        return None
    pairs = [(p.student, p.teacher) for p in features.layer_map]
    return kd.FeatureProjector(pairs, student.config.hidden_size, teacher.config.hidden_size).to(
        device
    )


def _device() -> Any:
    """This worker's GPU (Ray Train gives each worker its own) or the CPU."""
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


def _resume(state: TrainingState) -> None:
    """Continue from the newest complete checkpoint, if there is one."""
    resume = latest_checkpoint(state.output)
    if resume is None:
        return
    sharded = (resume / TRAINER_STATE).exists()
    if sharded != (state.strategy is TrainStrategy.FSDP):
        raise ValueError(
            f"{resume} was written with train.strategy {'fsdp' if sharded else 'ddp'}, this run "
            f"uses {state.strategy.value}: set train.strategy to "
            f"{'fsdp' if sharded else 'ddp'} to resume, or remove {resume.parent} to start over"
        )
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.distributed.checkpoint.state_dict_loader import load

        weights, moments = get_state_dict(state.model, state.optimizer)
        load({"model": weights, "optimizer": moments}, checkpoint_id=resume)  # in place
        set_state_dict(
            state.model, state.optimizer, model_state_dict=weights, optim_state_dict=moments
        )
        saved = torch.load(resume / TRAINER_STATE, weights_only=False)
    else:
        saved = torch.load(resume / "state.pt", weights_only=False, map_location=state.device)
        state.student.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        if state.projector is not None and saved.get("projector"):
            state.projector.load_state_dict(saved["projector"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step = saved["step"]
    if state.rank == 0:
        _truncate_metrics(state.output / METRICS_FILE, state.step)
        print(
            f"train: resuming from {resume} (step {state.step} of {state.total})", file=sys.stderr
        )


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past a resumed checkpoint: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept))
    partial.replace(path)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_worker(job_data: dict[str, Any]) -> None:
    """One worker's run (Ray Train calls it with the job as a dict): setup, the loop, save."""
    job = TrainJob.model_validate(job_data)
    state = setup(job)
    progress = _progress(state.total, state.step) if state.rank == 0 else None
    reported = ProgressWriter(
        job.progress if state.rank == 0 else None, "train", state.total, "steps", start=state.step
    )
    while state.step < state.total:
        epoch = state.step // state.per_epoch
        started = time.perf_counter()
        parts, tokens = train_step(state)
        elapsed = time.perf_counter() - started
        if state.rank == 0:
            line = _metrics_line(state, epoch, parts, tokens, elapsed)
            with (state.output / METRICS_FILE).open("a") as f:
                f.write(json.dumps(line) + "\n")
            if progress is not None:
                progress(state.step, parts.get("loss", 0.0))
            reported.update(state.step, loss=parts.get("loss", 0.0))
        if state.step % job.checkpoint_every == 0 or state.step == state.total:
            save_checkpoint(state)
    save(state)


def train_step(state: TrainingState) -> tuple[dict[str, float], int]:
    """One optimizer step over ``gradient_accumulation`` micro-batches, gradients averaged over
    the workers (by hand for ddp; FSDP reduce-scatters them in the backward pass). Each
    micro-batch's loss (a mean over its tokens) counts by its share of the step's tokens on all
    workers, so N workers with batch B learn what one worker with batch N*B does. Returns each
    loss part (its mean over the step's tokens) and the step's tokens, all workers together.
    """
    from distillation_runtime.records import collate

    spec = state.spec
    top_k = spec.losses.logits.top_k if spec.losses.logits is not None else None
    autocast = getattr(torch, state.amp or "float32")
    state.optimizer.zero_grad(set_to_none=True)
    batches = [
        collate(chosen, state.tokenizer.pad_token_id, spec.max_seq_length, top_k).to(state.device)
        for chosen in _micro_batches(state)
    ]
    tokens = int(_sum_over_workers({"tokens": sum(b.tokens for b in batches)}, state)["tokens"])
    parts_sum: dict[str, float] = {}
    for batch in batches:
        share = batch.tokens / max(tokens, 1)
        with torch.autocast(state.device.type, dtype=autocast, enabled=bool(state.amp)):
            parts = state.model(batch)
        (parts["loss"] * (share * state.world)).backward()  # the workers' average undoes world
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + float(value.detach()) * share
    if state.strategy is TrainStrategy.DDP:
        _average_gradients(state.model, state.world)
    if float(spec.max_grad_norm) > 0:  # under FSDP the norm of DTensor shards, over all workers
        torch.nn.utils.clip_grad_norm_(state.trainable, float(spec.max_grad_norm))
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return _sum_over_workers(parts_sum, state), tokens


def _micro_batches(state: TrainingState) -> list[list[Record]]:
    """This worker's records for the next optimizer step, one list per micro-batch (none empty).

    The position in the epoch follows from ``state.step`` alone, so a resumed run picks up the
    same records an uninterrupted one would.
    """
    spec = state.spec
    size, accumulation = spec.batch_size, spec.gradient_accumulation
    epoch, in_epoch = divmod(state.step, state.per_epoch)
    order = epoch_order(len(state.records), epoch, spec.seed)[state.rank :: state.world]
    batches = []
    for micro_step in range(accumulation):
        first = (in_epoch * accumulation + micro_step) * size
        chosen = [state.records[i] for i in order[first : first + size]]
        if chosen:
            batches.append(chosen)
    return batches


def _loss_parts(state: TrainingState, batch: Batch) -> dict[str, Any]:
    """Forward the student (and the teacher when needed) and compute every loss part."""
    from distillation_runtime import losses as kd

    student, teacher, projector = state.student, state.teacher, state.projector
    logits_spec = state.spec.losses.logits
    features_spec = state.spec.losses.features
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
        assert batch.topk_logprobs is not None
        k = batch.topk_ids.shape[-1]
        teacher_source = kd.OfflineTeacher(
            batch.topk_ids.reshape(-1, k), batch.topk_logprobs.reshape(-1, k)
        )
    parts: dict[str, Any] = kd.chunked_logit_losses(
        hidden,
        student.get_output_embeddings().weight,
        target_ids=batch.targets.reshape(-1),
        mask=mask,
        teacher=teacher_source,
        options=state.loss_options,
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


def _average_gradients(model: Any, world: int) -> None:
    import torch.distributed as dist

    if world == 1:
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


def _sum_over_workers(values: dict[str, float], state: TrainingState) -> dict[str, float]:
    """Each value summed over the workers (one all-reduce)."""
    import torch.distributed as dist

    if state.world == 1:
        return values
    summed = torch.tensor(list(values.values()), dtype=torch.float64, device=state.device)
    dist.all_reduce(summed)
    return dict(zip(values, summed.tolist(), strict=True))


def _metrics_line(
    state: TrainingState, epoch: int, parts: dict[str, float], tokens: int, elapsed: float
) -> dict[str, Any]:
    """One line of metrics.jsonl: the step just done, each loss part, the rate, throughput."""
    return {
        "step": state.step,
        "epoch": epoch,
        **{k: round(v, 6) for k, v in parts.items()},
        "lr": state.scheduler.get_last_lr()[0],
        "strategy": state.strategy.value,
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
    }


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
# Saving
# --------------------------------------------------------------------------------------------


def save_checkpoint(state: TrainingState) -> Path | None:
    """``checkpoints/step-N``: weights, optimizer, schedule and step, for a resume. Every worker
    calls it; ddp's rank 0 writes everything, fsdp's workers each write their shards.

    Written to ``step-N.partial``, then renamed by rank 0 (when every worker's shards are in): a
    folder without the suffix is whole. Keeps the newest ``keep_checkpoints``.
    """
    import torch.distributed as dist

    sharded = state.strategy is TrainStrategy.FSDP
    if state.rank != 0 and not sharded:
        return None
    folder = state.output / CHECKPOINTS
    partial = folder / f"step-{state.step}.partial"
    if state.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    trainer = {"scheduler": state.scheduler.state_dict(), "step": state.step}
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import save as save_shards

        dist.barrier()  # the folder is there, and empty
        weights, moments = get_state_dict(state.model, state.optimizer)
        save_shards({"model": weights, "optimizer": moments}, checkpoint_id=partial)
        if state.rank != 0:  # dcp.save returns once the metadata of every shard is written
            return None
        torch.save(trainer, partial / TRAINER_STATE)
    else:
        saved = {
            "model": state.student.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "projector": state.projector.state_dict() if state.projector is not None else None,
            **trainer,
        }
        torch.save(saved, partial / "state.pt")
    final = _publish(partial, folder / f"step-{state.step}")
    for old in complete_checkpoints(state.output)[: -state.job.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    if state.job.checkpoint_mirror is not None:
        mirror_checkpoint(final, state.output / METRICS_FILE, state.job)
    return final


def mirror_checkpoint(checkpoint: Path, metrics: Path, job: TrainJob) -> None:
    """Copy a complete checkpoint, with the metrics up to its step, to ``checkpoint_mirror``
    (``step-N``, marker last), then drop mirrored ones older than ``keep_checkpoints``.
    Rank 0 only: a mirror is refused for sharded (several-worker) training in a Ray job."""
    from distillation_runtime.storage import remove_artifact, write_artifact

    mirror = str(job.checkpoint_mirror).rstrip("/")
    if metrics.exists():  # travels with the checkpoint: a restored run continues these lines
        shutil.copy(metrics, checkpoint / METRICS_FILE)
    step = checkpoint_step(checkpoint)
    write_artifact(f"{mirror}/{checkpoint.name}", checkpoint, {"step": step})
    for old in mirrored_steps(mirror)[: -job.keep_checkpoints]:
        remove_artifact(f"{mirror}/step-{old}")


def mirrored_steps(mirror: str) -> list[int]:
    """The steps of the complete checkpoints under ``mirror``, oldest first."""
    from distillation_runtime.storage import complete_children

    found = (checkpoint_step(Path(name)) for name in complete_children(mirror))
    return sorted(step for step in found if step is not None)


def restore_checkpoint(job: TrainJob) -> int | None:
    """Before training on a pod's own disk: bring the newest mirrored checkpoint (and its
    metrics) into ``output`` when it is newer than any there, so the run resumes from it as
    from its own. Returns the step restored, None when nothing was."""
    from distillation_runtime.plan import COMPLETION_MARKER
    from distillation_runtime.storage import MANIFEST, fetch_artifact

    if job.checkpoint_mirror is None:
        return None
    mirror = job.checkpoint_mirror.rstrip("/")
    steps = mirrored_steps(mirror)
    local = latest_checkpoint(Path(job.output))
    if not steps or (local is not None and (checkpoint_step(local) or 0) >= steps[-1]):
        return None
    step = steps[-1]
    target = Path(job.output) / CHECKPOINTS / f"step-{step}"
    shutil.rmtree(target, ignore_errors=True)
    fetch_artifact(f"{mirror}/step-{step}", target)
    for extra in (MANIFEST, COMPLETION_MARKER):  # the mirror's, not the checkpoint's
        (target / extra).unlink(missing_ok=True)
    shutil.move(target / METRICS_FILE, Path(job.output) / METRICS_FILE)
    print(f"train: restored checkpoint step {step} from {mirror}", file=sys.stderr)
    return step


def save(state: TrainingState) -> Path | None:
    """The final model in ``<output>/model``: safetensors, config, generation config, tokenizer.
    Every worker calls it; rank 0 writes. Under FSDP the full weights are gathered first, to
    rank 0's CPU (a normal checkpoint: tied embeddings are saved once, as transformers does)."""
    full = None
    if state.strategy is TrainStrategy.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(state.student, options=options)
    if state.rank != 0:
        return None
    partial = state.output / f"{FINAL_MODEL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    state.student.save_pretrained(partial, state_dict=full, safe_serialization=True)
    state.tokenizer.save_pretrained(partial)
    return _publish(partial, state.output / FINAL_MODEL)


def _publish(partial: Path, final: Path) -> Path:
    """Put a fully written folder in place of ``final`` (readers never see half of one)."""
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


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
    """``train.workers`` Ray Train workers. In a Ray job they are sized by the worker pods (the
    driver runs on the head, whose lack of GPUs says nothing about them); on a local Ray, by
    this machine."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distillation_runtime.raycluster import (
        cluster_workers,
        in_ray_job,
        init_address,
        train_workers,
    )

    if in_ray_job():
        sizing = train_workers(cluster_workers())
    else:
        if not ray.is_initialized():
            ray.init(address=init_address(), include_dashboard=False, log_to_driver=True)
        gpu = torch.cuda.is_available()
        sizing = TrainWorkers(gpu, {"CPU": 1.0} | ({"GPU": 1.0} if gpu else {}))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if sizing.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.train.workers,
            use_gpu=sizing.use_gpu,
            resources_per_worker=sizing.resources_per_worker,
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(Path(job.output).resolve() / "ray"),
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    trainer.fit()


def checkpoint_mirror(artifact: str) -> str | None:
    """Where an object-store output keeps the checkpoints (``<output>/_work/train-<fp>``, the
    place a shared file system has them): None for a file system, where they are already."""
    location = parse_uri(artifact)
    if location.is_local:
        return None
    parent, _, name = artifact.rstrip("/").rpartition("/")
    return f"{parent}/{WORK_FOLDER}/{name}"


def training_folder(artifact: str, scratch: Path) -> Path:
    """Where training keeps its checkpoints and final model until the artifact is published.

    Beside the artifacts (``<output>/_work/train-<fingerprint>``) when the output store is a
    file system every pod mounts (``pvc://``, a path): a new pod resumes from the last
    checkpoint, and every Ray Train worker (rank 0 saves) writes where the driver reads. On an
    object store (``s3://``), the pod's scratch folder ``scratch``, each checkpoint copied to
    the store (:func:`checkpoint_mirror`) for the next pod to resume from."""
    location = parse_uri(artifact)
    name = artifact.rstrip("/").rpartition("/")[2]
    if location.is_local:
        return location.local_path().parent / WORK_FOLDER / name
    return scratch / name


def check_shared_output(spec: TrainSpec, artifact: str, in_ray_job: bool) -> None:
    """Several Ray Train workers in a cluster need an output every pod mounts: rank 0's model
    and checkpoints on one worker pod's disk would never reach the driver on the head."""
    if in_ray_job and spec.workers > 1 and not parse_uri(artifact).is_local:
        raise ValueError(
            f"train.workers is {spec.workers} with the output on an object store ({artifact}): "
            "rank 0 would save the model on its own pod's disk. Use a pvc:// output on a "
            "ReadWriteMany claim that every Ray pod mounts, or train.workers: 1."
        )


def execute(context: StageContext, folder: Path) -> StageResult:
    """The stage: train the student (given, or the pruned teacher) on the teacher's records.
    Works in a stable folder (``training_folder``: under the output store's ``_work/`` when
    every pod mounts it), so a killed run or a new pod resumes from the last checkpoint; the
    final model and the metrics are copied into ``folder``."""
    from distillation_runtime.stages.generate import TRAIN_FILE

    spec = context.spec
    generated = context.local(context.artifact("generate"))
    if spec.student.model is not None:
        student = context.local(spec.student.model)
    else:
        student = context.local(context.artifact("prune")) / MODEL_DIR
    artifact = context.artifact(context.current)
    check_shared_output(spec.train, artifact, in_ray_job())
    job = TrainJob(
        student=str(student),
        teacher=str(context.local(spec.teacher.model)),
        data=str(generated / TRAIN_FILE),
        output=str(training_folder(artifact, context.work)),
        train=spec.train,
        progress=progress_uri(artifact),
        checkpoint_mirror=checkpoint_mirror(artifact),
    )
    restore_checkpoint(job)  # before any worker starts: they all resume from what is here
    resumed = latest_checkpoint(Path(job.output))  # what train_worker will continue from
    model = run(job)
    shutil.copytree(model, folder / FINAL_MODEL)
    shutil.copy(Path(job.output) / METRICS_FILE, folder / METRICS_FILE)
    lines = [json.loads(x) for x in (folder / METRICS_FILE).read_text().splitlines() if x]
    metrics = {
        "steps": len(lines),
        "finalLoss": lines[-1]["loss"] if lines else None,
        "strategy": lines[-1]["strategy"] if lines else None,
    }
    if resumed is not None:  # a killed attempt's checkpoint: say so where the user looks
        metrics["resumedFromStep"] = checkpoint_step(resumed)
    return StageResult(metrics, {"generate": context.artifact("generate")})
