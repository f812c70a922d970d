"""Run a plan locally (``distill run``): every stage in order, complete ones skipped.

Each stage reads its inputs' artifacts, works in a local folder, and publishes
``<output>/<stage>-<fingerprint>/`` with a manifest, the completion marker last
(``storage.write_artifact``). The train stage works in a stable folder
(``<work>/train-<fingerprint>``), so a run killed mid-training resumes from its last checkpoint.

The same stage functions run inside the operator's RayJobs (``distill stage``); only where the
inputs come from differs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distillation_runtime.plan import Plan, Stage, StageName, make_plan
from distillation_runtime.spec import PipelineSpec


@dataclass(frozen=True)
class StageOutcome:
    """What happened to one stage in this run."""

    name: str
    state: str  # "ran", "reused"
    artifact: str
    seconds: float
    metrics: dict[str, Any]


def work_dir() -> Path:
    """Local scratch for models downloaded from hubs/object stores and for resumable training."""
    root = os.environ.get("DISTILL_WORK_DIR")
    return Path(root) if root else Path.home() / ".cache" / "distillation-operator" / "work"


class Runner:
    """Runs the stages of one spec on this machine."""

    def __init__(self, spec: PipelineSpec, *, log: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.plan: Plan = make_plan(spec)
        self.work = work_dir()
        self.log = log or (lambda text: print(text, file=sys.stderr))

    def local(self, uri: str) -> Path:
        from distillation_runtime.storage import local_model

        return local_model(uri, self.work / "models")

    def artifact(self, name: StageName) -> str:
        return self.plan.artifact(name)

    def run(self) -> list[StageOutcome]:
        from distillation_runtime.storage import artifact_complete

        pending = [s.name for s in self.plan.stages if not artifact_complete(self.artifact(s.name))]
        if StageName.QUANTIZE in pending:
            from distillation_runtime.stages.quantize import require_llmcompressor

            require_llmcompressor()  # before hours of training, not after
        outcomes = []
        for stage in self.plan.stages:
            uri = self.artifact(stage.name)
            if artifact_complete(uri):
                self.log(f"{stage.name.value}: complete, reused ({uri})")
                outcomes.append(
                    StageOutcome(stage.name.value, "reused", uri, 0.0, self._metrics(uri))
                )
                continue
            self.log(f"{stage.name.value}: running -> {uri}")
            outcomes.append(self.run_stage(stage))
        return outcomes

    def _metrics(self, uri: str) -> dict[str, Any]:
        from distillation_runtime.storage import read_manifest

        return dict(read_manifest(uri).get("metrics", {}))

    def run_stage(self, stage: Stage) -> StageOutcome:
        from distillation_runtime.storage import make_manifest, staging_dir, write_artifact

        runners: dict[StageName, Callable[[Path], tuple[dict[str, Any], dict[str, str]]]] = {
            StageName.PRUNE: self._prune,
            StageName.GENERATE: self._generate,
            StageName.TRAIN: self._train,
            StageName.EVALUATE: self._evaluate,
            StageName.QUANTIZE: self._quantize,
            StageName.EVALUATE_QUANTIZED: self._evaluate_quantized,
        }
        uri = self.artifact(stage.name)
        started = datetime.now(UTC)
        with staging_dir() as folder:
            metrics, inputs = runners[stage.name](folder)
            finished = datetime.now(UTC)
            manifest = make_manifest(
                stage.name.value, stage.config, inputs, metrics, started, finished
            )
            manifest["fingerprint"] = stage.fingerprint
            write_artifact(uri, folder, manifest)
        seconds = (finished - started).total_seconds()
        return StageOutcome(stage.name.value, "ran", uri, seconds, metrics)

    # ---------------------------------------------------------------- stages

    def importance_key(self) -> str:
        """What the prune stage's importance scores depend on: the teacher and the calibration
        prompts, not the target. Two prunes with the same key share one set of scores."""
        import hashlib

        prune = self.spec.student.prune
        assert prune is not None
        canonical = json.dumps(
            {
                "teacher": self.spec.teacher.model_dump(mode="json", by_alias=True),
                "dataset": self.spec.dataset.model_dump(mode="json", by_alias=True),
                "calibrationSamples": prune.calibration_samples,
                "depthImportance": prune.depth_importance.value,
            },
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def saved_importance(self, key: str) -> Path | None:
        """The importance scores of a complete earlier prune artifact under the same output with
        the same key, fetched to a local file; None when there is none."""
        from distillation_runtime.stages.prune import IMPORTANCE_FILE
        from distillation_runtime.storage import artifact_complete, filesystem, read_manifest

        fs, root = filesystem(self.spec.output)
        for folder in sorted(fs.glob(f"{root}/prune-*")):
            uri = f"{self.spec.output.rstrip('/')}/{folder.rstrip('/').rsplit('/', 1)[-1]}"
            if not artifact_complete(uri):
                continue
            if read_manifest(uri).get("metrics", {}).get("importanceKey") != key:
                continue
            local = self.work / f"importance-{key}.safetensors"
            fs.get(f"{folder}/{IMPORTANCE_FILE}", str(local))
            return local
        return None

    def _prune(self, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
        from transformers import AutoTokenizer

        from distillation_runtime.data import load_prompts
        from distillation_runtime.stages.prune import PruneJob, run

        prune = self.spec.student.prune
        assert prune is not None
        teacher = self.local(self.spec.teacher.model)
        key = self.importance_key()
        saved = self.saved_importance(key)
        prompts: list[str] = []
        if saved is None:
            loaded = load_prompts(self.spec.dataset, AutoTokenizer.from_pretrained(teacher))
            prompts = [p.text for p in loaded.train[: prune.calibration_samples]]
        else:
            self.log(f"prune: reusing importance scores {key} (no forward passes)")
        job = PruneJob.from_spec(
            prune,
            teacher=str(teacher),
            prompts=prompts,
            output=str(folder),
            importance=str(saved) if saved else None,
            dtype=self.spec.teacher.dtype,
        )
        result = run(job)
        metrics = {
            "architecture": result.architecture,
            "teacherParameters": result.teacher_parameters,
            "studentParameters": result.student_parameters,
            "keptLayers": result.kept_layers,
            "student": result.student,
            "calibrationSamples": result.calibration_samples,
            "importanceReused": result.importance_reused,
            "importanceKey": key,
        }
        return metrics, {}

    def _generate(self, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
        from transformers import AutoTokenizer

        from distillation_runtime.data import load_prompts
        from distillation_runtime.stages import generate

        teacher = self.local(self.spec.teacher.model)
        prompts = load_prompts(self.spec.dataset, AutoTokenizer.from_pretrained(teacher))
        items = [generate.PromptItem(p.text, "train", p.reference) for p in prompts.train]
        items += [generate.PromptItem(p.text, "eval", p.reference) for p in prompts.eval]
        result = generate.run(
            str(teacher),
            items,
            self.spec.generate,
            folder,
            tensor_parallel_size=self.spec.teacher.tensor_parallel_size,
        )
        metrics = {
            "prompts": len(items),
            "trainPrompts": len(prompts.train),
            "evalPrompts": len(prompts.eval),
            "duplicatesDropped": prompts.duplicates,
            "records": result.records,
            "responseTokens": result.response_tokens,
            "tokensPerSecond": round(result.response_tokens / max(result.seconds, 1e-9), 2),
            "bytesPerToken": round(result.bytes_per_token, 2),
            "backend": result.backend,
        }
        return metrics, {}

    def _train(self, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
        import shutil

        from distillation_runtime.stages.train import FINAL_MODEL, METRICS_FILE, TrainJob, run

        stage = self.plan[StageName.TRAIN]
        from distillation_runtime.stages.prune import MODEL_DIR

        generated = self.local(self.artifact(StageName.GENERATE))
        if self.spec.student.model is not None:
            student = self.local(self.spec.student.model)
        else:
            student = self.local(self.artifact(StageName.PRUNE)) / MODEL_DIR
        job = TrainJob(
            student=str(student),
            teacher=str(self.local(self.spec.teacher.model)),
            data=str(generated / "train.parquet"),
            output=str(self.work / f"train-{stage.fingerprint}"),
            train=self.spec.train,
        )
        model = run(job)
        shutil.copytree(model, folder / FINAL_MODEL)
        shutil.copy(Path(job.output) / METRICS_FILE, folder / METRICS_FILE)
        lines = [json.loads(x) for x in (folder / METRICS_FILE).read_text().splitlines() if x]
        metrics = {"steps": len(lines), "finalLoss": lines[-1]["loss"] if lines else None}
        return metrics, {"generate": self.artifact(StageName.GENERATE)}

    def _quantize(self, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
        from distillation_runtime.stages.quantize import QuantizeJob, run

        assert self.spec.quantize is not None
        trained = self.local(self.artifact(StageName.TRAIN))
        generated = self.local(self.artifact(StageName.GENERATE))
        result = run(
            QuantizeJob(
                model=str(trained / "model"),
                output=str(folder),
                quantize=self.spec.quantize,
                calibration=str(generated / "train.parquet"),
                max_seq_length=self.spec.train.max_seq_length,
            )
        )
        metrics = {
            "scheme": result.scheme,
            "format": result.format,
            "minComputeCapability": result.min_compute_capability,
            "ignored": result.ignored,
            "sizeBytesBefore": result.size_bytes_before,
            "sizeBytesAfter": result.size_bytes_after,
            "groupSize": result.group_size,
            "compression": round(result.compression, 3),
            "calibrationSamples": result.calibration_samples,
        }
        inputs = {
            "train": self.artifact(StageName.TRAIN),
            "generate": self.artifact(StageName.GENERATE),
        }
        return metrics, inputs

    def _evaluate(self, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
        return self._evaluate_student(folder, StageName.TRAIN)

    def _evaluate_quantized(self, folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
        return self._evaluate_student(folder, StageName.QUANTIZE)

    def _evaluate_student(
        self, folder: Path, source: StageName
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The evaluate stage on the student of ``source`` (trained, or trained then
        quantised): the same prompts, metrics and gate either way."""
        from distillation_runtime.stages.evaluate import EvaluateJob, run

        trained = self.local(self.artifact(StageName.TRAIN))
        student = self.local(self.artifact(source))
        generated = self.local(self.artifact(StageName.GENERATE))
        job = EvaluateJob(
            student=str(student / "model"),
            teacher=str(self.local(self.spec.teacher.model)),
            records=str(generated / "eval.parquet"),
            output=str(folder),
            evaluate=self.spec.evaluate,
            max_new_tokens=self.spec.generate.max_new_tokens,
            train_metrics=str(trained / "metrics.jsonl"),
            lineage={
                "teacher": self.spec.teacher.model,
                "student (start)": self.spec.student.model
                or f"pruned teacher ({self.artifact(StageName.PRUNE)})",
                "data": self.spec.dataset.prompts,
                "train artifact": self.artifact(StageName.TRAIN),
                **(
                    {"quantize artifact": self.artifact(StageName.QUANTIZE)}
                    if source is StageName.QUANTIZE
                    else {}
                ),
            },
        )
        report = run(job)
        gate = report["gate"]
        metrics = {
            "gatePassed": gate["passed"],
            "gateMetric": gate["metric"],
            "retention": gate["retention"],
            **{f"student.{k}": v for k, v in report["student"].items()},
            **{f"teacher.{k}": v for k, v in report["teacher"].items()},
        }
        inputs = {
            source.value: self.artifact(source),
            "generate": self.artifact(StageName.GENERATE),
        }
        return metrics, inputs


def results_table(outcomes: list[StageOutcome]) -> str:
    """The closing table of ``distill run``."""
    rows = [("stage", "state", "seconds", "key results", "artifact")]
    for o in outcomes:
        keys = (
            "gatePassed",
            "retention",
            "finalLoss",
            "steps",
            "records",
            "tokensPerSecond",
            "studentParameters",
            "scheme",
            "compression",
        )
        shown = ", ".join(f"{k}={o.metrics[k]}" for k in keys if k in o.metrics)
        rows.append((o.name, o.state, f"{o.seconds:.1f}", shown, o.artifact))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
