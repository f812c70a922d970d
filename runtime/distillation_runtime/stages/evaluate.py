"""The evaluate stage: teacher and student on the held-out prompts of the user's own workload.

Config in (``EvaluateJob``), one pass, artifacts out:

1. the teacher's answers come from the generate stage (records of the eval split);
2. the student answers the same prompts (greedy), timed; the teacher is timed too when its
   weights are given;
3. text metrics of the student against the teacher's answers, and of both against the dataset's
   expected answers when it has them; the student's perplexity on the teacher's answers (and the
   teacher's own, when its weights are given);
4. retention per metric (student / teacher; teacher / student for perplexity) and the gate;
5. the cost beside the quality: parameters, size on disk and tokens/s of both models on this
   same hardware, and their ratios (what a user distils for);
6. ``report.json``, ``scores.png`` (teacher vs student), ``loss.png`` (from the train stage's
   metrics when given) and a model card, ``README.md``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillation_runtime.metrics import (
    TEXT_METRICS,
    check_gate,
    json_pass_rate,
    mean_score,
    pattern_pass_rate,
    retention,
)
from distillation_runtime.records import Record
from distillation_runtime.spec import EvaluateSpec
from distillation_runtime.stages.base import MODEL_DIR, Role, StageContext, StageResult

REPORT_FILE = "report.json"
MODEL_CARD = "README.md"


class EvaluateJob(BaseModel):
    """One evaluation: what ``distill run`` and the RayJob both execute."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(description="Folder of the student checkpoint to evaluate.")
    teacher: str | None = Field(
        default=None, description="Folder of the teacher (its perplexity and latency)."
    )
    records: str = Field(description="Parquet of the teacher's answers on the eval split.")
    output: str = Field(description="Folder for the report, plots and model card.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    max_new_tokens: int = Field(default=512, ge=1)
    batch_size: int = Field(default=32, ge=1)
    train_metrics: str | None = Field(
        default=None, description="The train stage's metrics.jsonl, for the loss plot."
    )
    lineage: dict[str, str] = Field(
        default_factory=dict, description="Where the models and data came from (model card)."
    )


def perplexity(model: Any, records: list[Record], batch_size: int) -> float:
    """exp(mean negative log-likelihood) of ``model`` on the records' responses."""
    import torch

    from distillation_runtime.records import collate

    model.eval()
    total, count = 0.0, 0
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for start in range(0, len(records), batch_size):
        batch = collate(records[start : start + batch_size], pad, max_length=1_000_000)
        batch = batch.to(model.device)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = logits.float().log_softmax(-1).gather(-1, batch.targets.unsqueeze(-1))
        total -= float(logprobs.squeeze(-1)[batch.loss_mask].sum())
        count += batch.tokens
    return math.exp(total / count) if count else float("nan")


def teacher_kl(student: Any, teacher: Any, records: list[Record], batch_size: int) -> float:
    """Forward KL(teacher || student) over the whole vocabulary, mean over the records'
    response tokens: how much of the teacher's distribution, not only its answers, the student
    learned (what logit distillation is for). Both models must share the tokenizer."""
    import torch

    from distillation_runtime.losses import kd_divergence
    from distillation_runtime.records import collate

    student.eval()
    teacher.eval()
    total, count = 0.0, 0
    pad = student.config.pad_token_id if student.config.pad_token_id is not None else 0
    for start in range(0, len(records), batch_size):
        batch = collate(records[start : start + batch_size], pad, max_length=1_000_000)
        batch = batch.to(student.device)
        with torch.no_grad():
            ours = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            theirs = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.loss_mask
        if not mask.any():
            continue
        vocab = min(ours.shape[-1], theirs.shape[-1])
        mean = kd_divergence(
            ours[mask][:, :vocab],
            theirs[mask][:, :vocab],
            torch.ones(int(mask.sum()), dtype=torch.bool, device=mask.device),
            divergence="forwardKL",
        )
        total += float(mean) * int(mask.sum())
        count += int(mask.sum())
    return total / count if count else float("nan")


def _load(folder: str) -> tuple[Any, Any]:
    """A model and its tokenizer, loaded once per evaluation (on the GPU when there is one)."""
    from distillation_runtime.generation import load_for_inference

    return load_for_inference(folder)


def _answer(
    model: Any, tokenizer: Any, prompts: list[str], job: EvaluateJob
) -> tuple[list[Record], dict[str, float]]:
    """Greedy answers of ``model``, and its speed."""
    from distillation_runtime.generation import SamplingConfig, generate

    started = time.perf_counter()
    answers = generate(
        model,
        tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=job.max_new_tokens, batch_size=job.batch_size),
    )
    seconds = time.perf_counter() - started
    tokens = sum(len(a.response_ids) for a in answers)
    speed = {
        "seconds_per_prompt": seconds / max(1, len(prompts)),
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }
    return answers, speed


