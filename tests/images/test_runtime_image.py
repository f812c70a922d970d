"""The stage images run the `distill` command, and one stage of the tiny example end to end, with
its artifacts written to a mounted folder as a RayJob's volume would hold them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from support.cluster import REPO
from support.images import Image, locked_pins, podman, project_version

TINY = REPO / "examples" / "tiny"
UID = 65532  # the images' user (the Dockerfiles' USER)


def test_runtime_image_runs_distill(runtime_image: Image) -> None:
    done = podman("run", "--rm", runtime_image.ref, "--help")
    assert "stage" in done.stdout
    version = podman(
        "run",
        "--rm",
        "--entrypoint=python",
        runtime_image.ref,
        "-c",
        "import importlib.metadata as m; print(m.version('distillation-operator'))",
    )
    assert version.stdout.strip() == project_version()


SOURCE_DIGESTS = """
import hashlib, pathlib, distillation_runtime, distillation_operator
for package in (distillation_runtime, distillation_operator):
    root = pathlib.Path(package.__file__).parent
    for path in sorted(root.rglob("*.py")):
        print(f"{package.__name__}/{path.relative_to(root)}",
              hashlib.sha256(path.read_bytes()).hexdigest())
"""


def tree_digests() -> dict[str, str]:
    """sha256 of every module of both packages in this checkout."""
    found = {}
    for package, folder in (
        ("distillation_runtime", "runtime"),
        ("distillation_operator", "operator"),
    ):
        root = REPO / folder / package
        for path in sorted(root.rglob("*.py")):
            found[f"{package}/{path.relative_to(root)}"] = hashlib.sha256(
                path.read_bytes()
            ).hexdigest()
    return found


def test_each_image_holds_this_checkouts_code(
    runtime_image: Image, runtime_vllm_image: Image, quantize_image: Image
) -> None:
    """An image of changed code must run that code, not a cached build of an older tree."""
    for image in (runtime_image, runtime_vllm_image, quantize_image):
        done = podman("run", "--rm", "--entrypoint=python", image.ref, "-c", SOURCE_DIGESTS)
        installed = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        stale = sorted(k for k, v in tree_digests().items() if installed.get(k) != v)
        assert stale == [], f"{image.ref} holds other code than this checkout: {stale[:10]}"


def test_quantize_image_imports_llm_compressor(quantize_image: Image) -> None:
    done = podman(
        "run",
        "--rm",
        "--entrypoint=python",
        quantize_image.ref,
        "-c",
        "import llmcompressor, compressed_tensors, distillation_runtime; print('ok')",
    )
    assert done.stdout.strip().endswith("ok")


VLLM_ON_A_CPU = """
import importlib.metadata as m, importlib.util, torch, vllm
from distillation_runtime.spec import GenerateBackend
from distillation_runtime.stages.generate import choose_backend
print("vllm", m.version("vllm"), vllm.__version__)
found = importlib.util.find_spec("vllm") is not None
print("backend", choose_backend(GenerateBackend.AUTO, found, torch.cuda.device_count()))
"""


def test_runtime_vllm_image_imports_vllm_and_chooses_transformers_without_a_gpu(
    runtime_vllm_image: Image,
) -> None:
    """vLLM as locked imports in the image; on this GPU-less machine `auto` picks transformers
    (the generate test below runs it), the image's only CPU path."""
    done = podman("run", "--rm", "--entrypoint=python", runtime_vllm_image.ref, "-c", VLLM_ON_A_CPU)
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if " " in line)
    locked = locked_pins("runtime", "vllm")["vllm"]
    assert lines["vllm"].split() == [locked, locked]
    assert lines["backend"] == "transformers"
    assert "stage" in podman("run", "--rm", runtime_vllm_image.ref, "--help").stdout


