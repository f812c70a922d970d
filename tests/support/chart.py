"""The chart's README, read the way its tests need it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "distillation-operator"


def readme_values_examples() -> list[dict[str, Any]]:
    """The chart README's ```yaml blocks that are values files a user would pass with -f (the
    Kubernetes objects shown beside them, such as Argo CD's argocd-cm, are not)."""
    text = (CHART / "README.md").read_text()
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    return [b for b in blocks if isinstance(b, dict) and "kind" not in b]
