"""``make demo`` end to end: the same script, run the way ``make demo`` runs it.

It starts its own control plane, the operator and the two stand-ins (KubeRay's and KServe's
parts, played locally; see hack/demo/), trains or reuses a tiny teacher, applies a Distillation
with ``spec.serve``, and stops once the student answers a curl. What is checked is what a user
of the demo sees, and that each stage really ran: the RayJob's own entrypoint wrote its
artifact. Several minutes on two CPUs (the first run also trains the teacher).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distillation_runtime.yamlio import dump_yaml
from support.cluster import REPO, require_tools
from support.operator import Kube, wait_for

DEMO = REPO / "hack" / "demo" / "run.py"
sys.path.insert(0, str(DEMO.parent))  # the stand-ins import their siblings as top-level modules

from demo_common import Printer, condition  # noqa: E402
from kserve_stand_in import KServeStandIn  # noqa: E402
from kuberay_stand_in import KubeRayStandIn  # noqa: E402

TIMEOUT_SECONDS = 1500


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One non-interactive demo run: its output, exit status, time and work folder."""
    require_tools()
    work = tmp_path_factory.mktemp("demo") / "work"
    # a control plane of its own, as `make demo` starts, even where the tests share one
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_TEST_KUBECONFIG"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(DEMO), "--non-interactive", "--work", str(work)],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_SECONDS,
    )
    seconds = time.monotonic() - started
    print(f"demo: {seconds:.0f} s")  # shown with -s; the demo prints its own breakdown
    return {"done": done, "work": work, "seconds": seconds}


def output(demo: dict[str, Any]) -> str:
    done: subprocess.CompletedProcess[str] = demo["done"]
    assert done.returncode == 0, f"demo exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def summary(demo: dict[str, Any]) -> dict[str, Any]:
    """The demo's closing ``demo-summary:`` line."""
    last = [ln for ln in output(demo).splitlines() if ln.startswith("demo-summary: ")]
    assert last, output(demo)
    found: dict[str, Any] = json.loads(last[-1].removeprefix("demo-summary: "))
    return found


def saved(demo: dict[str, Any], name: str) -> dict[str, Any]:
    """An object list the demo saved from the API server before it stopped the plane."""
    found: dict[str, Any] = json.loads((demo["work"] / f"{name}.json").read_text())
    return found


def test_the_distillation_is_ready_served_with_every_stage_succeeded(
    demo: dict[str, Any],
) -> None:
    (distillation,) = saved(demo, "distillation")["items"]
    status = distillation["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Served"), ready
    states = {s["name"]: s["state"] for s in status["stages"]}
    assert states == dict.fromkeys(("preflight", "generate", "train", "evaluate"), "Succeeded")
    assert status["serving"]["ready"] is True
    # what `kubectl get dist -o wide` printed at the end says so too
    table = output(demo).split("get dist -n ", 1)[1].splitlines()[1:3]
    assert table[0].split()[:2] == ["NAME", "READY"], table
    assert table[1].split()[:2] == ["demo", "True"], table


