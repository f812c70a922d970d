"""``make demo``: one Distillation from ``kubectl apply`` to a served student, on this machine.

What it starts, in order, and stops again at the end (or on Ctrl-C):

1. the test control plane (``hack/testcluster``: a real kube-apiserver with etcd and the garbage
   collector; no kubelet) with the Distillation CRD and the upstream KubeRay and KServe CRDs;
2. the operator, as ``kopf run`` the way the chart runs it;
3. two STAND-INS for what cannot run without a kubelet (``kuberay_stand_in.py``,
   ``kserve_stand_in.py``): the KubeRay stand-in runs every RayJob's own entrypoint as a local
   process and writes the RayJob's status as KubeRay does; the KServe stand-in serves the
   InferenceService with ``distill serve`` and marks it ready as KServe does;
4. a tiny teacher, student and prompts (``demo_models.py``) on local "claims" (``<work>/pvc/``,
   what ``pvc://claim/...`` means here), and a Distillation for them with ``spec.serve``.

It prints the Distillation's progress as it changes (``kubectl get dist -w`` style), then
``kubectl get dist -o wide``, where the evaluation report and model card are, and a ``curl``
that asks the served student a question, which it runs once itself. ``--keep-serving`` keeps
the student and the control plane up until Ctrl-C. The work folder stays afterwards.

The control plane and the operator process are started with the cluster tests' own helpers
(``tests/support/cluster.py``, ``tests/support/operator.py``), imported from ``tests/``: the
demo is meant to run exactly what the cluster tests run, and a second copy of that code would
drift from the one CI checks. ``tests/cluster/test_demo.py`` runs this script end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, cast

from distillation_runtime.yamlio import dump_yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # support.*: the cluster tests' helpers (see above)

from demo_common import (  # noqa: E402
    KSERVE_STAND_IN,
    KUBERAY_STAND_IN,
    Printer,
    condition,
    pvc_path,
)
from demo_models import EXAMPLE_PROMPT, EXPECTED, write_inputs  # noqa: E402
from kserve_stand_in import (  # noqa: E402
    KServeStandIn,
    predictor_container,
    served_model_name,
)
from kuberay_stand_in import KubeRayStandIn  # noqa: E402

from support.cluster import ControlPlane, control_plane, tool  # noqa: E402
from support.operator import OperatorProcess  # noqa: E402

NAME = "demo"
NAMESPACE = "distill-demo"
GROUP, VERSION, PLURAL = "distillation.dev", "v1alpha1", "distillations"
MARKER = ".distill-demo"
"""Marks a folder as a demo work folder: only such a folder (or an empty one) is emptied."""
DEFAULT_WORK = Path(tempfile.gettempdir()) / "distill-demo"
DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "distillation-operator"
    / "demo"
)
POLL_SECONDS = 0.5


def distillation() -> dict[str, Any]:
    """The Distillation the demo applies: the tiny models on ``pvc://`` claims, evaluated on
    the held-out tenth of the prompts against their reference answers, served on CPU."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Distillation",
        "metadata": {"name": NAME},
        "spec": {
            "teacher": {"model": "pvc://models/teacher"},
            "student": {"model": "pvc://models/student"},
            "dataset": {
                "prompts": "pvc://data/prompts.jsonl",
                "referenceField": "answer",
                "evalFraction": "0.1",
            },
            "generate": {
                "backend": "transformers",
                "maxNewTokens": 8,
                "topLogprobs": 8,
                "batchSize": 64,
            },
            "train": {
                "losses": {
                    "response": "1.0",
                    "logits": {"weight": "1.0", "temperature": "2.0", "source": "offline"},
                },
                "epochs": 8,
                "batchSize": 32,
                "maxSeqLength": 32,
                "learningRate": "3e-3",
                "warmupRatio": "0.05",
            },
            "evaluate": {
                "metrics": ["exactMatch", "tokenF1"],
                "gate": {"metric": "exactMatch", "minRetention": "0.8"},
            },
            "serve": {"gpus": 0},  # distill serve on CPU here, by the KServe stand-in
            "output": f"pvc://artifacts/{NAME}",
            "policy": {"retries": 1, "backoffSeconds": 5},
        },
    }


