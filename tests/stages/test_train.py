"""The train stage on tiny models made here: it learns, resumes, scales to Ray workers."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
)
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.records import write_parquet
from distillation_runtime.spec import TrainSpec
from distillation_runtime.stages.train import (
    METRICS_FILE,
    TrainJob,
    autocast_dtype,
    checkpoint_step,
    epoch_order,
    latest_checkpoint,
    lr_factor,
    restore_checkpoint,
    run,
    steps_per_epoch,
)


def test_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, total=10, warmup=2, schedule="cosine") for s in range(10)]
    assert factors[0] == pytest.approx(0.5)
    assert factors[1] == pytest.approx(1.0)
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(5, 10, 0, "constant") == 1.0


def test_precision_picks_autocast_dtype() -> None:
    assert autocast_dtype("auto", "cpu", bf16_supported=False) is None
    assert autocast_dtype("auto", "cuda", bf16_supported=True) == "bfloat16"
    assert autocast_dtype("auto", "cuda", bf16_supported=False) is None
    assert autocast_dtype("fp16", "cuda", bf16_supported=True) == "float16"
    assert autocast_dtype("bf16", "cpu", bf16_supported=False) == "bfloat16"


def test_steps_and_order() -> None:
    assert steps_per_epoch(records=100, batch_size=8, accumulation=2, world=2) == 4
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1)
    assert epoch_order(10, 0, 1) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 3, 1)) == list(range(10))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny teacher, a smaller student, and 64 teacher records with top-8 log-probs."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(hidden=64, intermediate=128, layers=2), seed=1)
    student = make_model(tokenizer, ModelSize(hidden=32, intermediate=64, layers=1), seed=2)
    save_pretrained(teacher, tokenizer, root / "teacher")
    save_pretrained(student, tokenizer, root / "student")
    prompts = [e.prompt for e in sample_examples("addition", 64, seed=0)]
    records = generate(
        teacher, tokenizer, prompts, SamplingConfig(max_new_tokens=6, top_logprobs=8)
    )
    write_parquet(records, root / "data.parquet")
    return root


def job(root: Path, out: str, **train: object) -> TrainJob:
    spec = {
        "losses": {"response": "1.0", "logits": {"weight": "1.0", "temperature": "2.0"}},
        "batchSize": 8,
        "learningRate": "3e-3",
        "warmupRatio": "0",
        "epochs": 3,
        **train,
    }
    return TrainJob(
        student=str(root / "student"),
        teacher=str(root / "teacher"),
        data=str(root / "data.parquet"),
        output=str(root / out),
        train=TrainSpec.model_validate(spec),
        checkpoint_every=4,
    )


def metrics(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


def test_offline_distillation_lowers_the_loss_and_saves_a_loadable_student(workdir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = run(job(workdir, "offline"))
    lines = metrics(workdir / "offline")
    assert len(lines) == 24  # 3 epochs x 8 steps
    assert {"response", "logits", "loss", "lr", "tokens_per_s"} <= set(lines[0])
    first, last = sum(x["loss"] for x in lines[:3]) / 3, sum(x["loss"] for x in lines[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answer = generate(loaded, tokenizer, ["12+34="], SamplingConfig(max_new_tokens=4))
    assert answer[0].response_ids  # it generates


def test_online_logits_and_features_train_together(workdir: Path) -> None:
    spec = {
        "losses": {
            "response": "1.0",
            "logits": {"source": "online", "divergence": "jsd", "beta": "0.5"},
            "features": {"weight": "0.5", "layerMap": [{"student": 0, "teacher": 1}]},
        },
        "epochs": 1,
    }
    run(job(workdir, "online", **spec))
    lines = metrics(workdir / "online")
    assert {"response", "logits", "features"} <= set(lines[0])
    assert lines[-1]["features"] < lines[0]["features"]


def dies_at_step(step: int, then: str) -> str:
    """A Python program that runs ``then`` with AdamW's ``step`` patched to SIGKILL-exit (137,
    no cleanup, like a lost pod) on its ``step``-th call."""
    return f"""
