"""Fixtures for stage tests."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest

from support.net import free_port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-protocol server (moto) on loopback, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._port}"
    server.stop()


HAVE_LLMCOMPRESSOR = importlib.util.find_spec("llmcompressor") is not None
MISSING_LLMCOMPRESSOR = (
    "llm-compressor is not installed (the `quantize` extra, its own environment): run "
    "`make test-quantize`"
)


@pytest.fixture(autouse=True)
def _quantize_environment(request: pytest.FixtureRequest) -> None:
    """Tests marked ``quantize`` skip without llm-compressor, or fail when
    DISTILL_REQUIRE_QUANTIZE=1 (``make test-quantize``: a skipped check must not look green)."""
    if request.node.get_closest_marker("quantize") is None or HAVE_LLMCOMPRESSOR:
        return
    if os.environ.get("DISTILL_REQUIRE_QUANTIZE") == "1":
        pytest.fail(f"{MISSING_LLMCOMPRESSOR}; DISTILL_REQUIRE_QUANTIZE=1 forbids skipping")
    pytest.skip(MISSING_LLMCOMPRESSOR)


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server, with the AWS env vars pointing at it."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(name)
    yield name
    s3fs.S3FileSystem.clear_instance_cache()
