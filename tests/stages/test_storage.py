"""Storage: URIs, model sources and artifacts that never look complete unless they are.

S3 is a real S3-protocol server (moto) on loopback; the Hugging Face hub is exercised offline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import pytest

from distillation_runtime import __version__, storage
from distillation_runtime.plan import COMPLETION_MARKER
from distillation_runtime.storage import (
    Location,
    artifact_complete,
    filesystem,
    local_model,
    make_manifest,
    model_metadata,
    parse_uri,
    read_manifest,
    staging_dir,
    write_artifact,
)

REPO = Path(__file__).resolve().parents[2]


def model_folder(root: Path) -> Path:
    (root / "shards").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "shards" / "model-00001.safetensors").write_bytes(b"\x00\x01weights")
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


MANIFEST = {"stage": "train", "metrics": {"loss": 1.25}}


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://org/name", Location("hf", "org/name", "", None)),
        ("hf://org/name@v1.2", Location("hf", "org/name", "", "v1.2")),
        ("hf://gpt2", Location("hf", "gpt2", "", None)),
        ("s3://bucket/models/m/", Location("s3", "bucket", "models/m")),
        ("s3://bucket", Location("s3", "bucket", "")),
        ("gs://bucket/a/b", Location("gs", "bucket", "a/b")),
        ("pvc://models/llama/8b", Location("pvc", "models", "llama/8b")),
        ("file:///abs/dir", Location("file", "", "/abs/dir")),
        ("relative/dir", Location("file", "", "relative/dir")),
        ("/abs/dir", Location("file", "", "/abs/dir")),
    ],
)
def test_uris_parse_into_their_parts(uri, expected) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("", "empty"),
        ("s3://bucket/a b", "whitespace"),
        ("ftp://host/x", "unsupported scheme ftp://"),
        ("s3://", "names no bucket"),
        ("s3:///key", "names no bucket"),
        ("pvc:///path", "names no claim"),
        ("pvc://Bad_Claim/x", "not a valid PersistentVolumeClaim name"),
        ("pvc://claim/../../etc", "would leave the claim"),
        ("hf://org/name@", "hf://org/name@revision"),
        ("hf://org/na/me", "hf://org/name"),
        ("c:relative", "no '://'"),
    ],
)
def test_malformed_uris_are_refused_with_the_reason(uri, says) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as err:
        parse_uri(uri)
    assert repr(uri) in str(err.value)


def test_pvc_uris_map_to_the_mounted_claim(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(storage.PVC_ROOT_ENV, raising=False)
    assert parse_uri("pvc://models/llama").local_path() == Path("/mnt/pvc/models/llama")
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path))
    folder = model_folder(tmp_path / "models" / "llama")
    assert local_model("pvc://models/llama", tmp_path / "cache") == folder
    with pytest.raises(FileNotFoundError, match=storage.PVC_ROOT_ENV) as err:
        local_model("pvc://models/missing", tmp_path / "cache")
    assert str(tmp_path / "models" / "missing") in str(err.value)


def test_local_models_are_used_in_place(tmp_path) -> None:
    folder = model_folder(tmp_path / "m")
    assert local_model(str(folder), tmp_path / "cache") == folder
    assert local_model(f"file://{folder}", tmp_path / "cache") == folder
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="no folder at"):
        local_model(str(tmp_path / "nope"), tmp_path / "cache")


def test_gs_without_gcsfs_says_what_to_install() -> None:
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed")
    with pytest.raises(ImportError, match="pip install gcsfs"):
        filesystem("gs://bucket/prompts.jsonl")


def test_hf_is_for_models_only() -> None:
    with pytest.raises(ValueError, match=r"only for teacher\.model / student\.model"):
        filesystem("hf://org/name")


# --------------------------------------------------------------------------------------------
# Hugging Face hub, offline
# --------------------------------------------------------------------------------------------


def run_offline(script: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def test_hf_model_offline_and_not_cached_names_the_repo(tmp_path) -> None:
    out = run_offline(
        f"""
        from pathlib import Path
        from distillation_runtime.storage import local_model
        try:
            local_model("hf://acme/tiny-teacher@v2", Path({str(tmp_path / "cache")!r}))
        except FileNotFoundError as err:
            print(err)
        """,
        tmp_path / "home",
    )
    assert out.returncode == 0, out.stderr
    assert "hf://acme/tiny-teacher@v2" in out.stdout
    assert "HF_HUB_OFFLINE" in out.stdout


def test_hf_model_comes_from_the_cache_at_the_requested_revision(tmp_path) -> None:
    # The hub's own cache layout: refs/<revision> holds the commit, snapshots/<commit> the files.
    repo = tmp_path / "cache" / "models--acme--tiny-teacher"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "v2").write_text(commit)
    model_folder(repo / "snapshots" / commit)
    out = run_offline(
        f"""
        from pathlib import Path
        from distillation_runtime.storage import local_model
        print(local_model("hf://acme/tiny-teacher@v2", Path({str(tmp_path / "cache")!r})))
        """,
        tmp_path / "home",
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == repo / "snapshots" / commit


# --------------------------------------------------------------------------------------------
# Artifacts on a local file system
# --------------------------------------------------------------------------------------------


def test_a_local_artifact_is_published_whole_with_its_manifest_and_marker(tmp_path) -> None:
    uri = str(tmp_path / "out" / "train-abc123")
    assert not artifact_complete(uri)
    with staging_dir() as stage:
        model_folder(stage)
        write_artifact(uri, stage, MANIFEST)
        assert tree(stage)  # copied, not consumed
    assert artifact_complete(uri)
    assert read_manifest(uri) == MANIFEST
    published = tree(Path(uri))
    assert set(published) == {
        "config.json",
        "shards/model-00001.safetensors",
        "manifest.json",
        COMPLETION_MARKER,
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train-abc123"]


def test_moving_a_staged_folder_publishes_it_and_cleans_up(tmp_path) -> None:
    uri = f"file://{tmp_path}/out/generate-1"
    with staging_dir(tmp_path / "scratch") as stage:
        model_folder(stage)
        write_artifact(uri, stage, MANIFEST, move=True)
        assert not stage.exists()
    assert artifact_complete(uri)
    assert "config.json" in tree(tmp_path / "out" / "generate-1")
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_complete_artifact_is_kept_when_written_again(tmp_path) -> None:
    uri = str(tmp_path / "train-1")
    first, second = model_folder(tmp_path / "a"), model_folder(tmp_path / "b")
    (second / "config.json").write_text("{}")
    write_artifact(uri, first, {"run": 1})
    write_artifact(uri, second, {"run": 2})
    assert read_manifest(uri) == {"run": 1}
    assert (Path(uri) / "config.json").read_text() == '{"model_type": "llama"}'


def test_a_manifest_that_is_not_json_publishes_nothing(tmp_path) -> None:
    uri = str(tmp_path / "train-1")
    with pytest.raises(ValueError, match="not plain JSON"):
        write_artifact(uri, model_folder(tmp_path / "m"), {"when": datetime.now(UTC)})
    assert not Path(uri).exists()


def test_reading_the_manifest_of_an_unfinished_artifact_is_an_error(tmp_path) -> None:
    folder = model_folder(tmp_path / "train-1")
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not complete"):
        read_manifest(str(folder))


KILL_SCRIPT = """
import os, pathlib, sys
from distillation_runtime.storage import write_artifact

