"""The images `make images` built, as the chart names them, and podman/skopeo on them.

podman runs on the project's own image storage, with the flags hack/build-images.sh keeps (one
place): ``hack/build-images.sh podman ARGS``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.cluster import REPO

CHART = REPO / "charts" / "distillation-operator"
IMAGES_DIR = Path(os.environ.get("DISTILL_IMAGES_DIR", REPO / "dist" / "images"))
BUILD_IMAGES = REPO / "hack" / "build-images.sh"


def unavailable(reason: str) -> None:
    """Skip locally, fail under CI: CI must never pass by skipping its image tests."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    for line in text.splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise AssertionError("pyproject.toml has no version line")


@dataclass(frozen=True)
class Image:
    """One image as the chart names it, and the OCI archive `make images` wrote for it."""

    name: str
    ref: str

    @property
    def archive(self) -> Path:
        repository, tag = self.ref.rsplit(":", 1)
        return IMAGES_DIR / f"{repository.rsplit('/', 1)[-1]}-{tag}.oci.tar"


def chart_images() -> dict[str, Image]:
    """The images the chart's defaults point at: what `make images` must have built."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    operator_tag = values["image"]["tag"] or chart["appVersion"]
    return {
        "operator": Image("operator", f"{values['image']['repository']}:{operator_tag}"),
        "runtime": Image("runtime", values["images"]["runtime"]),
        "runtime-vllm": Image("runtime-vllm", values["images"]["runtimeVllm"]),
        "quantize": Image("quantize", values["images"]["quantize"]),
    }


def require_image(image: Image) -> None:
    for program in ("podman", "skopeo", "runc"):
        if shutil.which(program) is None:
            unavailable(f"{program} is not installed: `make images` installs it (apt-get)")
    if not image.archive.is_file():
        unavailable(f"{image.archive} is missing: run `make images` (builds {image.ref})")


def podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """podman on the image storage the build used (its flags live in hack/build-images.sh)."""
    done = subprocess.run(
        ["bash", str(BUILD_IMAGES), "podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}{done.stdout}"
        )
    return done


def skopeo_json(*args: str) -> Any:
    done = subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"skopeo {' '.join(args)}: {done.stderr}"
    return json.loads(done.stdout)


def loaded(image: Image) -> Image:
    """The image is in the storage under the chart's reference, and it is the archive's image."""
    require_image(image)
    config = skopeo_json("inspect", "--raw", f"oci-archive:{image.archive}")["config"]["digest"]
    found = podman("image", "inspect", "--format", "{{.Id}}", image.ref, check=False)
    if found.returncode != 0 or f"sha256:{found.stdout.strip()}" != config:
        # The archive is the artifact; the storage is a cache of it (rebuild, or wiped storage).
        podman("load", "--quiet", "--input", str(image.archive), timeout=1800)
        podman("tag", config.removeprefix("sha256:"), image.ref)
    return image


def locked_pins(*extras: str) -> dict[str, str]:
    """name -> version that uv.lock pins for these extras on this platform (Linux, CPython 3.11),
    as `uv export` writes them: what an image built from this commit must hold, exactly."""
    from packaging.markers import Marker
    from packaging.utils import canonicalize_name

    uv = os.environ.get("DISTILL_UV") or shutil.which("uv")
    if uv is None:
        unavailable("uv not found: run through `make test-images` (it passes DISTILL_UV)")
        raise AssertionError("unreachable")
    flags = [f"--extra={extra}" for extra in extras]
    done = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    environment = {"python_full_version": "3.11.2", "python_version": "3.11"}
    pins: dict[str, str] = {}
    for line in done.stdout.splitlines():
        if not line or line.startswith(("#", " ", "-")):
            continue
        requirement, _, marker = line.partition(" ; ")
        name, _, version = requirement.partition("==")
        if not marker or Marker(marker).evaluate(environment):
            pins[canonicalize_name(name)] = version.strip()
    return pins


INSTALLED = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)


def installed_packages(image: Image) -> dict[str, str]:
    """name -> version of every distribution in the image's environment."""
    from packaging.utils import canonicalize_name

    done = podman("run", "--rm", "--entrypoint=python", image.ref, "-c", INSTALLED)
    return {canonicalize_name(k): v for k, v in json.loads(done.stdout).items()}
