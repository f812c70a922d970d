"""Image tests: the images `make images` built (dist/images/*.oci.tar), inspected and run.

They run the images with podman on the project's own image storage (``hack/build-images.sh
podman``), so what they run is what the build wrote. Locally a missing tool or image skips them
with the command that makes it; under CI=true it fails them, so CI never passes by skipping.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.images import Image, chart_images, loaded, podman
from support.tiers import deselect_unless_asked

DESELECTED = pytest.StashKey[int]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark these tests `images`; they run only when asked for (`-m images`, which `make
    test-images` passes), since they need `make images` first (minutes, ~20 GB of disk). A plain
    `pytest` (make test) deselects them and says so."""
    if count := deselect_unless_asked(config, items, Path(__file__).parent, "images"):
        config.stash[DESELECTED] = count


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if count := config.stash.get(DESELECTED, 0):
        terminalreporter.write_line(
            f"{count} image tests deselected: `make test-images` builds the images and runs them"
        )


@pytest.fixture(scope="session")
def images() -> dict[str, Image]:
    return chart_images()


@pytest.fixture(scope="session")
def operator_image(images: dict[str, Image]) -> Image:
    return loaded(images["operator"])


@pytest.fixture(scope="session")
def runtime_image(images: dict[str, Image]) -> Image:
    return loaded(images["runtime"])


@pytest.fixture(scope="session")
def runtime_vllm_image(images: dict[str, Image]) -> Image:
    return loaded(images["runtime-vllm"])


@pytest.fixture(scope="session")
def quantize_image(images: dict[str, Image]) -> Image:
    return loaded(images["quantize"])


@pytest.fixture
def container_name() -> Iterator[str]:
    """A container name of the test's own; the container is removed afterwards."""
    name = f"distill-test-{uuid.uuid4().hex[:10]}"
    yield name
    podman("rm", "--force", "--ignore", name, check=False)
