"""What `skopeo inspect --config` shows of each archive: user, entrypoint, labels, version, tag,
and the compressed size (printed; the operator's is bounded)."""

from __future__ import annotations

import json
import tarfile
from typing import Any

import pytest

from support.images import Image, chart_images, project_version, require_image, skopeo_json

SOURCE = "https://github.com/distillation-dev/distillation-operator"
ENTRYPOINTS = {
    "operator": ["kopf", "run"],
    "runtime": ["distill"],
    "runtime-vllm": ["distill"],
    "quantize": ["distill"],
}
OPERATOR_MAX_COMPRESSED_MB = 150

IMAGES = list(chart_images().values())


def config_of(image: Image) -> dict[str, Any]:
    require_image(image)
    config: dict[str, Any] = skopeo_json("inspect", "--config", f"oci-archive:{image.archive}")
    inner: dict[str, Any] = config["config"]
    return inner


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_runs_as_a_fixed_non_root_user_with_an_exec_entrypoint(image: Image) -> None:
    config = config_of(image)
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ENTRYPOINTS[image.name]
    assert config["WorkingDir"] in {"/home/distill", "/workspace"}


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_labels_name_source_version_and_licence(image: Image) -> None:
    labels = config_of(image)["Labels"]
    assert labels["org.opencontainers.image.source"] == SOURCE
    assert labels["org.opencontainers.image.version"] == project_version()
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.title"] == image.ref.rsplit(":", 1)[0].split("/")[-1]


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_archive_is_tagged_with_the_charts_reference(image: Image) -> None:
    """The chart's defaults (values.yaml, appVersion) name exactly what the build made."""
    require_image(image)
    with tarfile.open(image.archive) as archive:
        member = archive.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert names == [image.ref]
    assert image.ref.endswith(f":{project_version()}")


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: i.name)
def test_compressed_size(image: Image) -> None:
    require_image(image)
    manifest = skopeo_json("inspect", "--raw", f"oci-archive:{image.archive}")
    compressed = sum(layer["size"] for layer in manifest["layers"])
    megabytes = compressed / 1e6
    print(f"{image.ref}: {megabytes:.0f} MB compressed, {len(manifest['layers'])} layers")
    if image.name == "operator":
        assert megabytes <= OPERATOR_MAX_COMPRESSED_MB, (
            f"the operator image is {megabytes:.0f} MB compressed, over "
            f"{OPERATOR_MAX_COMPRESSED_MB} MB: did torch or another ML library get in?"
        )
