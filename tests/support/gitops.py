"""How Argo CD and Flux (kstatus) judge a Distillation, with their own code.

``hack/gitops-health`` is a small Go program built on Argo CD's health code (util/settings reads
the argocd-cm, gitops-engine and util/lua run the health script) and kstatus's
``status.Compute``. The tests build it themselves into the tools cache, as
``hack/build-tools.sh`` does for its tools: only when its source, the Go version or the flags
changed (a ``.hash`` file beside the binary), under a file lock, so parallel test runs build it
once. A cold build compiles most of Argo CD (minutes); after that it is a hash check.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "hack" / "gitops-health"
CHART = REPO / "charts" / "distillation-operator"
HEALTH_LUA = CHART / "health" / "distillation.lua"
CHART_README = CHART / "README.md"
README_SECTION = "## GitOps health (Argo CD, Flux)"
LDFLAGS = "-s -w"
NAME = "gitops-health"


def tools_dir() -> Path:
    """The tools cache the Makefile names (``$DISTILL_TOOLS_DIR``), or its default."""
    if "DISTILL_TOOLS_DIR" in os.environ:
        return Path(os.environ["DISTILL_TOOLS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "distillation-operator" / "tools"


def go_env() -> dict[str, str]:
    """The installed Go only (no toolchain download), no workspace, a static binary; module
    downloads still go through the usual GOPROXY."""
    env = dict(os.environ, GOTOOLCHAIN="local", GOWORK="off", CGO_ENABLED="0")
    env.pop("GOFLAGS", None)
    return env


def source_hash(go: str) -> str:
    """What the binary is built from: Go's version and target, the flags, go.mod, go.sum and
    every .go file (the same inputs hack/build-tools.sh hashes for testcluster)."""
    digest = hashlib.sha256()

    def go_output(*args: str) -> str:
        run = subprocess.run([go, *args], env=go_env(), capture_output=True, text=True, check=True)
        return run.stdout

    digest.update(go_output("version").encode())
    digest.update(go_output("env", "GOOS", "GOARCH").encode())
    digest.update(LDFLAGS.encode())
    for path in [SOURCE / "go.mod", SOURCE / "go.sum", *sorted(SOURCE.glob("*.go"))]:
        digest.update(f"== {path.name}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build(go: str) -> Path:
    """``$DISTILL_TOOLS_DIR/bin/gitops-health``, (re)built when its inputs changed."""
    bin_dir = tools_dir() / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    binary, stamp = bin_dir / NAME, bin_dir / f"{NAME}.hash"
    with (tools_dir() / f"{NAME}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        want = source_hash(go)
        if binary.exists() and stamp.exists() and stamp.read_text().strip() == want:
            return binary
        tmp = bin_dir / f"{NAME}.tmp.{os.getpid()}"
        started = time.monotonic()
        run = subprocess.run(
            [go, "build", "-mod=readonly", "-trimpath", "-ldflags", LDFLAGS, "-o", str(tmp), "."],
            cwd=SOURCE,
            env=go_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"go build of {SOURCE} failed:\n{run.stdout}{run.stderr}")
        tmp.replace(binary)
        stamp.write_text(want + "\n")
        seconds = time.monotonic() - started
        print(f"built {binary} in {seconds:.0f}s")  # shown with -s; the cold build is slow
        return binary


def binary() -> Path:
    """The built binary; skips (locally) or fails (under CI) without Go, so CI never passes
    by skipping."""
    go = shutil.which("go")
    if go is None:
        reason = (
            "go not found in PATH: the Argo CD and kstatus health checks build hack/gitops-health "
            "with it (install Go 1.26.3 or later)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return build(go)


def readme_argocd_cm() -> dict[str, Any]:
    """The argocd-cm ConfigMap the chart's README tells a user to apply (its GitOps section's
    YAML block), as parsed YAML."""
    text = CHART_README.read_text()
    assert README_SECTION in text, f"{CHART_README} has no section {README_SECTION!r}"
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("\n```", 1)[0] + "\n"
    loaded: dict[str, Any] = yaml.safe_load(block)
    return loaded


@dataclass(frozen=True)
class Verdict:
    """One tool's judgement: Argo CD's health status, or kstatus's status, and the message."""

    status: str
    message: str


@dataclass(frozen=True)
class Health:
    """What Argo CD and Flux say about one object."""

    argocd: Verdict
    kstatus: Verdict


def judge(tool: Path, argocd_cm: Path, obj: Mapping[str, Any]) -> Health:
    """Both verdicts on ``obj`` (a Distillation as the API server returns it)."""
    run = subprocess.run(
        [str(tool), "--argocd-cm", str(argocd_cm), "-"],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise AssertionError(f"{tool.name} failed ({run.returncode}): {run.stderr}")
    found = json.loads(run.stdout)
    return Health(Verdict(**found["argocd"]), Verdict(**found["kstatus"]))
