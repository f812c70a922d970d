"""What the demo's parts share: how they print, how `distill` is run, where pvc:// lives.

The two stand-ins and the driver script print through one ``Printer`` so that lines from three
threads never interleave mid-line, and each line says who wrote it (a stand-in always says that
it is one).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

KUBERAY_STAND_IN = "KubeRay stand-in"
KSERVE_STAND_IN = "KServe stand-in"
PVC_ROOT_ENV = "DISTILL_PVC_ROOT"
"""The variable the runtime and the operator resolve ``pvc://claim/path`` under (storage.py)."""


class Printer:
    """Whole lines to stdout, one writer at a time, flushed at once (the demo is watched live)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def say(self, text: str, who: str = "") -> None:
        """Print ``text``; ``who`` (a stand-in's name) prefixes every line of it."""
        prefix = f"[{who}] " if who else ""
        with self._lock:
            for line in text.splitlines() or [""]:
                print(f"{prefix}{line}", flush=True)


def distill_command() -> list[str]:
    """How this environment runs ``distill``: the interpreter running the demo with the CLI
    module, i.e. this virtual environment's ``distill``. Run as a module rather than through
    ``bin/distill`` so that a ``PYTHONPATH`` given to the demo (a developer pointing it at
    another checkout than the venv's editable install) reaches the stage too."""
    return [sys.executable, "-m", "distillation_runtime.cli"]


def child_env(pvc_root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process a stand-in starts: ours, ``extra`` (what the pod and the
    Ray runtime environment would set), then pvc:// pointed at the demo's local claims folder,
    which is what mounting the claims at ``$DISTILL_PVC_ROOT/<claim>`` amounts to here."""
    return {**os.environ, **(extra or {}), PVC_ROOT_ENV: str(pvc_root)}


def pvc_path(pvc_root: Path, uri: str) -> Path:
    """The local path of a ``pvc://claim/path`` URI under the demo's claims folder (a plain
    path is returned as it is)."""
    if uri.startswith("pvc://"):
        return pvc_root / uri.removeprefix("pvc://")
    return Path(uri)


def tail(path: Path, lines: int = 20, limit: int = 1800) -> str:
    """The last ``lines`` lines of a log (at most ``limit`` characters): what KubeRay shows of a
    failed driver in the RayJob's message, and what the demo prints when something failed."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-limit:]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    """The condition ``type_`` of an object's status (empty when absent)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})
