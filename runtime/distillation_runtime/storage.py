"""Where models, prompts and artifacts live: URIs, file systems, downloads and atomic publishing.

The spec names storage with URIs (``hf://org/name[@revision]``, ``s3://bucket/path``,
``gs://bucket/path``, ``pvc://claim/path``, ``file://...`` or a plain path). This module turns
one into a file system (fsspec) or a local folder, and publishes a stage's artifact so that a
killed stage never looks complete: the files first, ``manifest.json`` next, the completion marker
last (docs/design.md: content-addressed artifacts ``<output>/<stage>-<fingerprint>/`` with a
marker).

Importing it is cheap: fsspec, s3fs, gcsfs and huggingface_hub are imported where they are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillation_runtime import __version__
from distillation_runtime.plan import COMPLETION_MARKER

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem  # type: ignore[import-untyped]

MANIFEST = "manifest.json"
PVC_ROOT_ENV = "DISTILL_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"
SCHEMES = ("hf", "s3", "gs", "pvc", "file")
LOCAL_SCHEMES = ("file", "pvc")

# Distributions recorded in every manifest when installed (read from metadata, never imported).
MANIFEST_LIBRARIES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "ray",
    "vllm",
    "llmcompressor",
    "compressed-tensors",
    "pyarrow",
    "numpy",
    "pydantic",
    "fsspec",
    "s3fs",
    "huggingface-hub",
)

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_CLAIM_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A parsed storage URI.

    ``bucket`` is the S3/GCS bucket, the PVC claim or the Hugging Face repo id (empty for local
    paths); ``path`` is the key inside it (the whole path for local files); ``revision`` is only
    set for ``hf://`` URIs that name one.
    """

    scheme: str
    bucket: str
    path: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        """True when the data is a folder on this machine (plain path, file:// or a mounted PVC)."""
        return self.scheme in LOCAL_SCHEMES

    def local_path(self) -> Path:
        """The folder or file on this machine; pvc:// resolves under ``$DISTILL_PVC_ROOT`` now,
        so the operator's mount point can be changed without re-parsing."""
        if self.scheme == "file":
            return Path(self.path).expanduser()
        if self.scheme == "pvc":
            root = Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)
            return root / self.bucket / self.path
        raise ValueError(f"{self.uri} is not on a local file system (scheme {self.scheme}://)")

    @property
    def uri(self) -> str:
        """The location written back as a URI (for messages and manifests)."""
        if self.scheme == "file":
            return self.path
        if self.scheme == "hf":
            return f"hf://{self.bucket}" + (f"@{self.revision}" if self.revision else "")
        return f"{self.scheme}://{self.bucket}" + (f"/{self.path}" if self.path else "")


def parse_uri(uri: str) -> Location:
    """Split a storage URI into its parts; a malformed one raises a ValueError saying why."""
    if not uri or uri != uri.strip() or any(c.isspace() for c in uri):
        raise ValueError(
            f"storage URI {uri!r} is empty or contains whitespace; use hf://org/name, "
            "s3://bucket/path, gs://bucket/path, pvc://claim/path or a local path"
        )
    match = _SCHEME_RE.match(uri)
    if match is None:
        if ":" in uri.split("/", 1)[0]:
            raise ValueError(
                f"storage URI {uri!r} has a colon but no '://': write scheme://..., one of "
                f"{', '.join(s + '://' for s in SCHEMES)}, or a plain path"
            )
        return Location("file", "", uri)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise ValueError(
            f"storage URI {uri!r} has unsupported scheme {scheme}://; use one of "
            f"{', '.join(s + '://' for s in SCHEMES)} or a plain path"
        )
    if scheme == "file":
        if not rest:
            raise ValueError(f"storage URI {uri!r} has no path after file://")
        return Location("file", "", rest)
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        repo = repo.rstrip("/")
        if not _HF_REPO_RE.match(repo) or (rest.count("@") > 1) or ("@" in rest and not revision):
            raise ValueError(
                f"Hugging Face URI {uri!r} is malformed: write hf://org/name or "
                "hf://org/name@revision (a branch, tag or commit)"
            )
        return Location("hf", repo, "", revision or None)
    bucket, _, path = rest.partition("/")
    path = path.strip("/")
    if not bucket:
        what = "claim" if scheme == "pvc" else "bucket"
        raise ValueError(f"storage URI {uri!r} names no {what}: write {scheme}://{what}/path")
    if scheme == "pvc":
        if not _CLAIM_RE.match(bucket) or len(bucket) > 253:
            raise ValueError(
                f"pvc URI {uri!r}: {bucket!r} is not a valid PersistentVolumeClaim name "
                "(lowercase letters, digits, '-' and '.')"
            )
        if ".." in path.split("/"):
            raise ValueError(f"pvc URI {uri!r}: '..' would leave the claim; use a path inside it")
    return Location(scheme, bucket, path)