@dataclass(frozen=True)
class Row:
    """What ``kubectl get dist -w`` shows of the Distillation, plus the running stage's own
    progress (steps or records) when the operator has read it."""

    ready: str
    reason: str
    stage: str
    progress: str
    retention: str
    detail: str

    @staticmethod
    def of(obj: dict[str, Any]) -> Row:
        status = obj.get("status") or {}
        ready = condition(obj, "Ready")
        running = [s for s in status.get("stages") or [] if s.get("state") == "Running"]
        detail = ""
        if running and running[0].get("progress"):
            p = running[0]["progress"]
            total = f"/{p['total']}" if p.get("total") is not None else ""
            detail = f"{running[0]['name']}: {p.get('done')}{total} {p.get('unit', '')}"
            if p.get("loss"):
                detail += f", loss {p['loss']}"
        return Row(
            ready.get("status", ""),
            ready.get("reason", ""),
            status.get("currentStage") or "",
            status.get("progress") or "",
            (status.get("metrics") or {}).get("retention") or "",
            detail,
        )

    def cells(self, elapsed: float) -> list[str]:
        minutes, seconds = divmod(int(elapsed), 60)
        return [
            NAME,
            self.ready,
            self.reason,
            self.stage,
            self.progress,
            self.retention,
            f"{minutes}m{seconds:02d}s",
            self.detail,
        ]


COLUMNS = ["NAME", "READY", "REASON", "STAGE", "PROGRESS", "RETENTION", "ELAPSED", "STAGE PROGRESS"]
WIDTHS = [6, 7, 14, 20, 9, 10, 8, 0]


def line(cells: list[str]) -> str:
    """One table line with the widths ``kubectl get -w`` would settle on for this demo."""
    return "".join(c.ljust(w + 2) if w else c for c, w in zip(cells, WIDTHS, strict=True)).rstrip()


class DemoFailedError(RuntimeError):
    """The Distillation stalled or the time ran out: the message says what and where to look."""