import os, sys, torch
real_step, calls = torch.optim.AdamW.step, []
def step_or_die(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == {step}:
        os._exit(137)
    return real_step(self, *args, **kwargs)
torch.optim.AdamW.step = step_or_die
{then}
"""


CRASH_AT_STEP_11 = dies_at_step(  # between checkpoints 8 and 12
    11,
    "from distillation_runtime.stages.train import TrainJob, run\n"
    "run(TrainJob.model_validate_json(sys.argv[1]))",
)


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(workdir: Path) -> None:
    reference = job(workdir, "reference")
    run(reference)
    interrupted = job(workdir, "interrupted")
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AT_STEP_11, interrupted.model_dump_json()],
        capture_output=True,
        text=True,
    )
    assert crashed.returncode == 137, crashed.stderr
    out = Path(interrupted.output)
    assert len(metrics(out)) == 10
    assert checkpoint_step(latest_checkpoint(out) or out) == 8
    run(interrupted)  # resumes from step 8: steps 9 and 10 run again (at most one interval)
    resumed, straight = metrics(out), metrics(Path(reference.output))
    assert [x["step"] for x in resumed] == list(range(1, 25))
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-5)


def test_on_an_object_store_a_new_pod_resumes_from_the_checkpoint_it_mirrored(
    workdir: Path, bucket: str
) -> None:
    """A pod's disk goes with the pod: on an s3:// output (a real S3-protocol server here) each
    checkpoint is copied to the store, and a run on a fresh disk continues from the newest."""
    from distillation_runtime.storage import complete_children

    reference = job(workdir, "reference-s3")
    run(reference)
    mirror = f"s3://{bucket}/run/_work/train-abc"
    first_pod = job(workdir, "first-pod").model_copy(update={"checkpoint_mirror": mirror})
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AT_STEP_11, first_pod.model_dump_json()],
        capture_output=True,
        text=True,
    )
    assert crashed.returncode == 137, crashed.stderr
    assert complete_children(mirror) == ["step-4", "step-8"]  # keep_checkpoints: 2
    next_pod = job(workdir, "next-pod").model_copy(update={"checkpoint_mirror": mirror})
    assert restore_checkpoint(next_pod) == 8
    run(next_pod)
    resumed = metrics(Path(next_pod.output))
    assert [x["step"] for x in resumed] == list(range(1, 25))  # steps 1-8 from the first pod
    straight = metrics(Path(reference.output))
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-5)
    assert complete_children(mirror) == ["step-20", "step-24"]


CRASH_RUN_AT_STEP_55 = dies_at_step(  # `distill run`, after checkpoint 50 was mirrored
    55, "from distillation_runtime.cli import main\nsys.exit(main(sys.argv[1:]))"
)


def test_distill_run_on_an_object_store_resumes_on_a_fresh_disk_and_says_from_where(
    workdir: Path, bucket: str, tmp_path: Path
) -> None:
    """What a retried RayJob on a new pod does, through the stage itself (``execute``): the
    pod's disk is gone, the mirrored checkpoint is restored from the s3:// output before
    training, and the stage reports ``resumedFromStep``."""
    from distillation_runtime.storage import filesystem, read_manifest

    with (tmp_path / "prompts.jsonl").open("w") as f:
        for e in sample_examples("addition", 96, seed=3):
            f.write(json.dumps({"prompt": e.prompt}) + "\n")
    spec = {
        "teacher": {"model": str(workdir / "teacher")},
        "student": {"model": str(workdir / "student")},
        "dataset": {"prompts": str(tmp_path / "prompts.jsonl"), "evalFraction": "0.25"},
        "generate": {"maxNewTokens": 4, "topLogprobs": 4},
        "train": {"epochs": 4, "batchSize": 4, "learningRate": "1e-3"},  # ~18 steps an epoch
        "output": f"s3://{bucket}/run",
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))

    def distill_run(pod: str, program: list[str]) -> subprocess.CompletedProcess[str]:
        env = os.environ | {"DISTILL_WORK_DIR": str(tmp_path / pod)}  # each pod its own disk
        return subprocess.run(
            [*program, "run", str(tmp_path / "spec.yaml")], capture_output=True, text=True, env=env
        )

    crashed = distill_run("first-pod", [sys.executable, "-c", CRASH_RUN_AT_STEP_55])
    assert crashed.returncode == 137, crashed.stderr[-3000:]
    done = distill_run("next-pod", [str(Path(sys.executable).parent / "distill")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumedFromStep=50" in done.stdout, done.stdout
    train = next(line for line in done.stdout.splitlines() if line.startswith("train "))
    artifact = train.split()[-1]
    assert artifact.startswith(f"s3://{bucket}/run/train-"), train
    metrics = read_manifest(artifact)["metrics"]
    assert metrics["resumedFromStep"] == 50, metrics
    fs, path = filesystem(f"{artifact}/{METRICS_FILE}")
    steps = [json.loads(line)["step"] for line in fs.cat(path).decode().splitlines()]
    assert steps == list(range(1, metrics["steps"] + 1)), "every step once, across both pods"
    assert metrics["steps"] > 55, metrics  # trained past the crash


def test_two_ray_workers_lower_the_loss_and_save_a_student(workdir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = run(job(workdir, "ray", workers=2), use_ray=True)
    lines = metrics(workdir / "ray")
    assert len(lines) == 12  # 64 records over 2 workers: 4 steps per epoch
    assert lines[-1]["loss"] < lines[0]["loss"]
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_a_teacher_with_another_tokenizer_is_refused_for_logit_losses(
    workdir: Path, tmp_path: Path
) -> None:
    from distillation_runtime.losses import VocabularyMismatchError

    other = make_tokenizer(alphabet="zyxwvutsrqponmlkjihgfedcba0123456789+=")
    save_pretrained(make_model(other, ModelSize(), seed=3), other, tmp_path / "other-teacher")
    online = job(workdir, "mismatch", losses={"response": "1.0", "logits": {"source": "online"}})
    with pytest.raises(VocabularyMismatchError, match="response distillation"):
        run(online.model_copy(update={"teacher": str(tmp_path / "other-teacher")}))


def teacher_kl_of(student_dir: Path, teacher_dir: Path, records: list[Any]) -> float:
    from transformers import AutoModelForCausalLM

    from distillation_runtime.stages.evaluate import teacher_kl

    load = AutoModelForCausalLM.from_pretrained
    return teacher_kl(load(student_dir), load(teacher_dir), records, batch_size=16)


def test_sampled_teacher_tokens_alone_teach_the_teachers_distribution(workdir: Path) -> None:
    """RS-KD end to end: records with 16 draws per token (no top-k), the logit loss alone
    (response weight 0): the student's forward KL to the teacher's full distribution falls."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(workdir / "teacher")
    with torch.no_grad():  # sharper than a random model: far from the student's near-uniform
        teacher.lm_head.weight.mul_(12.0)
    sharp = save_pretrained(teacher, tokenizer, workdir / "sharp-teacher")
    prompts = [e.prompt for e in sample_examples("addition", 64, seed=0)]
    config = SamplingConfig(max_new_tokens=6, top_logprobs=16, sampled_logprobs=True)
    records = generate(teacher, tokenizer, prompts, config)
    write_parquet(records, workdir / "sampled.parquet")
    losses = {"response": "0", "logits": {"sparsity": "sampled", "temperature": "1.0"}}
    sampled = job(workdir, "sampled", losses=losses).model_copy(
        update={"data": str(workdir / "sampled.parquet")}
    )
    model_dir = run(sampled)
    assert {"logits", "loss"} <= set(metrics(workdir / "sampled")[0])
    before = teacher_kl_of(workdir / "student", sharp, records[:16])
    after = teacher_kl_of(model_dir, sharp, records[:16])
    print(f"forward KL to the teacher: {before:.3f} before, {after:.3f} after")
    assert after < 0.8 * before, (before, after)  # seen: 1.431 -> 0.939
