"""Run a plan locally (``distill run``): every stage in order, complete ones skipped.

Each stage reads its inputs' artifacts, works in a local folder, and publishes
``<output>/<stage>-<fingerprint>/`` with a manifest, the completion marker last
(``storage.write_artifact``). The train stage works in a stable folder
(``<output>/_work/train-<fingerprint>`` on a file system, else ``<work>/train-<fingerprint>``),
so a run killed mid-training resumes from its last checkpoint.

The same stage functions run inside the operator's RayJobs (``distill stage``); only where the
inputs come from differs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distillation_runtime.plan import Plan, Stage, make_plan
from distillation_runtime.raycluster import WorkerNode, cluster_workers, in_ray_job, ran_on, run_on
from distillation_runtime.spec import PipelineSpec, SpecError
from distillation_runtime.stages import definition, spec_problems
from distillation_runtime.stages.base import resolve


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
    """Runs the stages of one spec on this machine (the ``StageContext`` each stage gets)."""

    def __init__(
        self,
        spec: PipelineSpec,
        *,
        log: Callable[[str], None] | None = None,
        artifacts: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.plan: Plan = make_plan(spec)
        self.artifacts = dict(artifacts or {})
        """Artifact URIs given by whoever planned the run (the operator's RayJob), which win
        over this runtime's own plan: the stage writes and reads exactly where they said."""
        self.work = work_dir()
        self.current = ""
        self._log = log or (lambda text: print(text, file=sys.stderr))

    def log(self, text: str) -> None:
        self._log(text)

    def local(self, uri: str) -> Path:
        from distillation_runtime.storage import local_model

        return local_model(uri, self.work / "models")

    def artifact(self, name: str) -> str:
        return self.artifacts.get(name) or self.plan.artifact(name)

    def check_requirements(self, pending: list[str]) -> None:
        """What the pending stages need installed (their table's ``requires``), checked before
        the first stage runs rather than after hours of training."""
        for name in pending:
            requirement = definition(name).requires
            if requirement is not None:
                resolve(requirement)()

    def run(self) -> list[StageOutcome]:
        """Every stage in plan order, complete ones reused; a ``SpecError`` as soon as a stage
        (the preflight) finds the spec cannot run with these models and data."""
        from distillation_runtime.storage import artifact_complete

        pending = [s.name for s in self.plan.stages if not artifact_complete(self.artifact(s.name))]
        self.check_requirements(pending)
        outcomes = []
        for stage in self.plan.stages:
            uri = self.artifact(stage.name)
            if artifact_complete(uri):
                self.log(f"{stage.name}: complete, reused ({uri})")
                outcomes.append(
                    StageOutcome(stage.name, "reused", uri, 0.0, self.metrics(stage.name))
                )
            else:
                self.log(f"{stage.name}: running -> {uri}")
                outcomes.append(self.run_stage(stage))
            refused = spec_problems(outcomes[-1].metrics)
            if refused:
                raise SpecError(refused)
        return outcomes

    def metrics(self, name: str) -> dict[str, Any]:
        """The metrics in the manifest of stage ``name``'s complete artifact."""
        from distillation_runtime.storage import read_manifest

        return dict(read_manifest(self.artifact(name)).get("metrics", {}))

    def run_stage(self, stage: Stage) -> StageOutcome:
        """Run one stage and publish its artifact. In a Ray job's driver (on the head, which has
        no CPUs or GPUs to work with), a stage that does not spread its own work over Ray
        workers is sent whole to a worker node (``raycluster``)."""
        node = self.worker_for(stage)
        if node is None:
            return self.run_stage_here(stage)
        self.log(
            f"{stage.name}: on Ray worker node {node.address} ({node.cpus:g} CPUs, "
            f"{node.gpus:g} GPUs)"
        )
        return run_on(node, run_stage_on_worker, self.spec, self.artifacts, stage.name)

    def worker_for(self, stage: Stage) -> WorkerNode | None:
        """The node to send ``stage`` to; None to run it in this process (no Ray job, a stage
        that spreads its own work, or a cluster with no worker nodes: the preflight's)."""
        if not in_ray_job() or stage.definition.spreads(self.spec):
            return None
        nodes = cluster_workers()
        return nodes[0] if nodes else None

    def run_stage_here(self, stage: Stage) -> StageOutcome:
        """Run one stage in a staging folder in this process and publish it as its artifact
        (manifest, then the completion marker)."""
        from distillation_runtime.storage import make_manifest, staging_dir, write_artifact

        uri = self.artifact(stage.name)
        started = datetime.now(UTC)
        self.current = stage.name
        with staging_dir() as folder:
            result = stage.definition.function()(self, folder)
            finished = datetime.now(UTC)
            manifest = make_manifest(
                stage.name, stage.config, result.inputs, result.metrics, started, finished
            )
            manifest["fingerprint"] = stage.fingerprint
            manifest["ranOn"] = ran_on()
            write_artifact(uri, folder, manifest)
        seconds = (finished - started).total_seconds()
        return StageOutcome(stage.name, "ran", uri, seconds, result.metrics)


def run_stage_on_worker(spec: PipelineSpec, artifacts: dict[str, str], name: str) -> StageOutcome:
    """``Runner.run_stage``'s Ray task on a worker node: the same stage, run there."""
    runner = Runner(spec, artifacts=artifacts)
    return runner.run_stage_here(runner.plan[name])


def results_table(outcomes: list[StageOutcome]) -> str:
    """The closing table of ``distill run``."""
    rows = [("stage", "state", "seconds", "key results", "artifact")]
    for o in outcomes:
        keys = definition(o.name).results
        shown = ", ".join(f"{k}={o.metrics[k]}" for k in keys if k in o.metrics)
        rows.append((o.name, o.state, f"{o.seconds:.1f}", shown, o.artifact))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