def prepare_work(work: Path) -> Path:
    """An empty work folder: a new one, an empty one, or the previous demo's (which carries
    the marker); any other folder is refused rather than emptied."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise SystemExit(f"{work} is not empty and not a demo work folder: give another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("the work folder of hack/demo/run.py (emptied by its next run)\n")
    return work


def make_namespace(plane: ControlPlane) -> tuple[str, bool]:
    """The demo's namespace, and whether it must be deleted at the end: on the demo's own
    control plane it is ``distill-demo``; on a plane given by DISTILL_TEST_KUBECONFIG (which
    ``control_plane`` reuses) it gets a unique name and is deleted afterwards."""
    shared = plane.process is None
    namespace = f"{NAMESPACE}-{uuid.uuid4().hex[:6]}" if shared else NAMESPACE
    plane.kubectl("create", "namespace", namespace)
    return namespace, shared


@contextlib.contextmanager
def stand_ins(
    plane: ControlPlane, namespace: str, pvc_root: Path, work: Path, printer: Printer
) -> Iterator[tuple[KubeRayStandIn, KServeStandIn]]:
    """Both stand-ins, each polling on a thread of its own; stopped (their processes killed)
    when the block ends."""
    kuberay = KubeRayStandIn(plane.api_client(), namespace, pvc_root, work, printer)
    kserve = KServeStandIn(plane.api_client(), namespace, pvc_root, work, printer)
    stop = STOPPING  # the signal handler sets it too
    threads = [
        threading.Thread(target=s.serve_forever, args=(stop,), name=n, daemon=True)
        for s, n in ((kuberay, KUBERAY_STAND_IN), (kserve, KSERVE_STAND_IN))
    ]
    for thread in threads:
        thread.start()
    try:
        yield kuberay, kserve
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def watch(plane: ControlPlane, namespace: str, printer: Printer, timeout: float) -> dict[str, Any]:
    """Print the Distillation's row whenever it changes, until it is Ready with reason Served
    (returned); raise ``DemoFailedError`` when it stalls (a stage out of retries, the gate failed)
    or ``timeout`` passes."""
    from kubernetes import client

    custom = client.CustomObjectsApi(plane.api_client())
    started = time.monotonic()
    printer.say(line(COLUMNS))
    last: Row | None = None
    while True:
        obj: dict[str, Any] = dict(
            cast(Any, custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME))
        )
        row = Row.of(obj)
        if row != last:
            printer.say(line(row.cells(time.monotonic() - started)))
            last = row
        ready, stalled = condition(obj, "Ready"), condition(obj, "Stalled")
        if ready.get("status") == "True" and ready.get("reason") == "Served":
            return obj
        if stalled.get("status") == "True":
            raise DemoFailedError(
                f"the Distillation stalled ({stalled.get('reason')}): {stalled.get('message')}"
            )
        if time.monotonic() - started > timeout:
            raise DemoFailedError(
                f"not served after {timeout:.0f} s; Ready is {ready.get('status')} "
                f"({ready.get('reason')}): {ready.get('message')}"
            )
        time.sleep(POLL_SECONDS)


def curl_command(url: str, model: str) -> list[str]:
    """The curl a user can paste: one greedy completion from the served student."""
    body = {"model": model, "prompt": EXAMPLE_PROMPT, "max_tokens": 8, "temperature": 0}
    return [
        "curl",
        "-s",
        f"{url}/v1/completions",
        "-H",
        "content-type: application/json",
        "-d",
        json.dumps(body),
    ]


def ask_student(url: str, model: str) -> dict[str, Any]:
    """Run that curl (the real one, as the user would) and return its JSON reply."""
    done = subprocess.run(
        curl_command(url, model), capture_output=True, text=True, timeout=120, check=True
    )
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


def report_paths(obj: dict[str, Any], pvc_root: Path) -> dict[str, Path]:
    """The evaluate artifact's report and model card, on the local claims."""
    stages = (obj.get("status") or {}).get("stages") or []
    evaluate = next(s for s in stages if s["name"] == "evaluate")
    folder = pvc_path(pvc_root, evaluate["artifact"])
    return {"report": folder / "report.json", "model card": folder / "README.md"}


def save_objects(plane: ControlPlane, namespace: str, work: Path) -> None:
    """The Distillation, RayJobs and InferenceService as the API server holds them at the end,
    written to the work folder (to look at after the control plane is gone; the test reads
    them)."""
    for kind, file in (
        ("distillations", "distillation"),
        ("rayjobs", "rayjobs"),
        ("inferenceservices", "inferenceservices"),
    ):
        found = plane.kubectl("get", kind, "-n", namespace, "-o", "json", check=False)
        if found.returncode == 0:
            (work / f"{file}.json").write_text(found.stdout)


def model_name(plane: ControlPlane, namespace: str, serving: dict[str, Any]) -> str:
    """The name requests must give as ``model``: the ``--served-model-name`` the operator's
    builder put into the InferenceService (what the KServe stand-in serves under)."""
    found = plane.kubectl(
        "get", "inferenceservice", serving["inferenceService"], "-n", namespace, "-o", "json"
    )
    name = served_model_name(predictor_container(json.loads(found.stdout)))
    if name is None:
        raise DemoFailedError("the InferenceService's container has no --served-model-name")
    return name


