"""A local KubeRay STAND-IN: it runs each RayJob's own entrypoint as a local process.

The test control plane has no kubelet, so no Ray pod can start and the real KubeRay operator
could only wait for one. This stand-in takes KubeRay's place for the demo. For every RayJob in
the namespace it:

1. writes the status KubeRay writes when it picks a job up (``jobDeploymentStatus:
   Initializing`` with ``startTime``), then ``Running`` with Ray's ``jobStatus: RUNNING``;
2. runs the job's ``spec.entrypoint`` (shlex-split; ``distill`` is this environment's distill)
   with the ``env_vars`` of its ``spec.runtimeEnvYAML`` (``DISTILL_SPEC``), the plain ``env`` of
   its head container, and ``DISTILL_PVC_ROOT`` pointing at the demo's local claims folder (the
   pods would mount the claims there). The stages start a local Ray themselves when they need
   one (generate's Ray Data), as a driver on a real head node would find one;
3. at the end writes ``Complete``/``SUCCEEDED`` with ``endTime`` and Ray's message, or
   ``Failed``/``FAILED`` with reason ``AppFailed`` and the tail of the driver's stderr as the
   message, as KubeRay does.

A RayJob deleted while it runs (the operator replaced it, or the Distillation was deleted) has
its process group killed. ``spec.suspend`` is honoured the simple way: a suspended job is not
started, and a running one that gets suspended is killed and reported ``Suspended``. One RayJob
runs at a time (two CPUs); the others wait, as they would for a free node. What it does not do:
create a RayCluster, pods or a submitter Job, or look at images and resources.

Each finished run is appended to ``<work>/kuberay-stand-in.jsonl`` (job, entrypoint, the
command run, exit code, seconds), so the demo's test can check that every RayJob ran its own
entrypoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from demo_common import KUBERAY_STAND_IN, Printer, child_env, distill_command, tail

from support.kserve import now

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
POLL_SECONDS = 0.5
KILL_GRACE_SECONDS = 10.0
SUCCESS_MESSAGE = "Job finished successfully."
"""Ray's message for a job that ended with exit status 0, which KubeRay copies."""


@dataclass
class Run:
    """One RayJob's driver process, started by the stand-in."""

    name: str
    uid: str
    stage: str
    entrypoint: str
    command: list[str]
    process: subprocess.Popen[bytes]
    stderr: Path
    started: float = field(default_factory=time.monotonic)


def command_for(entrypoint: str) -> list[str]:
    """The argv the stand-in runs for ``entrypoint``: shlex-split, with ``distill`` as this
    environment's distill. Anything but a ``distill`` entrypoint is refused (``ValueError``):
    the demo runs on the user's machine, and the operator never builds another."""
    argv = shlex.split(entrypoint)
    if not argv or argv[0] != "distill":
        raise ValueError(
            f"the {KUBERAY_STAND_IN} runs only `distill ...` entrypoints, got {entrypoint!r}"
        )
    return [*distill_command(), *argv[1:]]


def runtime_env_vars(rayjob: dict[str, Any]) -> dict[str, str]:
    """``env_vars`` of the RayJob's ``runtimeEnvYAML``: what Ray sets for the driver."""
    text = (rayjob.get("spec") or {}).get("runtimeEnvYAML") or ""
    runtime_env = yaml.safe_load(text) or {}
    return {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}


