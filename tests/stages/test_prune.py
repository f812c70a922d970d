"""The prune stage on tiny random Llama / Qwen2 / Qwen3 models: shapes, counts, quality vs random
pruning, depth choice, reuse of importance scores, and the errors of impossible requests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen3Config

from distillation_runtime.demo import (
    ModelSize,
    make_model,
    make_tokenizer,
    parameter_count,
    sample_examples,
    save_pretrained,
)
from distillation_runtime.prune import (
    PruneError,
    Shape,
    build_pruned,
    choose,
    load_importance,
    random_importance,
    shape_of,
)
from distillation_runtime.stages.prune import IMPORTANCE_FILE, MODEL_DIR, PruneJob, run

PROMPTS = [f"{e.prompt}{e.answer}" for e in sample_examples("addition", 48, seed=0)]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def spread_norm_gains(model: Any, seed: int) -> Any:
    """Random RMSNorm gains (log-normal) instead of the fresh-init 1.0: a trained model's channels
    differ in scale, while a fresh init makes every channel alike and any ranking a coin toss.
    The weights stay random; only their spread resembles a trained model's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                parameter.copy_(torch.randn(parameter.shape, generator=generator).mul(0.5).exp())
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """Llama with grouped-query attention: 4 query heads in 2 KV groups, 4 layers."""
    model = make_model(tokenizer, ModelSize(hidden=64, intermediate=192, layers=4), seed=0)
    spread_norm_gains(model, seed=0)
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("llama") / "teacher")


def _qwen(config_class: Any, tokenizer: Any, **extra: Any) -> Any:
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    config.architectures = [config_class.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(1)
    return spread_norm_gains(AutoModelForCausalLM.from_config(config), seed=1)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """Qwen3: GQA (6 heads, 2 groups of 3), tied embeddings, per-head q/k norms."""
    model = _qwen(Qwen3Config, tokenizer, head_dim=16, tie_word_embeddings=True)
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("qwen3") / "teacher")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """Qwen2: GQA with biases on the q/k/v projections."""
    model = _qwen(Qwen2Config, tokenizer, tie_word_embeddings=False)
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("qwen2") / "teacher")


def kl_to_teacher(teacher: Any, student: Any, tokenizer: Any) -> float:
    """Mean KL(teacher || student) per real token of the calibration prompts."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        p = teacher(**batch).logits.log_softmax(-1)
        q = student(**batch).logits.log_softmax(-1)
    per_token = (p.exp() * (p - q)).sum(-1)
    return float(per_token[batch["attention_mask"].bool()].mean())


def assert_beats_random(teacher_dir: Path, pruned_dir: Path, tokenizer: Any) -> None:
    """The pruned model stays closer to the teacher than the same shape pruned at random."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    target = shape_of(pruned.config)
    ours = kl_to_teacher(teacher, pruned, tokenizer)
    for seed in range(3):
        keep = choose(
            random_importance(shape_of(teacher.config), seed), shape_of(teacher.config), target
        )
        baseline = kl_to_teacher(teacher, build_pruned(teacher, keep, target), tokenizer)
        assert ours < baseline, (
            f"importance pruning {ours:.5f} vs random (seed {seed}) {baseline:.5f}"
        )


def generates(folder: Path, tokenizer: Any) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(["12+3="], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    return [int(t) for t in out[0, ids["input_ids"].shape[1] :]]


def test_llama_to_explicit_sizes(llama: Path, tokenizer: Any, tmp_path: Path) -> None:
    result = run(
        PruneJob(
            teacher=str(llama),
            prompts=PROMPTS,
            output=str(tmp_path),
            hidden_size=48,
            intermediate_size=96,
            num_attention_heads=2,
            num_layers=3,
        )
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIR)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (48, 96, 3)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 48)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 48)
    assert parameter_count(model) == result.student_parameters
    assert result.teacher_parameters == parameter_count(AutoModelForCausalLM.from_pretrained(llama))
    assert len(generates(tmp_path / MODEL_DIR, tokenizer)) >= 1
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["student"]["hidden"] == 48
    assert len(report["kept_layers"]) == 3
    assert_beats_random(llama, tmp_path / MODEL_DIR, tokenizer)


def test_qwen3_to_a_parameter_budget(qwen3: Path, tokenizer: Any, tmp_path: Path) -> None:
    teacher_params = parameter_count(AutoModelForCausalLM.from_pretrained(qwen3))
    budget = teacher_params * 6 // 10
    result = run(
        PruneJob(teacher=str(qwen3), prompts=PROMPTS, output=str(tmp_path), parameter_budget=budget)
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIR)
    assert result.architecture == "Qwen3ForCausalLM"
    assert parameter_count(model) == result.student_parameters
    # The largest shape under the budget: at most the budget, and not far below it.
    assert 0.9 * budget <= result.student_parameters <= budget
    assert model.config.num_hidden_layers == 4  # width pruning keeps every layer
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_beats_random(qwen3, tmp_path / MODEL_DIR, tokenizer)