rename = pathlib.Path.rename
def killed(self, target):
    if sys.argv[1] == "after-rename":
        rename(self, target)
    os._exit(3)  # like SIGKILL: no finally blocks, no cleanup
pathlib.Path.rename = killed
write_artifact(sys.argv[2], pathlib.Path(sys.argv[3]), {"run": "killed"})
"""


@pytest.mark.parametrize("moment", ["before-rename", "after-rename"])
def test_a_write_killed_midway_is_never_complete_and_a_rerun_replaces_it(tmp_path, moment) -> None:
    uri = str(tmp_path / "out" / "train-abc")
    killed = model_folder(tmp_path / "killed")
    (killed / "stale.bin").write_bytes(b"from the killed run")
    out = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, moment, uri, str(killed)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr
    assert Path(uri).exists() == (moment == "after-rename")
    assert not artifact_complete(uri)
    with pytest.raises(FileNotFoundError, match="not complete"):
        read_manifest(uri)

    write_artifact(uri, model_folder(tmp_path / "rerun"), {"run": "rerun"})
    assert artifact_complete(uri)
    assert read_manifest(uri) == {"run": "rerun"}
    assert "stale.bin" not in tree(Path(uri))


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def test_the_manifest_records_what_reproduces_the_stage() -> None:
    started = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    manifest = make_manifest(
        "train",
        {"epochs": 2},
        {"generate": "s3://b/out/generate-123"},
        {"loss": 0.5},
        started,
        started + timedelta(seconds=90),
    )
    assert manifest["stage"] == "train"
    assert manifest["config"] == {"epochs": 2}
    assert manifest["inputs"] == {"generate": "s3://b/out/generate-123"}
    assert manifest["metrics"] == {"loss": 0.5}
    assert manifest["durationSeconds"] == 90
    assert manifest["started"] == "2025-01-02T03:04:05+00:00"
    assert manifest["runtimeVersion"] == __version__
    assert manifest["libraries"]["pyarrow"] == metadata.version("pyarrow")
    assert manifest["libraries"]["python"] == ".".join(map(str, sys.version_info[:3]))
    json.dumps(manifest)


def test_storage_and_data_import_nothing_heavy_even_when_writing_a_manifest() -> None:
    heavy = ("torch", "transformers", "pyarrow", "fsspec", "s3fs", "huggingface_hub", "ray")
    code = (
        "import sys, datetime as d\n"
        "from distillation_runtime import data, storage\n"
        "t = d.datetime.now(d.UTC)\n"
        "storage.make_manifest('train', {}, {}, {}, t, t)\n"
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


def test_an_s3_artifact_is_published_with_its_manifest_and_marker(tmp_path, bucket) -> None:
    import s3fs

    uri = f"s3://{bucket}/models/support-8b/train-abc"
    assert not artifact_complete(uri)
    write_artifact(uri, model_folder(tmp_path / "m"), MANIFEST)
    assert artifact_complete(uri)
    assert read_manifest(uri) == MANIFEST
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = sorted(p.removeprefix(f"{bucket}/models/support-8b/train-abc/") for p in fs.find(uri))
    assert keys == sorted(
        [COMPLETION_MARKER, "config.json", "manifest.json", "shards/model-00001.safetensors"]
    )


def test_an_s3_write_interrupted_before_the_marker_is_never_complete(tmp_path, bucket) -> None:
    import s3fs

    uri = f"s3://{bucket}/out/train-abc"
    killed = model_folder(tmp_path / "killed")
    (killed / "stale.bin").write_bytes(b"from the killed run")
    real_pipe = s3fs.S3FileSystem._pipe_file

    async def dies_at_the_marker(self, path, data, **kwargs):
        if path.endswith(COMPLETION_MARKER):
            raise ConnectionError("pod killed")
        return await real_pipe(self, path, data, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3fs.S3FileSystem, "_pipe_file", dies_at_the_marker)
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(ConnectionError, match="pod killed"):
            write_artifact(uri, killed, {"run": "killed"})
    s3fs.S3FileSystem.clear_instance_cache()
    fs, root = filesystem(uri)
    assert fs.exists(f"{root}/manifest.json")
    assert not artifact_complete(uri)
    with pytest.raises(FileNotFoundError, match="not complete"):
        read_manifest(uri)

    write_artifact(uri, model_folder(tmp_path / "rerun"), {"run": "rerun"})
    assert read_manifest(uri) == {"run": "rerun"}
    assert not fs.exists(f"{root}/stale.bin")


def test_an_s3_model_is_downloaded_once(tmp_path, bucket) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    source = model_folder(tmp_path / "src")
    for path, body in tree(source).items():
        fs.pipe_file(f"{bucket}/models/m/{path}", body)
    fs.pipe_file(f"{bucket}/models/m-other/decoy.bin", b"another model")  # same name prefix
    uri = f"s3://{bucket}/models/m"

    cache = tmp_path / "cache"
    folder = local_model(uri, cache)
    assert folder.parent == cache
    assert {k: v for k, v in tree(folder).items() if k != COMPLETION_MARKER} == tree(source)
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no partial download left

    fs.rm(f"{bucket}/models/m", recursive=True)  # a second call must not need the bucket
    assert local_model(uri, cache) == folder
    assert tree(folder)["config.json"] == b'{"model_type": "llama"}'


def test_a_metadata_fetch_of_an_s3_model_leaves_the_weights_behind(tmp_path, bucket) -> None:
    """What the preflight reads of a 70B teacher: its config and tokenizer, not 140 GB."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    source = model_folder(tmp_path / "src")
    (source / "tokenizer.json").write_text('{"model": {}}')
    (source / "pytorch_model.bin").write_bytes(b"old-style weights")
    for path, body in tree(source).items():
        fs.pipe_file(f"{bucket}/models/m/{path}", body)
    uri = f"s3://{bucket}/models/m"

    folder = model_metadata(uri, tmp_path / "cache")
    assert set(tree(folder)) == {"config.json", "tokenizer.json", COMPLETION_MARKER}
    assert local_model(uri, tmp_path / "cache") != folder  # the whole model is cached apart
    assert "shards/model-00001.safetensors" in tree(local_model(uri, tmp_path / "cache"))


def test_a_missing_s3_model_names_the_uri(tmp_path, bucket) -> None:
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nothing/here"):
        local_model(f"s3://{bucket}/nothing/here", tmp_path / "cache")


def test_a_quick_probe_of_a_store_that_never_answers_fails_with_the_reason(monkeypatch):
    """The operator reads manifests on its reconcile threads: a store that accepts connections
    but never answers is an error naming the timeout, not a thread held for minutes."""
    import socket
    import threading

    from distillation_operator.artifacts import read_artifact

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    try:
        artifact = read_artifact("s3://silent/out/generate-0123456789ab")
    finally:
        stop.set()
        for connection in held:
            connection.close()
        silent.close()
    assert not artifact.complete
    assert "timeout" in (artifact.error or "").lower(), artifact.error
