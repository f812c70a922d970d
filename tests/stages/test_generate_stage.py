"""The generate stage: Ray Data actors answer like a direct call; the vLLM adapter's contract."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
)
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.records import read_parquet
from distillation_runtime.spec import GenerateBackend, GenerateSpec
from distillation_runtime.stages.generate import (
    PromptItem,
    choose_backend,
    records_from_vllm,
    run,
    sampling_kwargs,
)


def test_auto_backend_needs_vllm_and_a_gpu() -> None:
    assert choose_backend(GenerateBackend.AUTO, vllm_importable=True, gpus=1) == "vllm"
    assert choose_backend(GenerateBackend.AUTO, vllm_importable=True, gpus=0) == "transformers"
    assert choose_backend(GenerateBackend.AUTO, vllm_importable=False, gpus=8) == "transformers"
    assert (
        choose_backend(GenerateBackend.TRANSFORMERS, vllm_importable=True, gpus=8) == "transformers"
    )
    with pytest.raises(RuntimeError, match="backend: transformers or auto"):
        choose_backend(GenerateBackend.VLLM, vllm_importable=False, gpus=0)
    # sampled teacher tokens need the whole distribution, which vLLM does not return
    assert choose_backend(GenerateBackend.AUTO, True, 1, sampled_logprobs=True) == "transformers"
    with pytest.raises(RuntimeError, match="sparsity is sampled"):
        choose_backend(GenerateBackend.VLLM, True, 1, sampled_logprobs=True)


def test_vllm_request_uses_vllm_names() -> None:
    spec = GenerateSpec.model_validate(
        {
            "maxNewTokens": 64,
            "samplesPerPrompt": 2,
            "temperature": "0.7",
            "topP": "0.9",
            "topLogprobs": 5,
            "stop": ["\n\n"],
            "seed": 3,
        }
    )
    assert sampling_kwargs(spec) == {
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "stop": ["\n\n"],
        "logprobs": 5,
        "seed": 3,
    }
    assert sampling_kwargs(GenerateSpec())["logprobs"] is None


def test_vllm_results_become_records_with_the_top_k_by_logprob() -> None:
    def logprob(value: float, rank: int) -> SimpleNamespace:  # vllm.logprobs.Logprob's fields
        return SimpleNamespace(logprob=value, rank=rank, decoded_token="x")

    completion = SimpleNamespace(
        text="42",
        token_ids=[7, 9],
        finish_reason="stop",
        # the sampled token (id 3, rank 4) rides along with the top-2: k + 1 entries
        logprobs=[
            {7: logprob(-0.1, 1), 5: logprob(-2.5, 2), 3: logprob(-4.0, 4)},
            {9: logprob(-0.2, 1), 2: logprob(-1.9, 2)},
        ],
    )
    output = SimpleNamespace(prompt="6*7=", prompt_token_ids=[1, 2, 3], outputs=[completion])
    [record] = records_from_vllm([output], top_k=2)
    assert record.response == "42"
    assert record.response_ids == [7, 9]
    assert record.prompt_ids == [1, 2, 3]
    assert record.topk_ids == [[7, 5], [9, 2]]
    assert record.topk_logprobs == [[-0.1, -2.5], [-0.2, -1.9]]
    assert record.finish_reason == "stop"


def test_ray_data_actors_answer_like_a_direct_call(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(), seed=8)
    folder = save_pretrained(teacher, tokenizer, tmp_path / "teacher")
    examples = sample_examples("addition", 12, seed=5)
    items = [
        PromptItem(e.prompt, "eval" if i % 4 == 0 else "train", e.answer)
        for i, e in enumerate(examples)
    ]
    spec = GenerateSpec.model_validate({"maxNewTokens": 6, "topLogprobs": 4, "batchSize": 4})
    result = run(str(folder), items, spec, tmp_path / "out", actors=2)
    assert result.backend == "transformers"
    assert result.records == 12
    train, held_out = read_parquet(result.train), read_parquet(result.eval)
    assert [r.prompt for r in held_out] == [e.prompt for i, e in enumerate(examples) if i % 4 == 0]
    assert [r.reference for r in held_out] == [
        e.answer for i, e in enumerate(examples) if i % 4 == 0
    ]
    direct = generate(
        teacher,
        tokenizer,
        [r.prompt for r in train],
        SamplingConfig(max_new_tokens=6, top_logprobs=4),
    )
    assert [r.response_ids for r in train] == [r.response_ids for r in direct]
    assert [r.topk_ids for r in train] == [r.topk_ids for r in direct]
    assert 0 < result.bytes_per_token < 200


def test_sampled_teacher_tokens_are_draws_from_its_distribution(tmp_path: Path) -> None:
    """With sampled log-probs each response token stores the distinct tokens drawn from the
    teacher's distribution with their share of the draws (summing to 1, most drawn first,
    padding at weight 0), and over many positions the shares match the teacher's own
    probabilities; the records survive the Parquet round trip of the stage."""
    import math

    import torch

    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(), seed=8)
    folder = save_pretrained(teacher, tokenizer, tmp_path / "teacher")
    items = [PromptItem(e.prompt, "train") for e in sample_examples("addition", 16, seed=5)]
    draws, vocab = 64, len(tokenizer)  # more draws than ids: at most every id is stored
    spec = GenerateSpec.model_validate({"maxNewTokens": 6, "topLogprobs": draws, "batchSize": 8})
    result = run(str(folder), items, spec, tmp_path / "out", sampled_logprobs=True)
    records = read_parquet(result.train)
    direct = generate(
        teacher, tokenizer, [r.prompt for r in records], SamplingConfig(6, top_logprobs=vocab)
    )
    assert [r.response_ids for r in records] == [r.response_ids for r in direct]  # same answers
    gaps = []
    for record, exact in zip(records, direct, strict=True):
        assert record.topk_ids is not None
        assert record.topk_logprobs is not None
        assert exact.topk_ids is not None
        assert exact.topk_logprobs is not None
        for ids, shares, top_ids, top_values in zip(
            record.topk_ids, record.topk_logprobs, exact.topk_ids, exact.topk_logprobs, strict=True
        ):
            weights = [math.exp(v) for v in shares]
            assert sum(weights) == pytest.approx(1.0, abs=1e-3)  # float16 storage
            assert weights == sorted(weights, reverse=True)
            assert all(w * draws == pytest.approx(round(w * draws), abs=0.05) for w in weights)
            drawn = {i: w for i, w in zip(ids, weights, strict=True) if w > 0}
            probability = dict(zip(top_ids, (math.exp(v) for v in top_values), strict=True))
            gaps.append(drawn.get(top_ids[0], 0.0) - probability[top_ids[0]])
    # the teacher's most likely token: its share of the draws is its probability on average
    assert abs(sum(gaps) / len(gaps)) < 0.02
    assert float(torch.tensor(gaps).std()) < 0.12  # 64 draws: a share's spread is about 0.06


STALE_RUN = """
import sys
from pathlib import Path
from distillation_runtime.spec import GenerateSpec
from distillation_runtime.stages.generate import PromptItem, run
items = [PromptItem(p, "train") for p in ("1+2=", "3+4=", "5+6=", "7+8=")]
spec = GenerateSpec.model_validate({"maxNewTokens": 2, "batchSize": 2})
result = run(sys.argv[1], items, spec, Path(sys.argv[2]), actors=2)
print("records", result.records)
"""


def test_a_cluster_a_killed_run_left_recorded_is_not_joined(tmp_path: Path) -> None:
    """A run killed mid-way leaves /tmp/ray's record of its cluster: a later local run starts a
    Ray of its own instead of failing to connect to the dead one (seen in CI)."""
    import os
    import subprocess
    import sys
    import tempfile

    tokenizer = make_tokenizer()
    folder = save_pretrained(make_model(tokenizer, ModelSize(), seed=8), tokenizer, tmp_path / "t")
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nobody listens
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    done = subprocess.run(
        [sys.executable, "-c", STALE_RUN, str(folder), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "records 4" in done.stdout
