"""Where a running stage is, written beside its artifact for the operator (and anyone) to read.

A 10-hour train stage must not look frozen: the stage writes a small JSON record (steps or rows
done of how many, the current loss, an ETA) to ``<output>/_progress/<stage>-<fingerprint>.json``
(apart from the artifact, which is only published when the stage ends, and from the
``<stage>-*`` names that globs over artifacts match) at most every ``WRITE_EVERY_SECONDS`` and
at its last step. The operator reads it while the stage runs and shows it in status (one status
write per stage per 30 s at most). Light on purpose (the operator imports it): json, time,
storage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

PROGRESS_FOLDER = "_progress"
WRITE_EVERY_SECONDS = 10.0
"""Seconds between two writes of one stage's record (the last step is always written)."""


def progress_uri(artifact: str) -> str:
    """Where the stage writing ``artifact`` (``<output>/<stage>-<fingerprint>``) says how far
    it is: ``<output>/_progress/<stage>-<fingerprint>.json``."""
    output, _, name = artifact.rstrip("/").rpartition("/")
    return f"{output}/{PROGRESS_FOLDER}/{name}.json"


def eta_seconds(done: int, total: int | None, start: int, elapsed: float) -> int | None:
    """Seconds left at the rate since ``start`` (a resumed run counts from where it resumed);
    None before the first unit of work or without a total."""
    if total is None or done <= start or elapsed <= 0:
        return None
    rate = (done - start) / elapsed
    return round(max(total - done, 0) / rate)


def progress_record(
    stage: str,
    done: int,
    total: int | None,
    unit: str,
    eta: int | None,
    values: Mapping[str, float],
    now: datetime,
) -> dict[str, Any]:
    """The JSON record (camelCase, like the status it ends up in)."""
    record: dict[str, Any] = {"stage": stage, "done": done, "total": total, "unit": unit}
    if total:
        record["percent"] = round(100.0 * done / total, 1)
    if eta is not None:
        record["etaSeconds"] = eta
    record.update({k: round(float(v), 6) for k, v in values.items()})
    record["updated"] = now.isoformat(timespec="seconds").replace("+00:00", "Z")
    return record


class ProgressWriter:
    """Writes one stage's progress to ``uri`` (nothing when ``uri`` is None), throttled."""

    def __init__(
        self,
        uri: str | None,
        stage: str,
        total: int | None,
        unit: str,
        *,
        start: int = 0,
        every: float = WRITE_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uri, self.stage, self.total, self.unit = uri, stage, total, unit
        self.start, self.every, self.clock = start, every, clock
        self.began = clock()
        self.last_write: float | None = None

    def update(self, done: int, **values: float) -> None:
        """Record ``done`` units; written when the last write is ``every`` seconds old, or at
        the end. A store that refuses the write never stops the stage."""
        if self.uri is None:
            return
        now = self.clock()
        finished = self.total is not None and done >= self.total
        if not finished and self.last_write is not None and now - self.last_write < self.every:
            return
        self.last_write = now
        eta = eta_seconds(done, self.total, self.start, now - self.began)
        record = progress_record(
            self.stage, done, self.total, self.unit, eta, values, datetime.now(UTC)
        )
        try:
            write_json(self.uri, record)
        except OSError as err:
            print(f"{self.stage}: progress not written to {self.uri}: {err}", flush=True)


def write_json(uri: str, data: Mapping[str, Any]) -> None:
    """A small JSON file at ``uri``, replaced whole (readers never see half a record)."""
    from distillation_runtime.storage import filesystem, parse_uri

    body = (json.dumps(data, sort_keys=True) + "\n").encode()
    location = parse_uri(uri)
    if location.is_local:
        path = location.local_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(body)
        partial.replace(path)
        return
    fs, path_ = filesystem(uri)
    fs.pipe_file(path_, body)  # one PUT: an object store replaces an object atomically


def read_progress(uri: str, *, quick: bool = True) -> dict[str, Any] | None:
    """The record at ``uri``; None when there is none (yet) or it cannot be read (progress is
    a convenience: it never fails a reconcile)."""
    from distillation_runtime.storage import filesystem

    try:
        fs, path = filesystem(uri, quick=quick)
        if not fs.exists(path):
            return None
        data = json.loads(fs.cat_file(path))
    except Exception:  # any store error (timeouts, auth) just means "not known now"
        return None
    return data if isinstance(data, dict) else None
