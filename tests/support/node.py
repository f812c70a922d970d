"""The node tier from Python: a control plane that serves pods and one real node beside it.

``testcluster up --node-ip`` starts the control plane with what pods need (the API server
reachable from the pods' bridge through the ``kubernetes`` Service, ServiceAccounts, the
controllers from Deployments down to Pods), and ``testcluster node`` adds containerd, the kubelet,
kube-scheduler, kube-proxy and CoreDNS, with the images imported from OCI archives (see
hack/testcluster/README.md). Stopping the node undoes everything it did to the host;
``leftovers`` says what it did not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.cluster import (
    CommandExitedError,
    ControlPlane,
    start_control_plane,
    start_until_ready,
    tool,
    tools_bin,
)

NODE_IP = "10.88.0.1"
"""The pods' gateway: the bridge's address, where CoreDNS answers and the API server is reached."""
BRIDGE = "distill0"
RUN_DIR = Path("/run/distill-node")
NODE_UNAVAILABLE = 3
"""``testcluster node``'s exit status when this machine cannot run a node (not root, no
containerd ...): the tests skip with its message, or fail under CI."""
CONTAINERD_ROOT = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "distillation-operator"
    / "node"
    / "containerd"
)
"""Imported images stay here between runs (an archive is imported again only when it changed)."""


def node_images_dir() -> Path:
    """The pause and KubeRay operator archives hack/build-tools.sh packs."""
    return tools_bin().parent / "images"


@dataclass
class Node:
    """A running ``testcluster node`` and the control plane it joined."""

    plane: ControlPlane
    process: subprocess.Popen[str]
    name: str
    workdir: Path
    startup_log: str = field(repr=False, default="")

    def stop(self, timeout: float = 180) -> None:
        """Tear the node down (pods, containerd, host changes) and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self, component: str, lines: int = 40) -> str:
        path = self.workdir / f"{component}.log"
        if not path.exists():
            return f"({path} missing)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_node_plane(workdir: Path) -> ControlPlane:
    """A control plane whose API server the node's pods can reach."""
    return start_control_plane(workdir, extra_args=["--node-ip", NODE_IP])


def start_node(
    plane: ControlPlane, workdir: Path, archives: list[Path], timeout: float = 900
) -> Node:
    """Start ``testcluster node`` with the pause image and ``archives`` imported; skip (or fail
    under CI) with its message when this machine cannot run a node."""
    images = [node_images_dir() / "pause.oci.tar", *archives]
    for archive in images:
        if not archive.exists():
            unavailable(
                f"{archive} is missing: `make tools` packs the node images, `make images` the rest"
            )
    command = [
        str(tool("testcluster")),
        "node",
        "--dir",
        str(workdir),
        "--kubeconfig",
        str(plane.kubeconfig),
        "--coredns",
        str(tool("coredns")),
        "--containerd-root",
        str(CONTAINERD_ROOT),
        "--node-ip",
        NODE_IP,
        *[arg for archive in images for arg in ("--image", str(archive))],
    ]
    try:
        process, fields, output = start_until_ready(command, "NODE READY ", timeout)
    except CommandExitedError as err:
        if err.returncode == NODE_UNAVAILABLE:
            unavailable(err.output.strip().splitlines()[-1])
        raise RuntimeError(f"testcluster node {err}") from None
    return Node(plane, process, fields["name"], workdir, output)


def unavailable(reason: str) -> None:
    """Skip locally; fail under CI, which must never pass by skipping the node tier."""
    if os.environ.get("CI"):
        pytest.fail(f"the node tier cannot run here: {reason}")
    pytest.skip(f"the node tier cannot run here: {reason}")


def leftovers(workdir: Path) -> list[str]:
    """What a stopped node left on this machine: processes of its containerd, mounts under its
    folders, the bridge, kube-proxy's iptables chains, the pods' cgroups."""
    found: list[str] = []
    socket = str(RUN_DIR / "containerd.sock")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if socket in cmdline or str(workdir) in cmdline:
            found.append(f"process {proc.name}: {cmdline.strip()}")
    roots = (str(workdir), str(RUN_DIR), str(CONTAINERD_ROOT))
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        if mount_point.startswith(roots):
            found.append(f"mount {mount_point}")
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"network interface {BRIDGE}")
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    chains = sorted({w for w in rules.split() if w.startswith(("KUBE-", "CNI-"))})
    found += [f"iptables chain {chain}" for chain in chains]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/kubepods*")]
    if RUN_DIR.exists():
        found.append(f"folder {RUN_DIR}")
    return found


def crash_pod(uid: str) -> int:
    """SIGKILL every process of the pod ``uid`` from the node, as a crashed machine or the OOM
    killer ends them: no SIGTERM, no grace period, nothing flushed (the kubelet sees its
    containers die). Returns how many processes were killed."""
    procs = {
        int(pid)
        for cgroup in Path("/sys/fs/cgroup").glob(f"*/kubepods*/**/pod{uid}")
        for listing in cgroup.rglob("cgroup.procs")
        for pid in listing.read_text().split()
    }
    for pid in procs:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    return len(procs)
