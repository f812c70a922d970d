"""The operator process as the chart runs it: its exact command starts and answers liveness."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from support.cluster import REPO, ControlPlane
from support.net import free_port


def chart_command(plane: ControlPlane, *values: str) -> list[str]:
    rendered = plane.helm("template", "ops", str(REPO / "charts/distillation-operator"), *values)
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return [*container["command"], *container["args"]]


def test_the_charts_command_runs_and_is_live(plane: ControlPlane, tmp_path: Path) -> None:
    port = free_port()
    command = chart_command(plane, "--set", f"healthPort={port}")
    assert command[:2] == ["kopf", "run"]
    command[0] = str(Path(sys.executable).parent / "kopf")  # the same kopf, from this environment
    command = [a.replace("0.0.0.0", "127.0.0.1") for a in command]
    log_path = tmp_path / "operator.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=plane.env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("no liveness answer in 60 s:\n" + log_path.read_text())
    finally:
        process.terminate()
        process.wait(timeout=30)
