"""Prune, train and reload at the widths of real checkpoints, not the toy widths of the rest.

Random weights (no downloads) at real widths, vocabularies and head layouts; two decoder layers
instead of 30 (each layer's shape rules are the same, and the tests stay minutes, not hours):

- SmolLM2-135M (Llama): hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64,
  vocabulary 49,152, tied input and output embeddings: the shape whose budget prune once chose
  hidden 376, which transformers refuses (not a multiple of the heads);
- Qwen3-0.6B: hidden 1024, intermediate 3072, 16 query heads and 8 KV heads of 128 (head_dim
  written out: 16 x 128 is not 1024), per-head q/k norms, tied embeddings; vocabulary cut to
  16,384 (Qwen's 151,936 would make the embedding alone 155M parameters on two CPUs);
- Mistral-style with a sliding window: hidden 1024, 8 query heads and 2 KV heads of 128,
  ``sliding_window`` 256, untied embeddings, vocabulary 32,768.

Each goes through the prune stage to a parameter budget, reloads with transformers (shape
checks, tied weights still one tensor), takes training steps, and reloads again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

from distillation_runtime.demo import gold_records, make_tokenizer, sample_examples
from distillation_runtime.prune import PruneError, fit_budget, parameter_shapes, shape_of
from distillation_runtime.records import write_parquet
from distillation_runtime.spec import TrainSpec
from distillation_runtime.stages.base import MODEL_DIR
from distillation_runtime.stages.prune import PruneJob, run, target_shape
from distillation_runtime.stages.train import TrainJob
from distillation_runtime.stages.train import run as train

PROMPTS = [e.prompt for e in sample_examples("addition", 16, seed=0)]


def special_ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def smollm2(tokenizer: Any) -> Any:
    return LlamaConfig(
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **special_ids(tokenizer),
    )


def qwen3(tokenizer: Any) -> Any:
    return Qwen3Config(
        vocab_size=16_384,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **special_ids(tokenizer),
    )


def mistral(tokenizer: Any) -> Any:
    return MistralConfig(
        vocab_size=32_768,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        sliding_window=256,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **special_ids(tokenizer),
    )


SHAPES = {"smollm2-135m": smollm2, "qwen3-0.6b": qwen3, "mistral-sliding-window": mistral}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def saved_teacher(folder: Path, config: Any, tokenizer: Any) -> Path:
    import torch

    torch.manual_seed(0)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def assert_tied(model: Any) -> None:
    """Input and output embeddings are one tensor, as the teacher's were."""
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", list(SHAPES))
def test_a_real_shape_prunes_to_a_budget_trains_and_reloads(
    name: str, tokenizer: Any, tmp_path: Path
) -> None:
    config = SHAPES[name](tokenizer)
    teacher_dir = saved_teacher(tmp_path / "teacher", config, tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    teacher_parameters = sum(p.numel() for p in teacher.parameters())
    budget = teacher_parameters // 2

    result = run(
        PruneJob(
            teacher=str(teacher_dir),
            prompts=PROMPTS,
            output=str(tmp_path / "pruned"),
            parameter_budget=budget,
            max_length=32,
        )
    )
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned" / MODEL_DIR)
    shape = student.config
    # what transformers and vLLM take: whole KV groups, the head size kept, the budget met
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    assert shape.head_dim == config.head_dim
    assert 0.85 * budget <= result.student_parameters <= budget
    assert sum(p.numel() for p in student.parameters()) == result.student_parameters
    if isinstance(config, LlamaConfig):  # transformers' Llama validates this, Qwen3 does not
        assert shape.hidden_size % shape.num_attention_heads == 0
    if config.tie_word_embeddings:
        assert_tied(student)
    else:
        assert not shape.tie_word_embeddings
    assert getattr(shape, "sliding_window", None) == getattr(config, "sliding_window", None)

    records = gold_records(tokenizer, sample_examples("addition", 16, seed=1))
    write_parquet(records, tmp_path / "train.parquet")
    job = TrainJob(
        student=str(tmp_path / "pruned" / MODEL_DIR),
        teacher=str(teacher_dir),
        data=str(tmp_path / "train.parquet"),
        output=str(tmp_path / "train"),
        train=TrainSpec.model_validate(
            {"losses": {"response": "1.0"}, "batchSize": 4, "maxSeqLength": 32}
        ),
        max_steps=2,
    )
    trained = AutoModelForCausalLM.from_pretrained(train(job))
    assert trained.config.hidden_size == shape.hidden_size
    if config.tie_word_embeddings:
        assert_tied(trained)
    before = dict(student.named_parameters())
    moved = [n for n, p in trained.named_parameters() if not p.detach().equal(before[n].detach())]
    assert moved, "two optimizer steps changed no weight"


def test_a_budget_no_shape_can_meet_is_refused_before_any_forward_pass(tokenizer: Any) -> None:
    import torch

    config = smollm2(tokenizer)
    with torch.device("meta"):  # the shape only, as the preflight builds it
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    # less than the embeddings alone (49,152 x hidden, tied): no width pruning gets there
    with pytest.raises(PruneError, match=r"parameterBudget") as refused:
        target_shape(
            PruneJob(teacher="unused", prompts=[], output="unused", parameter_budget=1_000_000),
            shape_of(model.config),
            parameter_shapes(model),
            hidden_per_head=True,
        )
    # the message names the smallest shape it can reach and what that needs: hidden 72 (the
    # lcm of the step 8 and the 9 heads), intermediate 128 (the step of a width >= 1024)
    message = str(refused.value)
    assert "the smallest it can reach (hidden 72, intermediate 128, 2 layers" in message
    floor = int(message.split(") has ")[1].split(" parameters")[0].replace(",", ""))
    assert floor > 49_152 * 72  # the tied embedding alone
    assert f"give a budget of at least {floor:,}" in message
    # and that budget is indeed met
    met = fit_budget(parameter_shapes(model), shape_of(model.config), floor, "width", True)
    assert (met.hidden, met.layers) == (72, 2)


@pytest.mark.quantize
@pytest.mark.parametrize("scheme", ["W4A16", "FP8_DYNAMIC"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_a_real_shape_quantises_and_reloads(
    name: str, scheme: str, tokenizer: Any, tmp_path: Path
) -> None:
    """The quantize stage at real widths (W4A16 in groups of 128 of 576, 1024 and 3072 columns,
    q/k norms, a sliding window, tied embeddings): a compressed-tensors checkpoint that
    transformers reloads and that answers."""
    from distillation_runtime.generation import greedy_answer_ids
    from distillation_runtime.spec import QuantizeSpec
    from distillation_runtime.stages.quantize import QuantizeJob
    from distillation_runtime.stages.quantize import run as quantise

    config = SHAPES[name](tokenizer)
    model_dir = saved_teacher(tmp_path / "model", config, tokenizer)
    write_parquet(gold_records(tokenizer, sample_examples("addition", 16, seed=1)), tmp_path / "c")
    quantise(
        QuantizeJob(
            model=str(model_dir),
            output=str(tmp_path / "quantized"),
            quantize=QuantizeSpec.model_validate({"scheme": scheme, "calibrationSamples": 16}),
            calibration=str(tmp_path / "c"),
            max_seq_length=32,
        )
    )
    folder = tmp_path / "quantized" / MODEL_DIR
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.quantization_config is not None
    assert reloaded.config.hidden_size == config.hidden_size
    [answer] = greedy_answer_ids(folder, ["12+34="], max_new_tokens=4)
    assert len(answer) >= 1  # it generates