def gate_score(
    folder: str,
    records: list[Record],
    spec: EvaluateSpec,
    max_new_tokens: int,
    batch_size: int = 32,
) -> float:
    """The score of the model in ``folder`` on the gate's metric alone, measured as ``score``
    measures the student (the same prompts, greedy answers, references and perplexity): what
    the quantize stage compares a quantised student with the unquantised one by."""
    from distillation_runtime.generation import SamplingConfig, generate

    if spec.max_samples is not None:
        records = records[: spec.max_samples]
    model, tokenizer = _load(folder)
    metric = spec.gate.metric.value
    if metric not in TEXT_METRICS:
        return perplexity(model, records, batch_size)
    config = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = [a.response for a in generate(model, tokenizer, [r.prompt for r in records], config)]
    references = [r.reference for r in records]
    if references and all(ref is not None for ref in references):
        return mean_score(metric, answers, [ref or "" for ref in references])
    return mean_score(metric, answers, [r.response for r in records])


def model_cost(model: Any, folder: str, speed: dict[str, float]) -> dict[str, float]:
    """What serving a model costs: parameters, bytes on disk (compressed when quantised) and its
    measured speed here."""
    from distillation_runtime.demo import parameter_count
    from distillation_runtime.storage import folder_bytes

    return {
        "parameters": parameter_count(model),
        "bytes_on_disk": folder_bytes(Path(folder)),
        **speed,
    }


def cost_ratios(teacher: dict[str, float], student: dict[str, float]) -> dict[str, float]:
    """Teacher over student for sizes (4 = four times smaller), student over teacher for
    speed (4 = four times the tokens per second on the same hardware)."""
    ratios = {}
    for key, name in (("parameters", "parameters"), ("bytes_on_disk", "size")):
        if teacher.get(key) and student.get(key):
            ratios[name] = teacher[key] / student[key]
    if teacher.get("tokens_per_second") and student.get("tokens_per_second"):
        ratios["speedup"] = student["tokens_per_second"] / teacher["tokens_per_second"]
    return ratios


def score(job: EvaluateJob, teacher_records: list[Record]) -> dict[str, Any]:
    """Every number of the report (pure apart from running the models)."""
    spec = job.evaluate
    if spec.max_samples is not None:
        teacher_records = teacher_records[: spec.max_samples]
    prompts = [r.prompt for r in teacher_records]
    teacher_answers = [r.response for r in teacher_records]
    student, student_tokenizer = _load(job.student)
    teacher = _load(job.teacher) if job.teacher is not None else None
    student_records, student_speed = _answer(student, student_tokenizer, prompts, job)
    student_answers = [r.response for r in student_records]
    references = [r.reference for r in teacher_records]
    has_references = all(ref is not None for ref in references) and bool(references)

    teacher_scores: dict[str, float] = {}
    student_scores: dict[str, float] = {}
    agreement: dict[str, float] = {}
    for metric in (m.value for m in spec.metrics):
        if metric in TEXT_METRICS:
            agreement[metric] = mean_score(metric, student_answers, teacher_answers)
            if has_references:
                refs = [r or "" for r in references]
                teacher_scores[metric] = mean_score(metric, teacher_answers, refs)
                student_scores[metric] = mean_score(metric, student_answers, refs)
            else:  # the teacher's answers are the reference: the teacher scores 1 by definition
                teacher_scores[metric] = 1.0
                student_scores[metric] = agreement[metric]
    teacher_speed: dict[str, float] = {}
    if "perplexity" in {m.value for m in spec.metrics}:
        student_scores["perplexity"] = perplexity(student, teacher_records, job.batch_size)
        if teacher is not None:
            teacher_scores["perplexity"] = perplexity(teacher[0], teacher_records, job.batch_size)
    if teacher is not None:
        _, teacher_speed = _answer(*teacher, prompts, job)
    cost = {"student": model_cost(student, job.student, student_speed)}
    if teacher is not None and job.teacher is not None:
        cost["teacher"] = model_cost(teacher[0], job.teacher, teacher_speed)
        cost["ratio"] = cost_ratios(cost["teacher"], cost["student"])

    checks: dict[str, dict[str, float]] = {}
    if spec.checks is not None and spec.checks.pattern is not None:
        checks["pattern"] = {
            "teacher": pattern_pass_rate(teacher_answers, spec.checks.pattern),
            "student": pattern_pass_rate(student_answers, spec.checks.pattern),
        }
    if spec.checks is not None and spec.checks.valid_json:
        checks["validJson"] = {
            "teacher": json_pass_rate(teacher_answers),
            "student": json_pass_rate(student_answers),
        }
    retentions = {
        m: retention(m, student_scores[m], teacher_scores[m]) if m in teacher_scores else None
        for m in student_scores
    }
    gate = check_gate(spec.gate.metric.value, float(spec.gate.min_retention), retentions)
    return {
        "samples": len(teacher_records),
        "reference": "dataset" if has_references else "teacher",
        "teacher": teacher_scores,
        "student": student_scores,
        "agreement_with_teacher": agreement,
        "checks": checks,
        "retention": retentions,
        "gate": asdict(gate),
        "speed": {"student": student_speed, "teacher": teacher_speed},
        "cost": cost,
        "lineage": job.lineage,
        "examples": [
            {"prompt": p, "teacher": t, "student": s}
            for p, t, s in list(zip(prompts, teacher_answers, student_answers, strict=True))[:5]
        ],
    }


