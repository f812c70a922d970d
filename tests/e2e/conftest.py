"""Node-tier end-to-end tests: a real node (containerd, kubelet, kube-proxy, CoreDNS) beside the
test control plane, pods running the images `make images` built.

They run only when asked for (`-m e2e_node`, which `make test-e2e` passes): they need root,
Debian's containerd, runc, CNI plugins and iptables (`make node-deps` installs them), `make
tools` and `make images`. Locally a missing piece skips them with the command that provides it;
under CI=true it fails them, so CI never passes by skipping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cluster import KUBERAY_VERSION, install_crds, require_tools
from support.images import chart_images
from support.node import Node, leftovers, node_images_dir, start_node, start_node_plane
from support.tiers import deselect_unless_asked

DESELECTED = pytest.StashKey[int]()
TIMINGS = pytest.StashKey[dict[str, float]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark these tests `e2e_node`; a plain `pytest` deselects them and says so."""
    if count := deselect_unless_asked(config, items, Path(__file__).parent, "e2e_node"):
        config.stash[DESELECTED] = count


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if count := config.stash.get(DESELECTED, 0):
        terminalreporter.write_line(
            f"{count} node-tier tests deselected: `make test-e2e` runs them on a real node"
        )
    if timings := config.stash.get(TIMINGS, {}):
        terminalreporter.write_line(
            "node tier: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        )
    if peak := config.stash.get(PEAK_MEMORY, None):
        terminalreporter.write_line(
            f"node tier: peak memory in use on the machine {peak.peak / 2**30:.1f} GiB "
            f"(before it started {peak.baseline / 2**30:.1f} GiB)"
        )


def memory_in_use() -> int:
    """Bytes in use on the machine (MemTotal - MemAvailable)."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


class PeakMemory:
    """Samples the machine's memory in use every second while the node tier runs."""

    def __init__(self) -> None:
        self.baseline = self.peak = memory_in_use()
        self.stop = threading.Event()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self) -> None:
        while not self.stop.wait(1.0):
            self.peak = max(self.peak, memory_in_use())


PEAK_MEMORY = pytest.StashKey[PeakMemory]()


NODE_IMAGES = ("operator", "runtime", "quantize")
"""The project's images the node imports: the operator's, and the two the Distillation's stages
run (the quantize stage in llm-compressor's image, every other one in the runtime image)."""


def node_archives() -> list[Path]:
    """What the node imports: the project's images (as the chart names them) and KubeRay's."""
    images = chart_images()
    kuberay = node_images_dir() / f"kuberay-operator-{KUBERAY_VERSION}.oci.tar"
    return [images[name].archive for name in NODE_IMAGES] + [kuberay]


@pytest.fixture(scope="session")
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """The control plane and one node for the session; afterwards nothing of the node may be
    left on the machine (processes, mounts, iptables chains, the bridge, cgroups)."""
    require_tools()
    timings = request.config.stash.setdefault(TIMINGS, {})
    request.config.stash[PEAK_MEMORY] = PeakMemory()
    t0 = time.monotonic()
    plane = start_node_plane(tmp_path_factory.mktemp("node-plane"))
    workdir = tmp_path_factory.mktemp("node")
    try:
        install_crds(plane, ours=False)  # the chart installs the Distillation CRD
        running = start_node(plane, workdir, node_archives())
    except BaseException:
        plane.stop()
        raise
    timings["start (imports included)"] = time.monotonic() - t0
    try:
        yield running
    finally:
        t1 = time.monotonic()
        running.stop()
        plane.stop()
        timings["teardown"] = time.monotonic() - t1
        left = leftovers(workdir)
        assert not left, "the node left this on the machine:\n" + "\n".join(left)