# --------------------------------------------------------------------------------------------
# File systems
# --------------------------------------------------------------------------------------------


QUICK_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}}
"""botocore settings for a probe that must not hang (the operator reading manifests on its
reconcile threads): an unreachable store is an error in seconds, not minutes."""


def filesystem(uri: str, *, quick: bool = False) -> tuple[AbstractFileSystem, str]:
    """An fsspec file system for ``uri`` and the path to use with it.

    s3 reads its endpoint from ``AWS_ENDPOINT_URL`` (MinIO, Ceph, a test server) and credentials
    the usual boto way (env vars, config files, IRSA). Listings are not cached: another pod may
    have written since, and a stale listing would hide a completion marker. ``quick``: short
    timeouts and no retries (``QUICK_S3_CONFIG``), for probes.
    """
    location = parse_uri(uri)
    if location.is_local:
        from fsspec.implementations.local import (  # type: ignore[import-untyped]
            LocalFileSystem,
        )

        return LocalFileSystem(), str(location.local_path().absolute())
    key = f"{location.bucket}/{location.path}".rstrip("/")
    if location.scheme == "s3":
        import s3fs  # type: ignore[import-untyped]

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint or None,
            use_listings_cache=False,
            skip_instance_cache=quick,
            config_kwargs=QUICK_S3_CONFIG if quick else {},
        )
        if quick:
            fs.retries = 1  # s3fs's own retry loop, on top of botocore's
        return fs, key
    if location.scheme == "gs":
        try:
            import gcsfs  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            raise ImportError(
                f"{uri} is on Google Cloud Storage, which needs the gcsfs package: "
                "pip install gcsfs (or use s3://, pvc:// or a local path)"
            ) from None
        return gcsfs.GCSFileSystem(use_listings_cache=False), key
    raise ValueError(
        f"{uri}: hf:// names a model repository, not a folder of files; use hf:// only for "
        "teacher.model / student.model, and s3://, gs://, pvc:// or a local path for data "
        "and output"
    )


def _uri_hash(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def local_model(uri: str, cache_dir: Path) -> Path:
    """A local folder holding the model at ``uri``, downloading it once if it is remote.

    Local and pvc:// folders are used in place. s3:// and gs:// prefixes are downloaded to
    ``cache_dir/<hash of uri>`` through a temporary sibling renamed into place, so a killed
    download is never mistaken for a model. hf:// goes through the Hugging Face hub's own cache
    (``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` apply).
    """
    location = parse_uri(uri)
    if location.is_local:
        path = location.local_path()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model {uri}: no folder at {path}"
                + (
                    f" (pvc:// claims are mounted under ${PVC_ROOT_ENV}, now "
                    f"{os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT})"
                    if location.scheme == "pvc"
                    else ""
                )
                + "; check the path, or point the spec at the folder with config.json"
            )
        return path
    if location.scheme == "hf":
        return _hf_snapshot(location, cache_dir)
    return _download_prefix(uri, cache_dir)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
"""Files that hold weights: what a metadata fetch leaves behind."""
METADATA_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
"""What a metadata fetch from the hub takes: config, tokenizer and chat template files."""


def model_metadata(uri: str, cache_dir: Path) -> Path:
    """A local folder with the model's config and tokenizer but not its weights: what a check
    of shapes and vocabularies needs, in seconds even for a 70B model. Local and pvc:// folders
    are used in place (nothing to save)."""
    location = parse_uri(uri)
    if location.is_local:
        return local_model(uri, cache_dir)
    if location.scheme == "hf":
        return _hf_snapshot(location, cache_dir, patterns=METADATA_PATTERNS)
    return _download_prefix(uri, cache_dir, metadata_only=True)


