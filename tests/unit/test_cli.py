"""``distill validate``, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DISTILL = Path(sys.executable).parent / "distill"  # the console script the package installs


def distill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DISTILL), *args], capture_output=True, text=True, cwd=REPO)


def test_validate_prints_the_spec_with_defaults() -> None:
    out = distill("validate", "crds/samples/tiny-cpu.yaml")
    assert out.returncode == 0, out.stderr
    spec = yaml.safe_load(out.stdout)
    assert spec["train"]["losses"]["logits"]["chunkSize"] == 512  # a default, not in the file
    assert spec["dataset"]["evalFraction"] == "0.1"  # as written
    assert "placement" not in spec  # cluster-only


def test_validate_names_every_bad_field(tmp_path: Path) -> None:
    manifest = yaml.safe_load((REPO / "crds/samples/tiny-cpu.yaml").read_text())
    manifest["spec"]["train"]["epochs"] = 0
    manifest["spec"]["dataset"]["evalFraction"] = 0.2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    out = distill("validate", str(bad))
    assert out.returncode == 2
    lines = bad.read_text().splitlines()
    epochs = next(i for i, line in enumerate(lines, 1) if line.strip() == "epochs: 0")
    fraction = next(i for i, line in enumerate(lines, 1) if "evalFraction" in line)
    assert (
        f"spec.train.epochs (line {epochs}): Input should be greater than or equal to 1 (got 0)"
        in out.stderr
    )
    assert f"spec.dataset.evalFraction (line {fraction}): must be a quoted decimal" in out.stderr