def prepare_tiny(work: Path, prompts: int) -> None:
    """examples/tiny/prepare.py with a briefly trained teacher, and the first prompts only."""
    spec = importlib.util.spec_from_file_location("tiny_prepare", TINY / "prepare.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(work, teacher_steps=20)
    lines = (work / "prompts.jsonl").read_text().splitlines()[:prompts]
    (work / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def tiny_in_container(data: Path, prompts: int) -> dict[str, Any]:
    """The tiny example under ``data`` with its spec pointing at ``/data`` (where ``data`` is
    mounted in the container) and written to ``data/spec.yaml``, owned by the image's user."""
    prepare_tiny(data, prompts)
    spec = yaml.safe_load((TINY / "spec.yaml").read_text())
    spec["teacher"]["model"] = "/data/teacher"
    spec["student"]["model"] = "/data/student"
    spec["dataset"]["prompts"] = "/data/prompts.jsonl"
    spec["output"] = "/data/artifacts"
    (data / "spec.yaml").write_text(yaml.safe_dump(spec))
    for path in [data, *data.rglob("*")]:  # the stage runs as the image's non-root user
        os.chown(path, UID, UID)
    return spec


@pytest.mark.parametrize("name", ["runtime", "runtime-vllm"])
def test_runtime_image_runs_the_generate_stage_of_the_tiny_example(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Both stage images that generate (the vLLM one with transformers: no GPU here)."""
    runtime_image: Image = request.getfixturevalue(f"{name.replace('-', '_')}_image")
    data = tmp_path / "data"
    tiny_in_container(data, prompts=40)

    done = podman(
        "run",
        "--rm",
        "--shm-size=1g",
        f"--volume={data}:/data:rw",
        runtime_image.ref,
        "stage",
        "generate",
        "--config",
        "/data/spec.yaml",
        timeout=900,
    )
    assert "generate: " in done.stdout, done.stdout + done.stderr

    [artifact] = (data / "artifacts").glob("generate-*")
    assert (artifact / "_COMPLETE").exists()
    rows = sum(pq.read_table(artifact / f"{split}.parquet").num_rows for split in ("train", "eval"))
    assert rows == 40
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest, "the stage wrote an empty manifest"


KUBERAY_WAY = r"""
set -eu
ray start --head --disable-usage-stats --dashboard-host=127.0.0.1 --num-cpus=1 >/tmp/ray.log 2>&1
python - <<'PY'
import time, urllib.request
# KubeRay's default head readiness probe: the dashboard agent's raylet check and the GCS check
for url in ("http://127.0.0.1:52365/api/local_raylet_healthz",
            "http://127.0.0.1:8265/api/gcs_healthz"):
    for _ in range(60):
        try:
            body = urllib.request.urlopen(url, timeout=2).read().decode()
            if "success" in body:
                print("probe ok", url)
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        raise SystemExit(f"probe never answered success: {url}")
PY
# as KubeRay's submitter does: the entrypoint string split into words after --
ray job submit --address http://127.0.0.1:8265 -- $ENTRYPOINT
ray stop --force >/dev/null 2>&1 || true
"""


def test_a_stage_runs_through_rays_job_api_as_kuberay_submits_it(
    runtime_image: Image, tmp_path: Path
) -> None:
    """What KubeRay does with a RayJob: `ray start --head` in the image, its readiness probes'
    endpoints answering, and `ray job submit` of the entrypoint the operator builds (the
    preflight, with its planned --artifact URI), whose artifact lands where it was planned."""
    from distillation_operator.builders.rayjob import entrypoint
    from distillation_runtime.plan import make_plan
    from distillation_runtime.spec import PipelineSpec

    data = tmp_path / "data"
    spec = tiny_in_container(data, prompts=20)
    plan = make_plan(PipelineSpec.model_validate(spec))  # local paths: the container's /data
    # the spec from a file rather than the runtime environment (that is the Ray job's env)
    command = entrypoint("preflight", plan).replace(
        "--config-env DISTILL_SPEC", "--config /data/spec.yaml"
    )

    done = podman(
        "run",
        "--rm",
        "--shm-size=1g",
        f"--volume={data}:/data:rw",
        f"--env=ENTRYPOINT={command}",
        "--entrypoint=bash",
        runtime_image.ref,
        "-c",
        KUBERAY_WAY,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert output.count("probe ok") == 2, output
    assert "succeeded" in output.lower(), output  # ray job submit's own verdict
    artifact = data / plan.artifact("preflight").removeprefix("/data/")
    assert (artifact / "_COMPLETE").exists(), output
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["metrics"]["specProblems"] == []