def plot_scores(report: dict[str, Any], path: Path) -> None:
    """Teacher vs student bars, one pair per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted(report["student"])
    figure, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        values = [report["teacher"].get(metric, float("nan")), report["student"][metric]]
        axis.bar(["teacher", "student"], values, color=["#4c72b0", "#dd8452"])
        axis.set_title(metric)
    figure.suptitle(f"gate: {report['gate']['message']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_losses(metrics_file: Path, path: Path) -> None:
    """Training loss curves, one line per loss part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    parts = [k for k in ("loss", "response", "logits", "features") if lines and k in lines[0]]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for part in parts:
        axis.plot([x["step"] for x in lines], [x[part] for x in lines], label=part)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _count(value: float) -> str:
    """1234567 -> 1.23M."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def cost_table(report: dict[str, Any]) -> str:
    """One table a manager can read: what the student costs beside what it keeps."""
    cost = report.get("cost") or {}
    teacher, student, ratio = (
        cost.get("teacher", {}),
        cost.get("student", {}),
        cost.get("ratio", {}),
    )
    gate = report["gate"]

    def row(label: str, key: str, shown: Any, ratio_key: str | None, smaller: bool) -> str:
        t = shown(teacher[key]) if key in teacher else "-"
        s = shown(student[key]) if key in student else "-"
        r = ratio.get(ratio_key or "")
        relation = "" if r is None else f"{r:.2f}x {'smaller' if smaller else 'faster'}"
        return f"| {label} | {t} | {s} | {relation} |"

    rows = [
        row("parameters", "parameters", _count, "parameters", True),
        row("size on disk", "bytes_on_disk", lambda b: _count(b) + "B", "size", True),
        row(
            "tokens/s (this hardware)", "tokens_per_second", lambda v: f"{v:.1f}", "speedup", False
        ),
        row("seconds per prompt", "seconds_per_prompt", lambda v: f"{v:.3f}", None, False),
    ]
    kept = gate.get("retention")
    quality = (
        f"| quality kept ({gate['metric']}) | 1.00 | {kept:.2f} | gate: {gate['threshold']} |"
        if kept is not None
        else f"| quality kept ({gate['metric']}) | - | - | not measured |"
    )
    header = "| | teacher | student | student vs teacher |\n|---|---|---|---|"
    return "\n".join([header, *rows, quality])


def model_card(report: dict[str, Any]) -> str:
    """The student's model card: lineage, data, metrics, gate, and honest limits."""
    rows = "\n".join(
        f"| {m} | {report['teacher'].get(m, float('nan')):.4f} | {report['student'][m]:.4f} | "
        f"{'' if report['retention'].get(m) is None else format(report['retention'][m], '.4f')} |"
        for m in sorted(report["student"])
    )
    lineage = (
        "\n".join(f"- {k}: {v}" for k, v in sorted(report["lineage"].items())) or "- (not recorded)"
    )
    gate = report["gate"]
    return f"""# Distilled student

{"PASSED" if gate["passed"] else "FAILED"} the quality gate: {gate["message"]}.

## Cost and quality
{cost_table(report)}

## Lineage
{lineage}

## Evaluation
{report["samples"]} held-out prompts of the workload; reference answers: {report["reference"]}.

| metric | teacher | student | retention |
|---|---|---|---|
{rows}

## Limits
- A distilled student learns its teacher's answers, including the teacher's mistakes; it is
  measured against the teacher here, so errors they share are not counted against it.
- The numbers hold for prompts like the held-out ones; other traffic may differ.
"""