def finish(
    plane: ControlPlane, namespace: str, obj: dict[str, Any], work: Path, printer: Printer
) -> dict[str, Any]:
    """The closing part: ``kubectl get dist -o wide``, the report, the curl and its answer.
    Returns the summary written to ``<work>/summary.json``."""
    pvc_root = work / "pvc"
    kubectl = tool("kubectl")
    printer.say(f"\n$ KUBECONFIG={plane.kubeconfig} {kubectl} get dist -n {namespace} -o wide")
    printer.say(plane.kubectl("get", "dist", "-n", namespace, "-o", "wide").stdout.rstrip())
    paths = report_paths(obj, pvc_root)
    report = json.loads(paths["report"].read_text())
    printer.say(f"\nevaluation report: {paths['report']}")
    printer.say(f"model card:        {paths['model card']}")
    teacher, student = report["teacher"]["exactMatch"], report["student"]["exactMatch"]
    printer.say(
        f"on {report['samples']} held-out prompts: teacher exactMatch {teacher:.2f}, "
        f"student exactMatch {student:.2f}"
    )
    printer.say(f"gate: {report['gate']['message']}")
    serving = (obj.get("status") or {}).get("serving") or {}
    url = serving["url"]
    model = model_name(plane, namespace, serving)
    command = curl_command(url, model)
    printer.say(f"\nask the student (served by the {KSERVE_STAND_IN} with distill serve):")
    printer.say(shlex.join(command))
    reply = ask_student(url, model)
    answer = reply["choices"][0]["text"]
    printer.say(json.dumps(reply))
    printer.say(f"the student answers {EXAMPLE_PROMPT!r} with {answer!r} (correct: {EXPECTED!r})")
    return {
        "namespace": namespace,
        "url": url,
        "curl": shlex.join(command),
        "reply": reply,
        "answer": answer,
        "report": str(paths["report"]),
        "modelCard": str(paths["model card"]),
        "gate": report["gate"],
    }


