"""Training with train.strategy fsdp: two Ray Train workers (gloo on CPU) shard the student and
learn what one worker learns; sharded checkpoints resume; the final model is a normal one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_train import job, metrics, workdir  # noqa: F401 (workdir: the fixture)

from distillation_runtime.demo import make_tokenizer, save_pretrained
from distillation_runtime.spec import TrainSpec, TrainStrategy
from distillation_runtime.stages.train import (
    TRAINER_STATE,
    TrainJob,
    checkpoint_step,
    choose_strategy,
    latest_checkpoint,
    run,
)

STEPS = 16  # 64 records, 2 epochs, 8 records per step


@pytest.fixture(scope="module")
def tied(workdir: Path) -> Path:  # noqa: F811
    """The tiny student of test_train with its input and output embeddings tied."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(workdir / "student")
    student.config.tie_word_embeddings = True
    student.tie_weights()
    assert student.lm_head.weight is student.model.embed_tokens.weight
    save_pretrained(student, make_tokenizer(), workdir / "tied-student")
    return workdir / "tied-student"


def tied_job(root: Path, student: Path, out: str, **train: object) -> TrainJob:
    return job(root, out, epochs=2, **train).model_copy(update={"student": str(student)})


def two_fsdp_workers(root: Path, student: Path, out: str) -> TrainJob:
    """Half of one worker's batch each: every step sees the same 8 records as one worker's."""
    return tied_job(
        root, student, out, workers=2, batchSize=4, strategy="fsdp", gradientCheckpointing=True
    )


@pytest.fixture(scope="module")
def fsdp_run(workdir: Path, tied: Path) -> TrainJob:  # noqa: F811
    fsdp = two_fsdp_workers(workdir, tied, "fsdp")
    run(fsdp, use_ray=True)
    return fsdp


def test_two_fsdp_workers_learn_what_one_worker_learns(
    workdir: Path,  # noqa: F811
    tied: Path,
    fsdp_run: TrainJob,
) -> None:
    from transformers import AutoModelForCausalLM

    one = run(tied_job(workdir, tied, "one-worker", batchSize=8))
    single, sharded = metrics(workdir / "one-worker"), metrics(Path(fsdp_run.output))
    assert len(sharded) == len(single) == STEPS
    assert {x["strategy"] for x in single} == {"ddp"}
    assert {x["strategy"] for x in sharded} == {"fsdp"}
    for a, b in zip(single, sharded, strict=True):  # gradient checkpointing changes no number
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    assert sharded[-1]["loss"] < sharded[0]["loss"]

    checkpoint = latest_checkpoint(Path(fsdp_run.output))
    assert checkpoint is not None
    assert checkpoint_step(checkpoint) == STEPS
    assert (checkpoint / ".metadata").exists()
    assert (checkpoint / TRAINER_STATE).exists()
    assert len(list(checkpoint.glob("*.distcp"))) == 2  # one file of shards per worker

    model = AutoModelForCausalLM.from_pretrained(Path(fsdp_run.output) / "model")
    reference = AutoModelForCausalLM.from_pretrained(one)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = reference.state_dict()
    for name, weight in model.state_dict().items():
        assert weight.dtype == expected[name].dtype
        assert (weight - expected[name]).abs().max() < 1e-4, name


RANK_DIES_AT_STEP_11 = """
import os, sys, torch, torch.distributed as dist
from distillation_runtime.stages.train import TrainJob, train_worker
real_step, calls = torch.optim.AdamW.step, []
def step_or_die(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 11:
        os._exit(137)  # dies between checkpoints 8 and 12, like a SIGKILL: no cleanup runs
    return real_step(self, *args, **kwargs)
torch.optim.AdamW.step = step_or_die
dist.init_process_group("gloo")
train_worker(TrainJob.model_validate_json(sys.argv[1]).model_dump(mode="json"))
"""


def test_a_killed_fsdp_run_resumes_on_new_workers_and_ends_where_an_uninterrupted_one_does(
    workdir: Path,  # noqa: F811
    tied: Path,
    fsdp_run: TrainJob,
) -> None:
    interrupted = two_fsdp_workers(workdir, tied, "fsdp-interrupted")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_DIES_AT_STEP_11, interrupted.model_dump_json()],
            env=env | {"RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 137, stderr
    out = Path(interrupted.output)
    assert len(metrics(out)) == 10
    assert checkpoint_step(latest_checkpoint(out) or out) == 8
    run(interrupted, use_ray=True)  # new workers load the shards of step 8
    resumed, straight = metrics(out), metrics(Path(fsdp_run.output))
    assert [x["step"] for x in resumed] == list(range(1, STEPS + 1))
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-5)


def spec(**fields: object) -> TrainSpec:
    return TrainSpec.model_validate(fields)


GIB = 2**30
ONLINE = {"logits": {"source": "online"}}


def test_auto_shards_only_a_student_that_would_not_fit_one_gpu() -> None:
    auto, billion = spec(), 10**9
    assert choose_strategy(auto, world=1, parameters=70 * billion, gpu_memory=80 * GIB) == "ddp"
    assert choose_strategy(auto, world=8, parameters=billion, gpu_memory=80 * GIB) == "ddp"
    assert choose_strategy(auto, world=8, parameters=7 * billion, gpu_memory=80 * GIB) == "fsdp"
    assert choose_strategy(auto, world=8, parameters=7 * billion, gpu_memory=None) == "ddp"
    forced = spec(strategy="fsdp")
    assert choose_strategy(forced, world=2, parameters=1000, gpu_memory=None) == "fsdp"
    assert choose_strategy(forced, world=1, parameters=1000, gpu_memory=None) == "ddp"
    with pytest.raises(ValueError, match=r"train\.strategy fsdp.*source: offline"):
        choose_strategy(spec(losses=ONLINE), world=8, parameters=7 * billion, gpu_memory=80 * GIB)


@pytest.mark.parametrize(
    "losses",
    [ONLINE, {"features": {"layerMap": [{"student": 0, "teacher": 1}]}}],
    ids=["online-logits", "features"],
)
def test_fsdp_with_the_teacher_live_is_refused(losses: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match=r"strategy fsdp.*source: offline"):
        spec(strategy="fsdp", losses=losses)
    assert spec(strategy="ddp", losses=losses).strategy is TrainStrategy.DDP
