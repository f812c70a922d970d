"""bench/gpu_check.py, the script a GPU machine runs, kept working where there is none: without
a GPU every check says why it skips, and its FSDP check runs whole on gloo."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def gpu_check(*args: str) -> tuple[int, list[str], dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    lines = done.stdout.strip().splitlines()
    return done.returncode, lines[:-1], json.loads(lines[-1])


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks what a machine without a GPU prints"
)
def test_without_a_gpu_every_check_says_why_it_skips() -> None:
    status, lines, summary = gpu_check()
    assert status == 0
    assert lines == [
        "SKIP vllm-generate: needs a CUDA GPU (torch.cuda.is_available() is False)",
        "SKIP fsdp-nccl: needs a CUDA GPU (torch.cuda.is_available() is False)",
        "SKIP vllm-quantized: needs a CUDA GPU (torch.cuda.is_available() is False)",
    ]
    assert summary["gpu"] is None
    assert [r["outcome"] for r in summary["results"]] == ["SKIP"] * 3


def test_the_fsdp_check_runs_whole_on_gloo() -> None:
    status, lines, summary = gpu_check("--device", "cpu")
    assert status == 0, lines
    assert lines[1].startswith("PASS fsdp-nccl: gloo: 16 steps, loss "), lines
    fsdp = summary["results"][1]["figures"]
    assert fsdp["fsdp_losses"] == pytest.approx(fsdp["ddp_losses"], rel=1e-4)
    assert fsdp["fsdp_losses"][-1] < fsdp["fsdp_losses"][0]
    assert fsdp["checkpoints"] == ["step-12", "step-16"]  # sharded checkpoints were written
    assert lines[0].startswith("SKIP vllm-generate: runs on a GPU only")


def test_each_check_fails_on_the_figures_a_broken_path_gives() -> None:
    gc = script()
    assert gc.judge_logprobs(64, 64, 0.01, 0.05)[0]
    assert gc.judge_logprobs(61, 64, 0.01, 0.05) == (False, "3 of 64 greedy answers differ")
    assert not gc.judge_logprobs(64, 64, 0.2, 0.05)[0]
    assert not gc.judge_logprobs(64, 64, None, 0.05)[0]
    assert gc.judge_losses([3.0, 2.0, 1.0], [3.0, 2.02, 1.01], 0.05)[0]
    assert "step 2" in gc.judge_losses([3.0, 2.0, 1.0], [3.0, 2.5, 1.0], 0.05)[1]
    assert "did not fall" in gc.judge_losses([3.0, 3.1], [3.0, 3.1], 0.05)[1]
    assert not gc.judge_losses([3.0, 2.0], [3.0], 0.05)[0]
    assert gc.judge_agreement({"W4A16": 0.97, "FP8_DYNAMIC": 1.0}, 0.9)[0]
    assert gc.judge_agreement({"W4A16": 0.4, "FP8_DYNAMIC": 1.0}, 0.9) == (
        False,
        "below 0.9 for W4A16 (W4A16 0.400, FP8_DYNAMIC 1.000)",
    )
    assert "DISTILL_QUANTIZE_PYTHON" in gc.missing("vllm-quantized", "cuda", True, True, None)
    assert "vllm package" in gc.missing("vllm-generate", "cuda", True, False, None)
    assert gc.missing("fsdp-nccl", "cuda", True, False, None) is None