def test_every_rayjob_ran_its_own_entrypoint_which_wrote_its_artifact(
    demo: dict[str, Any],
) -> None:
    pvc = Path(summary(demo)["work"]) / "pvc"
    runs = [
        json.loads(ln) for ln in (demo["work"] / "kuberay-stand-in.jsonl").read_text().splitlines()
    ]
    by_job = {r["rayjob"]: r for r in runs}
    rayjobs = saved(demo, "rayjobs")["items"]
    assert len(rayjobs) == 4
    for job in rayjobs:
        meta, spec, status = job["metadata"], job["spec"], job["status"]
        run = by_job[meta["name"]]
        # the command was the RayJob's entrypoint, with `distill` as this environment's distill
        assert run["entrypoint"] == spec["entrypoint"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "distill"
        assert run["command"] == [sys.executable, "-m", "distillation_runtime.cli", *argv[1:]]
        assert run["exitCode"] == 0
        assert (status["jobDeploymentStatus"], status["jobStatus"]) == ("Complete", "SUCCEEDED")
        artifact = pvc / meta["annotations"]["distillation.dev/artifact"].removeprefix("pvc://")
        assert (artifact / "_COMPLETE").exists(), artifact
        manifest = json.loads((artifact / "manifest.json").read_text())
        assert manifest["stage"] == meta["labels"]["distillation.dev/stage"]
        assert manifest["fingerprint"] == meta["annotations"]["distillation.dev/fingerprint"]


def test_the_served_student_answers_the_curl_the_demo_prints(demo: dict[str, Any]) -> None:
    found = summary(demo)
    reply = found["reply"]
    assert reply["object"] == "text_completion"
    assert reply["model"] == "demo"
    assert found["answer"].strip(), reply
    assert found["curl"] in output(demo)
    assert Path(found["report"]).exists()
    assert Path(found["modelCard"]).exists()


# --------------------------------------------------------------------------------------------
# The two stand-ins on their own, on the session's control plane: what the end-to-end run
# does not reach (a failing driver, a RayJob or InferenceService deleted while its process runs)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained checkpoint (distillation_runtime.demo) for ``distill serve`` to load."""
    from distillation_runtime.demo import ModelSize, make_model, make_tokenizer, save_pretrained

    tokenizer = make_tokenizer()
    folder = tmp_path_factory.mktemp("tiny") / "model"
    return save_pretrained(make_model(tokenizer, ModelSize()), tokenizer, folder)


@pytest.fixture
def stand_in_work(tmp_path: Path) -> Path:
    (tmp_path / "pvc").mkdir()
    return tmp_path


@contextlib.contextmanager
def playing(stand_in: KubeRayStandIn | KServeStandIn) -> Iterator[None]:
    """The stand-in on its thread for the duration of a test; its processes stopped after."""
    stop = threading.Event()
    thread = threading.Thread(target=stand_in.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)


def rayjob(name: str, entrypoint: str, env_vars: dict[str, str]) -> dict[str, Any]:
    """The fields of a RayJob the KubeRay stand-in reads (the operator's builder writes more)."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {"distillation.dev/stage": "preflight"}},
        "spec": {"entrypoint": entrypoint, "runtimeEnvYAML": dump_yaml({"env_vars": env_vars})},
    }


def test_the_kuberay_stand_in_fails_a_rayjob_with_the_tail_of_its_drivers_stderr(
    api: Any, namespace: str, stand_in_work: Path
) -> None:
    kube = Kube(api, namespace)
    stand_in = KubeRayStandIn(api, namespace, stand_in_work / "pvc", stand_in_work, Printer())
    job = rayjob(
        "bad-spec",
        "distill stage preflight --config-env DISTILL_SPEC",
        {"DISTILL_SPEC": "teacher: {model: 3}\n"},
    )
    kube.custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", job)
    with playing(stand_in):
        status = wait_for(
            "the RayJob Failed",
            lambda: (s := kube.rayjob("bad-spec").get("status") or {}).get("endTime") and s,
            timeout=180,
        )
    assert (status["jobDeploymentStatus"], status["jobStatus"]) == ("Failed", "FAILED")
    assert status["reason"] == "AppFailed"
    assert "exit code 2" in status["message"]
    assert "$DISTILL_SPEC" in status["message"]  # the CLI's own complaint, from its stderr
    assert status["startTime"] <= status["endTime"]


def test_a_rayjob_deleted_while_it_runs_has_its_driver_killed(
    api: Any, namespace: str, stand_in_work: Path, tiny_model: Path
) -> None:
    kube = Kube(api, namespace)
    stand_in = KubeRayStandIn(api, namespace, stand_in_work / "pvc", stand_in_work, Printer())
    # `distill serve` runs until it is stopped: a driver that is still running when deleted
    job = rayjob("long", f"distill serve {tiny_model} --port 0", {})
    kube.custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", job)
    with playing(stand_in):
        wait_for(
            "the RayJob Running",
            lambda: (kube.rayjob("long").get("status") or {}).get("jobStatus") == "RUNNING",
            timeout=60,
        )
        run = stand_in.current
        assert run is not None
        assert run.process.poll() is None
        kube.custom.delete_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", "long")
        # the stand-in's thread kills the driver, then forgets the run: wait for both, not the
        # first alone (the test thread can see the process gone before `current` is cleared)
        wait_for(
            "the driver killed and the run forgotten",
            lambda: run.process.poll() is not None and stand_in.current is None,
            timeout=60,
        )


def test_the_kserve_stand_in_serves_until_the_inference_service_is_deleted(
    api: Any, namespace: str, stand_in_work: Path, tiny_model: Path
) -> None:
    kube = Kube(api, namespace)
    stand_in = KServeStandIn(api, namespace, stand_in_work / "pvc", stand_in_work, Printer())
    shutil.copytree(tiny_model, stand_in_work / "pvc" / "models" / "tiny")
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "tiny"},
        "spec": {
            "predictor": {
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": "vllm/vllm-openai",
                        "args": ["--port", "8080", "--served-model-name", "tiny-student"],
                        "env": [{"name": "STORAGE_URI", "value": "pvc://models/tiny"}],
                    }
                ]
            }
        },
    }
    kube.custom.create_namespaced_custom_object(
        "serving.kserve.io", "v1beta1", namespace, "inferenceservices", isvc
    )

    def served() -> dict[str, Any] | None:
        (found,) = kube.inference_services()
        return found if condition(found, "Ready").get("status") == "True" else None

    with playing(stand_in):
        found = wait_for("the InferenceService Ready", served, timeout=120)
        assert found["status"]["observedGeneration"] == found["metadata"]["generation"]
        url = found["status"]["url"]
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
            models = json.load(response)
        assert [m["id"] for m in models["data"]] == ["tiny-student"]
        (server,) = stand_in.servers.values()
        kube.custom.delete_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", namespace, "inferenceservices", "tiny"
        )
        wait_for("the server stopped", lambda: server.process.poll() is not None, timeout=60)