def head_env(rayjob: dict[str, Any]) -> dict[str, str]:
    """The plain (``value``) env of the head container, where a K8sJobMode driver runs; secret
    references are skipped (the demo has no secrets)."""
    cluster = (rayjob.get("spec") or {}).get("rayClusterSpec") or {}
    pod = ((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
    containers = pod.get("containers") or [{}]
    entries = containers[0].get("env") or []
    return {e["name"]: str(e["value"]) for e in entries if "value" in e}


class KubeRayStandIn:
    """Plays KubeRay for the RayJobs of one namespace (see the module docstring)."""

    def __init__(
        self, api: Any, namespace: str, pvc_root: Path, work: Path, printer: Printer
    ) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.pvc_root = pvc_root
        self.work = work
        self.printer = printer
        self.current: Run | None = None
        self.done: set[str] = set()
        """UIDs of RayJobs that reached a final status (never started again)."""
        self.record = work / "kuberay-stand-in.jsonl"

    def say(self, text: str) -> None:
        self.printer.say(text, KUBERAY_STAND_IN)

    def serve_forever(self, stop: threading.Event) -> None:
        """Poll the namespace's RayJobs until ``stop``; an API error is said and retried, so a
        hiccup of the API server does not end the demo."""
        while not stop.is_set():
            try:
                self.step()
            except Exception as err:  # keep playing KubeRay: say what happened, retry
                if not stop.is_set():  # else the demo is ending and takes the API with it
                    self.say(f"error (retrying): {err}")
            stop.wait(POLL_SECONDS)
        self.stop()

    def step(self) -> None:
        """One level-based pass: notice a deleted or suspended running job, a finished driver,
        and start the next job that waits."""
        jobs: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL
        )
        items: list[dict[str, Any]] = sorted(
            jobs["items"], key=lambda j: j["metadata"]["creationTimestamp"]
        )
        by_uid = {j["metadata"]["uid"]: j for j in items}
        if self.current is not None:
            self.follow(by_uid.get(self.current.uid))
        if self.current is None:
            for job in items:
                if self.wants_start(job):
                    self.start(job)
                    break
        for job in items:
            if job["metadata"]["uid"] != getattr(self.current, "uid", None):
                self.hold_if_suspended(job)

    def wants_start(self, job: dict[str, Any]) -> bool:
        """A job KubeRay would run now: not finished, not being deleted, not suspended."""
        meta, status = job["metadata"], job.get("status") or {}
        return (
            meta["uid"] not in self.done
            and not meta.get("deletionTimestamp")
            and not (job.get("spec") or {}).get("suspend")
            and status.get("jobDeploymentStatus", "") in ("", "New", "Initializing", "Suspended")
        )

    def hold_if_suspended(self, job: dict[str, Any]) -> None:
        """A new job created suspended (Kueue's way) is reported ``Suspended``, as KubeRay does."""
        status = job.get("status") or {}
        if (job.get("spec") or {}).get("suspend") and not status.get("jobDeploymentStatus"):
            self.patch(job, {"jobDeploymentStatus": "Suspended"})

    def start(self, job: dict[str, Any]) -> None:
        """Initializing, then the driver process, then Running (KubeRay's first transitions)."""
        meta = job["metadata"]
        name, stage = meta["name"], (meta.get("labels") or {}).get("distillation.dev/stage", "")
        entrypoint = (job.get("spec") or {}).get("entrypoint") or ""
        started = now()
        self.patch(job, {"jobDeploymentStatus": "Initializing", "startTime": started})
        folder = self.work / "rayjobs" / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            command = command_for(entrypoint)
        except ValueError as err:
            (folder / "driver.err").write_text(f"{err}\n")
            self.done.add(meta["uid"])
            self.finish(job, folder / "driver.err", 1, started)
            return
        env = child_env(
            self.pvc_root,
            {
                **head_env(job),
                **runtime_env_vars(job),
                # the pod's scratch (model cache, resumable training): its own, as a pod's is
                "DISTILL_WORK_DIR": str(folder / "scratch"),
            },
        )
        # a local Ray of the stage's own, never a cluster this shell happens to point at
        env.pop("RAY_ADDRESS", None)
        with (
            (folder / "driver.out").open("wb") as stdout,
            (folder / "driver.err").open("wb") as stderr,
        ):
            process = subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: Ray's processes die with it
            )
        self.current = Run(
            name, meta["uid"], stage, entrypoint, command, process, folder / "driver.err"
        )
        self.patch(
            job,
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": started},
        )
        self.say(f"{name}: Running `{entrypoint}` (pid {process.pid}, logs {folder})")

    def follow(self, job: dict[str, Any] | None) -> None:
        """The running job: killed when deleted or suspended, reported when its driver ended."""
        run = self.current
        assert run is not None
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.kill(run)
            self.say(
                f"{run.name}: deleted while running; its driver (pid {run.process.pid}) killed"
            )
            self.done.add(run.uid)
            self.current = None
            return
        if (job.get("spec") or {}).get("suspend"):
            self.kill(run)
            self.patch(job, {"jobDeploymentStatus": "Suspended", "jobStatus": "STOPPED"})
            self.say(f"{run.name}: suspended; its driver killed")
            self.current = None
            return
        code = run.process.poll()
        if code is None:
            return
        self.done.add(run.uid)
        self.current = None
        self.reap_group(run)
        self.finish(job, run.stderr, code, (job.get("status") or {}).get("startTime") or now())
        self.log_run(run, code)

    def finish(self, job: dict[str, Any], stderr: Path, code: int, started: str) -> None:
        """KubeRay's final status: Complete/SUCCEEDED, or Failed/FAILED with the stderr tail."""
        name = job["metadata"]["name"]
        if code == 0:
            status = {
                "jobDeploymentStatus": "Complete",
                "jobStatus": "SUCCEEDED",
                "message": SUCCESS_MESSAGE,
                "startTime": started,
                "endTime": now(),
                "succeeded": 1,
            }
            self.say(f"{name}: Complete/SUCCEEDED")
        else:
            message = f"Job failed with exit code {code}; driver stderr:\n{tail(stderr)}"
            status = {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": message,
                "startTime": started,
                "endTime": now(),
                "failed": 1,
            }
            self.say(
                f"{name}: Failed/FAILED (exit {code}); the tail of its stderr:\n{tail(stderr)}"
            )
        self.patch(job, status)

    def log_run(self, run: Run, code: int) -> None:
        """Append the run to the stand-in's record (what the demo's test reads)."""
        entry = {
            "rayjob": run.name,
            "stage": run.stage,
            "entrypoint": run.entrypoint,
            "command": run.command,
            "exitCode": code,
            "seconds": round(time.monotonic() - run.started, 1),
        }
        with self.record.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def patch(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge ``status`` into the RayJob's status subresource (``observedGeneration`` too, as
        KubeRay v1.5 writes it)."""
        from kubernetes.client.exceptions import ApiException

        body = {"status": {**status, "observedGeneration": job["metadata"].get("generation")}}
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, job["metadata"]["name"], body
            )
        except ApiException as err:
            if err.status != 404:  # deleted meanwhile: nothing to report on
                raise

    @staticmethod
    def kill(run: Run) -> None:
        """SIGTERM to the driver's process group, SIGKILL after a grace period."""
        for signum, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, 30.0)):
            if run.process.poll() is not None:
                break
            try:
                os.killpg(run.process.pid, signum)
            except ProcessLookupError:
                break
            try:
                run.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        KubeRayStandIn.reap_group(run)

    @staticmethod
    def reap_group(run: Run) -> None:
        """SIGKILL what is left of the driver's process group (a local Ray's helpers that
        outlived the driver), as a pod's end takes its processes with it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Kill a driver still running (the demo is ending)."""
        if self.current is not None:
            self.kill(self.current)
            self.say(f"{self.current.name}: stopped with the demo")
            self.current = None
