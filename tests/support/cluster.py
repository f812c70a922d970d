"""The test control plane (hack/testcluster) from Python: start it, talk to it, judge manifests.

A ``ControlPlane`` is a real kube-apiserver (embedded etcd) plus the garbage collector, started on
loopback by ``testcluster up``. Tests use the kubernetes client for API calls and the project's
own kubectl and helm (built by ``make tools``) where a user would type a command.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOOLS_BIN = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "distillation-operator"
    / "tools"
    / "bin"
)
UPSTREAM_CRDS = Path(os.environ.get("DISTILL_UPSTREAM_CRDS", REPO / "third_party" / "crds"))
KUBERAY_VERSION = "v1.6.2"
"""The KubeRay the tests build (hack/build-tools.sh) and whose CRDs they install."""
KUBERAY_CRDS = UPSTREAM_CRDS / f"kuberay-{KUBERAY_VERSION}"
OLDEST_KUBERAY_CRDS = UPSTREAM_CRDS / "kuberay-v1.5.0"
"""The oldest KubeRay supported: every RayJob built is also dry-run against its schema."""
KSERVE_CRDS = UPSTREAM_CRDS / "kserve-v0.20.0"
OUR_CRD = REPO / "crds" / "distillation.dev_distillations.yaml"


def tools_bin() -> Path:
    """Where ``make tools`` put testcluster, kubectl and helm."""
    return Path(os.environ.get("DISTILL_TOOLS_BIN", DEFAULT_TOOLS_BIN))


class ToolMissingError(RuntimeError):
    """The Go-built tools are not there: run ``make tools``."""


def tool(name: str) -> Path:
    path = tools_bin() / name
    if not path.exists():
        raise ToolMissingError(f"{path} is missing: run `make tools` (builds it from Go modules)")
    return path


def require_tools() -> None:
    """Skip (locally) or fail (CI) when the Go-built tools are missing: CI must never pass
    by skipping its cluster tests."""
    try:
        for name in ("testcluster", "kubectl", "helm", "kuberay-operator"):
            tool(name)
    except ToolMissingError as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


@dataclass
class CommandResult:
    """What a command printed and how it ended."""

    returncode: int
    stdout: str
    stderr: str


@dataclass
class ControlPlane:
    """A running API server: its kubeconfig, and the tools to drive it."""

    kubeconfig: Path
    process: subprocess.Popen[str] | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            # kubectl's discovery cache is keyed by host:port; one per plane, never a stale one
            "KUBECACHEDIR": str(self.kubeconfig.parent / "kube-cache"),
            "HELM_CACHE_HOME": str(self.kubeconfig.parent / "helm-cache"),
            "HELM_CONFIG_HOME": str(self.kubeconfig.parent / "helm-config"),
            "HELM_DATA_HOME": str(self.kubeconfig.parent / "helm-data"),
        }

    def run(
        self,
        program: str,
        *args: str,
        check: bool = True,
        stdin: str | None = None,
        timeout: float = 120,
    ) -> CommandResult:
        """Run the project's kubectl or helm against this API server."""
        done = subprocess.run(
            [str(tool(program)), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        result = CommandResult(done.returncode, done.stdout, done.stderr)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{program} {' '.join(args)} exited {done.returncode}:\n{done.stderr}{done.stdout}"
            )
        return result

    def kubectl(self, *args: str, **kwargs: Any) -> CommandResult:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> CommandResult:
        return self.run("helm", *args, **kwargs)

    def apply_server_side(self, *paths: Path) -> None:
        """Server-side apply: the upstream CRDs exceed client-side apply's annotation limit."""
        files = [arg for p in paths for arg in ("-f", str(p))]
        self.kubectl("apply", "--server-side", "--force-conflicts", *files)

    def wait_established(self, *crd_names: str, timeout: float = 90) -> None:
        """Wait until the CRDs serve and their schemas are published (``kubectl explain`` reads
        the OpenAPI document, which the API server updates a moment after Established)."""
        deadline = time.monotonic() + timeout
        pending = list(crd_names)
        while pending:
            name = pending[0]
            kind = name.split(".", 1)[0]
            established = self.kubectl(
                "wait", "--for=condition=Established", "--timeout=5s", f"crd/{name}", check=False
            )
            explained = (
                established.returncode == 0
                and self.kubectl("explain", kind, check=False).returncode == 0
            )
            if explained:
                pending.pop(0)
            elif time.monotonic() > deadline:
                raise AssertionError(f"CRD {name} not served after {timeout}s")
            else:
                time.sleep(0.5)

    def api_client(self) -> Any:
        """A kubernetes ApiClient for this API server (one per caller)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def restart_api_server(self, timeout: float = 120) -> float:
        """Restart the API server (``testcluster up`` does on SIGUSR1: same port, certificates
        and etcd data) and wait until it is ready again; returns ``time.time()`` of that moment.
        """
        if self.process is None:
            raise RuntimeError("this control plane was not started here: cannot restart it")
        state = self.kubeconfig.parent / "state.json"
        before = json.loads(state.read_text())["kube-apiserver_pid"]
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"testcluster up exited {self.process.returncode} on restart")
            now = json.loads(state.read_text())["kube-apiserver_pid"]  # rewritten once ready
            if now != before and self.kubectl("get", "--raw=/readyz", check=False).returncode == 0:
                return time.time()
            time.sleep(0.5)
        raise AssertionError(f"the API server was not ready {timeout}s after its restart")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_until_ready(
    command: Sequence[str], marker: str, timeout: float
) -> tuple[subprocess.Popen[str], dict[str, str], str]:
    """Start a long-running ``testcluster`` command and wait for the line starting with
    ``marker`` (its other lines are progress). Returns the process, that line's ``key=value``
    fields, and everything it printed until then."""
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # a thread, so a silent child never blocks the deadline
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            process.wait()
            raise CommandExitedError(process.returncode, "".join(seen))
        seen.append(line)
        if line.startswith(marker):
            fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            return process, fields, "".join(seen)
    process.kill()
    raise RuntimeError(f"{command[1]} not {marker.strip()} after {timeout}s:\n{''.join(seen)}")


class CommandExitedError(RuntimeError):
    """A ``testcluster`` command exited before it was ready."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"exited {returncode}:\n{output}")
        self.returncode = returncode
        self.output = output


def start_control_plane(
    workdir: Path, timeout: float = 120, extra_args: Sequence[str] = ()
) -> ControlPlane:
    """Start ``testcluster up`` and wait for its READY line."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [str(tool("testcluster")), "up", "--dir", str(workdir), *extra_args]
    try:
        process, fields, _ = start_until_ready(command, "READY ", timeout)
    except CommandExitedError as err:
        raise RuntimeError(f"testcluster up {err}") from None
    return ControlPlane(Path(fields["kubeconfig"]), process)


def install_crds(plane: ControlPlane, *, ours: bool = True) -> None:
    """The upstream KubeRay and KServe CRDs (unmodified) and ours, all server-side."""
    if not KUBERAY_CRDS.is_dir() or not KSERVE_CRDS.is_dir():
        raise FileNotFoundError(
            f"upstream CRDs not found under {UPSTREAM_CRDS}: set DISTILL_UPSTREAM_CRDS to a "
            f"folder holding kuberay-{KUBERAY_VERSION}/ (ray-operator config/crd/bases) and "
            "kserve-v0.20.0/ (KServe v0.20.0 config/crd/full), from those upstream releases"
        )
    plane.apply_server_side(KUBERAY_CRDS, KSERVE_CRDS, *([OUR_CRD] if ours else []))
    upstream = ["rayjobs.ray.io", "rayclusters.ray.io", "inferenceservices.serving.kserve.io"]
    plane.wait_established(*upstream, *(["distillations.distillation.dev"] if ours else []))


@contextlib.contextmanager
def control_plane(workdir: Path, *, with_crds: bool = True) -> Iterator[ControlPlane]:
    """A control plane for the duration of a block; reuses one named by DISTILL_TEST_KUBECONFIG."""
    given = os.environ.get("DISTILL_TEST_KUBECONFIG")
    if given:
        plane = ControlPlane(Path(given))
        if with_crds:
            install_crds(plane)
        yield plane
        return
    plane = start_control_plane(workdir)
    try:
        if with_crds:
            install_crds(plane)
        yield plane
    finally:
        plane.stop()


# --------------------------------------------------------------------------------------------
# Judging manifests with the real schemas
# --------------------------------------------------------------------------------------------

_PLURALS = {
    "RayJob": "rayjobs",
    "RayCluster": "rayclusters",
    "InferenceService": "inferenceservices",
    "LLMInferenceService": "llminferenceservices",
    "Distillation": "distillations",
}


def server_dry_run(api_client: Any, manifest: dict[str, Any], namespace: str) -> list[str]:
    """Create ``manifest`` with ``dryRun=All`` (nothing is stored) and return the API server's
    refusals as ``field: message`` lines; empty when it would be accepted.

    This is the helper later issues use to check every RayJob and InferenceService they build
    against the real upstream schemas.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    group, _, version = manifest["apiVersion"].partition("/")
    plural = _PLURALS[manifest["kind"]]
    api = client.CustomObjectsApi(api_client)
    try:
        api.create_namespaced_custom_object(
            group,
            version,
            namespace,
            plural,
            manifest,
            dry_run="All",
            field_validation="Strict",
        )
    except ApiException as err:
        return refusal_lines(err)
    return []


def refusal_lines(err: Any) -> list[str]:
    """``field: message`` for each cause of an API error (or its message when it has none)."""
    try:
        body = json.loads(err.body)
    except (TypeError, ValueError):
        return [str(err)]
    causes = body.get("details", {}).get("causes") or []
    if not causes:
        return [body.get("message", str(err))]
    return [f"{c.get('field', '')}: {c.get('message', '')}" for c in causes]


def load_documents(paths: Sequence[Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


KUEUE_STAND_IN_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "localqueues.kueue.x-k8s.io"},
    "spec": {
        "group": "kueue.x-k8s.io",
        "names": {"kind": "LocalQueue", "plural": "localqueues", "singular": "localqueue"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1beta1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}
"""A STAND-IN for Kueue's API: only its group being served, which is all the operator checks
before it creates RayJobs with Kueue's queue label (Kueue's own controller and webhook are not
here; the tests play their part)."""


def install_kueue_stand_in(plane: ControlPlane, workdir: Path) -> None:
    """Serve ``kueue.x-k8s.io`` (the stand-in CRD above) on ``plane``."""
    path = workdir / "kueue-stand-in.yaml"
    path.write_text(yaml.safe_dump(KUEUE_STAND_IN_CRD))
    plane.apply_server_side(path)
    plane.wait_established("localqueues.kueue.x-k8s.io")
