"""Running stages' progress records: throttled writes, ETA, and the reader that never fails."""

from __future__ import annotations

import json
from pathlib import Path

from distillation_runtime.progress import (
    ProgressWriter,
    eta_seconds,
    progress_uri,
    read_progress,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_eta_counts_from_where_a_resumed_run_started() -> None:
    assert eta_seconds(done=60, total=100, start=50, elapsed=20.0) == 80  # 0.5 steps/s
    assert eta_seconds(done=50, total=100, start=50, elapsed=20.0) is None  # no rate yet
    assert eta_seconds(done=5, total=None, start=0, elapsed=1.0) is None


def test_writes_are_throttled_but_the_last_step_is_always_written(tmp_path: Path) -> None:
    uri = progress_uri(str(tmp_path / "out" / "train-abc"))
    assert uri == f"{tmp_path}/out/_progress/train-abc.json"  # apart from the artifacts
    clock = Clock()
    writer = ProgressWriter(uri, "train", 10, "steps", every=10.0, clock=clock)
    clock.now += 1
    writer.update(1, loss=2.5)
    first = read_progress(uri)
    assert first is not None
    assert (first["done"], first["total"], first["unit"], first["loss"]) == (1, 10, "steps", 2.5)
    assert first["percent"] == 10.0
    assert first["etaSeconds"] == 9
    clock.now += 1
    writer.update(2, loss=2.0)
    assert read_progress(uri) == first  # 1 s after the last write: not written
    clock.now += 10
    writer.update(9, loss=1.0)
    assert read_progress(uri)["done"] == 9  # type: ignore[index]
    clock.now += 0.1
    writer.update(10, loss=0.9)
    assert read_progress(uri)["done"] == 10  # type: ignore[index]
    assert not list((tmp_path / "out" / "_progress").glob("*.partial"))  # replaced whole


def test_no_uri_writes_nothing_and_a_bad_record_reads_as_none(tmp_path: Path) -> None:
    ProgressWriter(None, "train", 3, "steps").update(3)
    assert list(tmp_path.iterdir()) == []
    broken = tmp_path / "x.json"
    broken.write_text("{not json")
    assert read_progress(str(broken)) is None
    assert read_progress(str(tmp_path / "missing.json")) is None
    broken.write_text(json.dumps([1, 2]))
    assert read_progress(str(broken)) is None
