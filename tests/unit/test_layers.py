"""The layer rules of docs/design.md that import-linter cannot see: import cost, runtime surface."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "ray", "vllm", "llmcompressor", "kopf", "kubernetes")
RUNTIME_MODULES_THE_OPERATOR_MAY_USE = {
    "distillation_runtime",
    "distillation_runtime.spec",
    "distillation_runtime.fields",
    "distillation_runtime.plan",
    "distillation_runtime.stages",  # the stage table; each stage's module loads when it runs
    "distillation_runtime.stages.base",
    "distillation_runtime.yamlio",
    "distillation_runtime.storage",  # URIs and manifests; fsspec/s3fs load only when reading
    "distillation_runtime.progress",  # running stages' progress records (json, storage)
}
API_MODULES = {
    # The operator's modules that talk to the API server: kopf and kubernetes, never ML.
    "distillation_operator.handlers",
    "distillation_operator.controller",
    "distillation_operator.k8s",
}
ML_STACK = tuple(m for m in HEAVY if m not in {"kopf", "kubernetes"})


def modules(package_dir: Path) -> list[str]:
    root = package_dir.parent
    return [
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted(package_dir.rglob("*.py"))
    ]


LIGHT = [
    # Everything the operator may import from the runtime, the CLI's entry point (it imports the
    # stages lazily), and every operator module but the kopf entry point. Modules that *are*
    # torch code (losses, stages) may import it at the top: nothing light imports them.
    *(
        m
        for m in sorted(RUNTIME_MODULES_THE_OPERATOR_MAY_USE | {"distillation_runtime.cli"})
        if m in modules(REPO / "runtime" / "distillation_runtime")
    ),
    *(m for m in modules(REPO / "operator" / "distillation_operator") if m not in API_MODULES),
]


def loaded_after_import(module: str, candidates: tuple[str, ...]) -> str:
    listed = f"sorted(m for m in {candidates!r} if m in sys.modules)"
    code = f"import sys, {module}; print(','.join({listed}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    return out.stdout.strip()


@pytest.mark.parametrize("module", LIGHT)
def test_importing_is_cheap(module: str) -> None:
    loaded = loaded_after_import(module, HEAVY)
    assert loaded == "", f"importing {module} pulled in {loaded}"


@pytest.mark.parametrize("module", sorted(API_MODULES))
def test_operator_process_loads_no_ml_library(module: str) -> None:
    loaded = loaded_after_import(module, ML_STACK)
    assert loaded == "", f"importing {module} pulled in {loaded}"


def test_operator_uses_only_the_light_runtime_modules() -> None:
    used = set()
    for path in (REPO / "operator" / "distillation_operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                used.add(node.module)
            elif isinstance(node, ast.Import):
                used.update(alias.name for alias in node.names)
    runtime = {m for m in used if m.split(".")[0] == "distillation_runtime"}
    assert runtime, "the operator should build on the runtime's spec"
    assert runtime <= RUNTIME_MODULES_THE_OPERATOR_MAY_USE, runtime


def test_stdlib_operator_is_not_shadowed_from_the_repo_root() -> None:
    code = "import operator, collections; print(operator.itemgetter(1)([0, 7]))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "7"
    assert not (REPO / "operator" / "__init__.py").exists()
    assert not (REPO / "runtime" / "__init__.py").exists()