def _hf_snapshot(location: Location, cache_dir: Path, patterns: list[str] | None = None) -> Path:
    """Thin wrapper over ``snapshot_download`` (only files matching ``patterns`` when given)
    that names the repo when it fails."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            location.bucket,
            revision=location.revision,
            token=os.environ.get("HF_TOKEN"),
            cache_dir=cache_dir,
            allow_patterns=patterns,
        )
    except RevisionNotFoundError as err:
        raise FileNotFoundError(
            f"model {location.uri}: revision {location.revision!r} does not exist in "
            f"{location.bucket}; use an existing branch, tag or commit"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"model {location.uri}: repository {location.bucket} was not found or needs "
            "access; check the name, and for a private or gated model set HF_TOKEN"
        ) from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"model {location.uri}: {location.bucket} is not in the cache at {cache_dir} and "
            "the hub cannot be reached (HF_HUB_OFFLINE is set or there is no network); "
            "download it beforehand, unset HF_HUB_OFFLINE, or copy it to s3:// or a pvc://"
        ) from err
    return Path(folder)


def complete_children(uri: str) -> list[str]:
    """Names of the complete artifacts directly under the prefix ``uri`` (their marker is
    there: written last), for a reader choosing among them; none when the prefix is empty."""
    fs, root = filesystem(uri)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    names = [str(p).rstrip("/").rpartition("/")[2] for p in entries]
    return sorted(n for n in names if fs.exists(f"{root}/{n}/{COMPLETION_MARKER}"))


def fetch_artifact(uri: str, dest: Path) -> Path:
    """Download the complete artifact ``uri`` to the new folder ``dest`` (through a partial
    sibling renamed last, so a killed download leaves no folder that looks whole)."""
    if not artifact_complete(uri):
        raise FileNotFoundError(f"{uri} is not a complete artifact (no {COMPLETION_MARKER})")
    fs, root = filesystem(uri)
    remotes = sorted(p for p in fs.find(root) if not p.endswith("/"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_sibling(dest)
    try:
        locals_ = [str(partial / p[len(root) :].lstrip("/")) for p in remotes]
        for local in locals_:
            Path(local).parent.mkdir(parents=True, exist_ok=True)
        fs.get(remotes, locals_)
        partial.rename(dest)
    finally:
        _remove_tree(partial)
    return dest


def remove_artifact(uri: str) -> None:
    """Delete an artifact, its marker first (a reader never takes the rest for whole)."""
    fs, root = filesystem(uri)
    if fs.exists(f"{root}/{COMPLETION_MARKER}"):
        fs.rm_file(f"{root}/{COMPLETION_MARKER}")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _download_prefix(uri: str, cache_dir: Path, *, metadata_only: bool = False) -> Path:
    """Download an object-store prefix once (only its small files with ``metadata_only``); the
    rename into place is the commit point."""
    dest = cache_dir / (_uri_hash(uri) + ("-metadata" if metadata_only else ""))
    if (dest / COMPLETION_MARKER).exists():
        return dest
    fs, root = filesystem(uri)
    remotes = sorted(
        p
        for p in fs.find(root)
        if not p.endswith("/") and not (metadata_only and p.endswith(WEIGHT_SUFFIXES))
    )
    if not remotes:
        raise FileNotFoundError(
            f"model {uri}: no files under that prefix; check the bucket and path "
            "(and AWS_ENDPOINT_URL / credentials for a non-AWS store)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = _partial_sibling(dest)
    try:
        # a prefix keeps its layout; a single object keeps its name
        locals_ = [
            str(partial / (p[len(root) :].lstrip("/") or p.rsplit("/", 1)[-1])) for p in remotes
        ]
        for local in locals_:
            Path(local).parent.mkdir(parents=True, exist_ok=True)
        fs.get(remotes, locals_)
        (partial / COMPLETION_MARKER).write_text(uri + "\n")
        if dest.exists():  # a leftover without marker: not ours to trust
            _remove_tree(dest)
        try:
            partial.rename(dest)
        except OSError:
            if not (dest / COMPLETION_MARKER).exists():  # not a concurrent winner: a real error
                raise
    finally:
        _remove_tree(partial)
    return dest


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    """Size on disk of every file under ``folder`` (a model's weights, config, tokenizer)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _partial_sibling(dest: Path) -> Path:
    return dest.with_name(f"{dest.name}.partial-{secrets.token_hex(4)}")


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(parent: Path | None = None) -> Iterator[Path]:
    """A scratch folder for a stage to fill before ``write_artifact``; removed afterwards.

    Pass ``parent`` on the output's file system to make ``write_artifact(..., move=True)`` a
    rename instead of a copy.
    """
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix="distill-stage-", dir=parent, ignore_cleanup_errors=True
    ) as folder:
        yield Path(folder)


def artifact_complete(uri: str) -> bool:
    """True when the artifact's completion marker exists (it is written last)."""
    fs, path = filesystem(uri)
    return bool(fs.exists(f"{path}/{COMPLETION_MARKER}"))