def wait_for_interrupt(printer: Printer, url: str, plane: ControlPlane) -> None:
    """``--keep-serving``: keep everything up until Ctrl-C, which here is the normal end."""
    printer.say(
        f"\n--keep-serving: the student answers at {url}; the control plane's kubeconfig is "
        f"{plane.kubeconfig}. Ctrl-C stops everything."
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        printer.say("Ctrl-C")


INTERRUPTED = threading.Event()
"""Set on Ctrl-C or SIGTERM only: what fails afterwards is part of being interrupted."""
STOPPING = threading.Event()
"""Set on Ctrl-C or SIGTERM, or when the demo's work is done: the stand-ins stop at once
(killing what they started) and say nothing more about the API server going away."""


def interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM (make killed, a test's timeout) unwind the demo the same way, so
    every process it started is stopped on the way out. Ctrl-C also reaches the control plane
    and the operator (they share the terminal's process group) and they stop by themselves;
    whatever then fails for want of an API server is part of being interrupted."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if INTERRUPTED.is_set():  # a second Ctrl-C must not cut the clean-up short
            return
        INTERRUPTED.set()
        STOPPING.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace, printer: Printer) -> dict[str, Any]:
    """The demo proper (see the module docstring); returns its summary."""
    started = time.monotonic()
    work = prepare_work(args.work.resolve())
    pvc_root = work / "pvc"
    timings: dict[str, float] = {}

    def step(text: str) -> None:
        printer.say(f"[{time.monotonic() - started:6.1f}s] {text}")

    with contextlib.ExitStack() as stack:
        step(
            "starting the test control plane (kube-apiserver, etcd, garbage collector; no "
            "kubelet) and installing the Distillation, KubeRay and KServe CRDs"
        )
        plane = stack.enter_context(control_plane(work / "controlplane"))
        namespace, shared = make_namespace(plane)
        if shared:
            stack.callback(
                plane.kubectl, "delete", "namespace", namespace, "--wait=false", check=False
            )
        timings["controlPlane"] = time.monotonic() - started
        step(f"control plane up; kubeconfig {plane.kubeconfig}")
        operator = OperatorProcess(plane, namespace, work, pvc_root)
        operator.start()
        stack.callback(operator.stop)
        step(f"operator running (kopf run, namespace {namespace}; log {operator.log})")
        stack.enter_context(stand_ins(plane, namespace, pvc_root, work, printer))
        step(
            f"{KUBERAY_STAND_IN} and {KSERVE_STAND_IN} watching namespace {namespace} "
            "(they play KubeRay and KServe: no kubelet here, so no pod can run)"
        )
        step(
            "making the tiny teacher, student and prompts (the first run trains the teacher; "
            "later ones reuse it from the cache)"
        )
        making = time.monotonic()
        cached = write_inputs(args.cache, pvc_root)
        timings["models"] = time.monotonic() - making
        origin = "from the cache" if cached else f"teacher trained; cached in {args.cache}"
        step(f"models ready ({origin}) on local claims {pvc_root}")
        manifest = work / "distillation.yaml"
        # dump_yaml quotes "3e-3": kubectl reads YAML 1.2, where a plain 3e-3 is a number
        manifest.write_text(dump_yaml(distillation()))
        step(f"$ kubectl apply -n {namespace} -f {manifest}")
        printer.say(plane.kubectl("apply", "-n", namespace, "-f", str(manifest)).stdout.rstrip())
        applied = time.monotonic()
        try:
            obj = watch(plane, namespace, printer, args.timeout)
        finally:
            save_objects(plane, namespace, work)
        timings["applyToServed"] = time.monotonic() - applied
        summary = finish(plane, namespace, obj, work, printer)
        timings["total"] = time.monotonic() - started
        summary |= {
            "work": str(work),
            "inputsCached": cached,
            "seconds": {k: round(v, 1) for k, v in timings.items()},
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        step(
            f"served {timings['applyToServed']:.0f} s after kubectl apply; "
            f"{timings['total']:.0f} s in all"
        )
        if args.keep_serving:
            wait_for_interrupt(printer, summary["url"], plane)
        printer.say("stopping the stand-ins' processes, the operator and the control plane")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make demo",
        description="A Distillation from kubectl apply to a served student, on this machine, "
        "with a local KubeRay stand-in and a local KServe stand-in.",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=DEFAULT_WORK,
        help="work folder, emptied first and left "
        "afterwards for you to look at (default: %(default)s)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the trained teacher is kept between runs (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the student's server and the control plane up until Ctrl-C",
    )
    parser.add_argument(
        "--non-interactive",
        action="store_true",
        help="for CI: never wait for Ctrl-C, and end with a `demo-summary: {json}` line",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="seconds from kubectl apply to a served student before giving up "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.non_interactive and args.keep_serving:
        parser.error("--keep-serving waits for Ctrl-C, which --non-interactive never sends")
    return args


KNOWN_FAILURES = (DemoFailedError, AssertionError, OSError, RuntimeError)
"""What ends the demo with a one-line reason rather than a traceback."""


def interrupted(printer: Printer, work: Path) -> int:
    """Say that the demo was stopped, and where its work folder is; exit status 130 (SIGINT)."""
    printer.say(f"\ninterrupted: everything the demo started is stopped; work folder {work}")
    return 130


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    printer = Printer()
    interrupt_on_signals()
    work = args.work.resolve()
    try:
        summary = run(args, printer)
    except KeyboardInterrupt:
        return interrupted(printer, work)
    except Exception as err:
        if INTERRUPTED.is_set():  # the control plane went away under an interrupted demo
            return interrupted(printer, work)
        if not isinstance(err, KNOWN_FAILURES):
            raise  # a bug of the demo's own: its traceback helps more than a summary
        # AssertionError: a kubectl the tests' helpers ran failed (its message has the output)
        printer.say(f"\ndemo failed: {err}")
        printer.say(f"logs: {work}/rayjobs/*/driver.err, {work}/operator-1.log, {work}/serving/")
        return 1
    printer.say(f"done; everything it started is stopped. The work folder stays: {work}")
    if args.non_interactive:
        printer.say("demo-summary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