def run(job: EvaluateJob) -> dict[str, Any]:
    """Evaluate, write the report, plots and model card; return the report."""
    from distillation_runtime.records import read_parquet

    output = Path(job.output)
    output.mkdir(parents=True, exist_ok=True)
    report = score(job, read_parquet(Path(job.records)))
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    plot_scores(report, output / "scores.png")
    if job.train_metrics is not None and Path(job.train_metrics).exists():
        plot_losses(Path(job.train_metrics), output / "loss.png")
    (output / MODEL_CARD).write_text(model_card(report))
    return report


def student_source(context: StageContext, stage: str) -> str:
    """The stage whose student ``stage`` evaluates: its input with the student role (the
    trained student, or the quantised one)."""
    inputs = context.plan[stage].inputs
    sources = [i for i in inputs if Role.STUDENT in context.plan[i].definition.roles]
    if len(sources) != 1:
        raise ValueError(f"stage {stage} must read exactly one student stage, reads {inputs}")
    return sources[0]


def cost_metrics(cost: dict[str, Any]) -> dict[str, float]:
    """The cost figures for status.metrics (camelCase, beside the quality ones)."""
    names = {
        "parameters": "parameters",
        "bytes_on_disk": "bytesOnDisk",
        "tokens_per_second": "tokensPerSecond",
    }
    found = {
        f"{side}.{name}": cost[side][key]
        for side in ("teacher", "student")
        for key, name in names.items()
        if key in cost.get(side, {})
    }
    ratio_names = {"parameters": "parameterRatio", "size": "sizeRatio", "speedup": "speedup"}
    found.update({ratio_names[k]: v for k, v in cost.get("ratio", {}).items()})
    return found


def execute(context: StageContext, folder: Path) -> StageResult:
    """The stage: the student of the planned stage being run, against the teacher."""
    return evaluate_student(context, folder, student_source(context, context.current))


def evaluate_student(context: StageContext, folder: Path, source: str) -> StageResult:
    """The student of ``source`` (trained, or trained then quantised) against the teacher: the
    same prompts, metrics and gate either way."""
    from distillation_runtime.stages.generate import EVAL_FILE
    from distillation_runtime.stages.train import METRICS_FILE

    spec = context.spec
    trained = context.local(context.artifact("train"))
    student = context.local(context.artifact(source))
    generated = context.local(context.artifact("generate"))
    lineage = {
        "teacher": spec.teacher.model,
        "student (start)": spec.student.model or f"pruned teacher ({context.artifact('prune')})",
        "data": spec.dataset.prompts,
        "train artifact": context.artifact("train"),
    }
    if source != "train":
        lineage[f"{source} artifact"] = context.artifact(source)
    job = EvaluateJob(
        student=str(student / MODEL_DIR),
        teacher=str(context.local(spec.teacher.model)),
        records=str(generated / EVAL_FILE),
        output=str(folder),
        evaluate=spec.evaluate,
        max_new_tokens=spec.generate.max_new_tokens,
        train_metrics=str(trained / METRICS_FILE),
        lineage=lineage,
    )
    report = run(job)
    gate = report["gate"]
    metrics = {
        "gatePassed": gate["passed"],
        "gateMetric": gate["metric"],
        "retention": gate["retention"],
        **{f"student.{k}": v for k, v in report["student"].items()},
        **{f"teacher.{k}": v for k, v in report["teacher"].items()},
        **cost_metrics(report["cost"]),
    }
    inputs = {source: context.artifact(source), "generate": context.artifact("generate")}
    return StageResult(metrics, inputs)