def test_depth_budget_drops_layers_only(qwen3: Path, tmp_path: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(qwen3)
    budget = parameter_count(teacher) * 7 // 10
    result = run(
        PruneJob(
            teacher=str(qwen3),
            prompts=PROMPTS,
            output=str(tmp_path),
            parameter_budget=budget,
            budget_axes="depth",
        )
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIR)
    assert model.config.hidden_size == 64
    assert model.config.num_hidden_layers < 4
    assert parameter_count(model) == result.student_parameters <= budget


def test_qwen2_whole_kv_groups_with_biases(qwen2: Path, tokenizer: Any, tmp_path: Path) -> None:
    result = run(
        PruneJob(teacher=str(qwen2), prompts=PROMPTS, output=str(tmp_path), num_attention_heads=3)
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIR)
    attention = model.model.layers[0].self_attn
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 1)
    head_dim = 64 // 6  # Qwen2 derives it from hidden / heads; the pruned config writes it out
    assert model.config.head_dim == head_dim
    assert attention.q_proj.bias.shape == (3 * head_dim,)
    assert attention.k_proj.bias.shape == (head_dim,)
    assert parameter_count(model) == result.student_parameters
    assert_beats_random(qwen2, tmp_path / MODEL_DIR, tokenizer)


def _with_identity_layer(source: Path, layer: int, dest: Path, tokenizer: Any) -> Path:
    """A copy of ``source`` whose block ``layer`` adds nothing (its output projections are zero):
    the block every depth score must rank last."""
    model = AutoModelForCausalLM.from_pretrained(source)
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return save_pretrained(model, tokenizer, dest)


def test_depth_pruning_drops_the_block_that_does_nothing(
    llama: Path, tokenizer: Any, tmp_path: Path
) -> None:
    teacher = _with_identity_layer(llama, 2, tmp_path / "teacher", tokenizer)
    result = run(
        PruneJob(teacher=str(teacher), prompts=PROMPTS, output=str(tmp_path / "out"), num_layers=3)
    )
    assert result.kept_layers == [0, 1, 3]
    scores = load_importance(str(tmp_path / "out" / IMPORTANCE_FILE))
    assert scores.depth_method == "cosine"
    assert float(scores.layers[2]) < 1e-6 < float(scores.layers[[0, 1, 3]].min())
    # Dropping a block that did nothing leaves the model's outputs unchanged.
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / MODEL_DIR)
    assert kl_to_teacher(AutoModelForCausalLM.from_pretrained(teacher), pruned, tokenizer) < 1e-6


def test_loss_depth_importance_drops_the_cheapest_layers(
    llama: Path, tokenizer: Any, tmp_path: Path
) -> None:
    """Loss-based depth scores: the loss increase of skipping each block; the block that does
    nothing costs nothing, and the kept layers are exactly the costliest ones."""
    teacher = _with_identity_layer(llama, 2, tmp_path / "teacher", tokenizer)
    result = run(
        PruneJob(
            teacher=str(teacher),
            prompts=PROMPTS,
            output=str(tmp_path / "out"),
            num_layers=2,
            depth_importance="loss",
        )
    )
    scores = load_importance(str(tmp_path / "out" / IMPORTANCE_FILE))
    assert scores.depth_method == "loss"
    assert abs(float(scores.layers[2])) < 1e-3
    assert result.kept_layers == sorted(int(i) for i in scores.layers.topk(2).indices)


def test_reprune_with_saved_scores_runs_no_forward_pass(
    llama: Path, tokenizer: Any, tmp_path: Path
) -> None:
    first = run(
        PruneJob(teacher=str(llama), prompts=PROMPTS, output=str(tmp_path / "a"), num_layers=3)
    )
    # No prompts at all: scoring would fail, so the second prune can only use the saved scores.
    second = run(
        PruneJob(
            teacher=str(llama),
            prompts=[],
            output=str(tmp_path / "b"),
            intermediate_size=128,
            num_layers=3,
            importance=str(tmp_path / "a" / IMPORTANCE_FILE),
        )
    )
    assert second.importance_reused
    assert not first.importance_reused
    assert second.kept_layers == first.kept_layers
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path / "b" / MODEL_DIR).config.intermediate_size
        == 128
    )
    with pytest.raises(PruneError, match="calibrationSamples"):
        run(PruneJob(teacher=str(llama), prompts=[], output=str(tmp_path / "c"), num_layers=3))


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ({"hidden_size": 128}, ["student.prune.hiddenSize is 128", "hidden_size is 64", "1 to 64"]),
        ({"num_layers": 9}, ["student.prune.numLayers is 9", "from 1 to 4"]),
        (
            {"num_attention_heads": 3},
            ["student.prune.numAttentionHeads is 3", "2 KV groups", "allowed values are 2, 4"],
        ),
        ({"parameter_budget": 10**9}, ["student.prune.parameterBudget is 1,000,000,000", "below"]),
        ({"parameter_budget": 100}, ["student.prune.parameterBudget is 100", "no width pruning"]),
    ],
)
def test_impossible_targets_name_the_field(
    llama: Path, tmp_path: Path, target: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(PruneError) as caught:
        run(PruneJob(teacher=str(llama), prompts=PROMPTS, output=str(tmp_path), **target))
    for text in expected:
        assert text in str(caught.value)


def test_unknown_architecture_is_refused(tokenizer: Any, tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=32)
    save_pretrained(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2")
    with pytest.raises(PruneError) as caught:
        run(
            PruneJob(
                teacher=str(tmp_path / "gpt2"),
                prompts=PROMPTS,
                output=str(tmp_path / "o"),
                num_layers=1,
            )
        )
    message = str(caught.value)
    assert "teacher.model" in message
    assert "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM" in message
    assert "Qwen3ForCausalLM" in message


def test_random_scores_have_the_teacher_shapes() -> None:
    shape = Shape(hidden=64, intermediate=192, heads=4, kv_heads=2, layers=4, head_dim=16)
    scores = random_importance(shape, seed=0)
    assert scores.groups(shape.kv_heads).shape == (4, 2)
    assert tuple(scores.neurons.shape) == (4, 192)
