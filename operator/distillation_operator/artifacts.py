"""Reading stage artifacts' manifests (metrics, gate) from the output storage.

The operator reads with its own credentials: a ``pvc://`` output needs the claim mounted at
``$DISTILL_PVC_ROOT/<claim>`` in the operator pod, ``s3://`` the usual AWS variables (or a
workload identity). When it cannot read, stages still advance on KubeRay's word; only their
metrics (and so the quality gate) wait, and the reason is reported in status.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from distillation_operator.observed import Artifact


def read_artifact(uri: str) -> Artifact:
    """The manifest of a complete artifact, or why there is none (never raises)."""
    from distillation_runtime.storage import read_manifest

    try:
        return Artifact(manifest=read_manifest(uri, quick=True))
    except Exception as err:
        return Artifact(error=f"{type(err).__name__}: {err}"[:500])


def read_artifacts(uris: Iterable[str]) -> dict[str, Artifact]:
    return {uri: read_artifact(uri) for uri in dict.fromkeys(uris)}


def read_progress_records(uris: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The progress records the running stages wrote (progress URI -> record); those that
    cannot be read are left out (progress never holds up a reconcile)."""
    from distillation_runtime.progress import read_progress

    found = {uri: read_progress(uri) for uri in dict.fromkeys(uris)}
    return {uri: record for uri, record in found.items() if record is not None}