def _manifest_bytes(manifest: Mapping[str, Any], uri: str) -> bytes:
    try:
        text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"manifest for {uri} is not plain JSON ({err}); pass numbers, strings, lists and "
            "dicts (e.g. float(tensor), str(path))"
        ) from err
    return (text + "\n").encode()


def write_artifact(
    uri: str, local_folder: Path, manifest: Mapping[str, Any], *, move: bool = False
) -> None:
    """Publish a finished local folder at ``uri`` with ``manifest.json``, marker last.

    Local and pvc:// outputs are copied (or moved, ``move=True``) into ``<dir>.partial-<random>``
    and renamed into place before the marker is written, so a killed write leaves nothing that
    ``artifact_complete`` accepts and a re-run replaces it. Object stores have no rename: files
    are uploaded first, then the manifest, then the marker. An artifact already complete is left
    as it is (the path is content-addressed: the first complete write wins).
    """
    if not local_folder.is_dir():
        raise FileNotFoundError(f"cannot publish {uri}: {local_folder} is not a folder")
    if (local_folder / COMPLETION_MARKER).exists():
        raise ValueError(
            f"cannot publish {uri}: {local_folder} already has a {COMPLETION_MARKER} marker; "
            "write_artifact adds it last, remove it from the stage's output"
        )
    body = _manifest_bytes(manifest, uri)
    if artifact_complete(uri):
        return
    location = parse_uri(uri)
    if location.is_local:
        _publish_local(location.local_path(), local_folder, body, move)
    else:
        _publish_remote(uri, local_folder, body)


def _publish_local(dest: Path, local_folder: Path, manifest: bytes, move: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_sibling(dest)
    try:
        if move:
            shutil.move(local_folder, partial)
        else:
            shutil.copytree(local_folder, partial)
        (partial / MANIFEST).write_bytes(manifest)
        if dest.exists():  # renamed into place by a killed writer before its marker: stale
            stale = _partial_sibling(dest)
            dest.rename(stale)
            _remove_tree(stale)
        try:
            partial.rename(dest)
        except OSError:
            if (dest / COMPLETION_MARKER).exists():  # a concurrent writer finished first
                return
            raise
    finally:
        _remove_tree(partial)
    (dest / COMPLETION_MARKER).write_text(datetime.now(UTC).isoformat() + "\n")


def _publish_remote(uri: str, local_folder: Path, manifest: bytes) -> None:
    fs, root = filesystem(uri)
    if fs.exists(root):  # files of an interrupted attempt: remove so none outlive this one
        fs.rm(root, recursive=True)
    files = sorted(p for p in local_folder.rglob("*") if p.is_file())
    if files:
        fs.put(
            [str(p) for p in files],
            [f"{root}/{p.relative_to(local_folder).as_posix()}" for p in files],
        )
    fs.pipe_file(f"{root}/{MANIFEST}", manifest)
    fs.pipe_file(f"{root}/{COMPLETION_MARKER}", (datetime.now(UTC).isoformat() + "\n").encode())


def read_manifest(uri: str, *, quick: bool = False) -> dict[str, Any]:
    """The manifest of a complete artifact; an unfinished one is an error, not a half answer.
    ``quick``: fail in seconds when the store does not answer (see ``filesystem``)."""
    fs, path = filesystem(uri, quick=quick)
    if not fs.exists(f"{path}/{COMPLETION_MARKER}"):
        raise FileNotFoundError(
            f"artifact {uri} is not complete (no {COMPLETION_MARKER} marker): its stage has not "
            "finished or was interrupted; run the stage again"
        )
    data = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))
    if not isinstance(data, dict):
        raise ValueError(f"{uri}/{MANIFEST} is not a JSON object; the artifact is corrupt")
    return data


def library_versions() -> dict[str, str]:
    """Python and the installed ML libraries' versions, read from package metadata (no imports)."""
    versions = {"python": platform.python_version()}
    for name in MANIFEST_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def make_manifest(
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    metrics: Mapping[str, Any],
    started: datetime,
    finished: datetime,
) -> dict[str, Any]:
    """What a stage's artifact records about itself: enough to reproduce and audit it.

    ``inputs`` maps each input stage to the artifact URI it read; times should be timezone-aware
    (naive ones are taken as UTC).
    """
    start, end = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (started, finished))
    return {
        "stage": str(stage),
        "config": dict(config),
        "inputs": dict(inputs),
        "metrics": dict(metrics),
        "started": start.isoformat(),
        "finished": end.isoformat(),
        "durationSeconds": round((end - start).total_seconds(), 3),
        "runtimeVersion": __version__,
        "libraries": library_versions(),
    }
