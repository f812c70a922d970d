"""Teacher generation: batched answers equal one-by-one answers; stored log-probs are real."""

from __future__ import annotations

import torch

from distillation_runtime.demo import (
    ALPHABET,
    ModelSize,
    make_model,
    make_tokenizer,
    sample_examples,
)
from distillation_runtime.generation import SamplingConfig, generate
from distillation_runtime.records import collate


def test_topk_logprobs_equal_a_direct_forward_pass_and_line_up_with_training_targets() -> None:
    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(), seed=5).eval()
    prompts = [e.prompt for e in sample_examples("reversal", 6, seed=1)]
    records = generate(
        teacher, tokenizer, prompts, SamplingConfig(max_new_tokens=5, top_logprobs=4)
    )
    batch = collate(records, tokenizer.pad_token_id, max_length=64)
    with torch.no_grad():
        logprobs = teacher(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits.log_softmax(-1)
    assert batch.topk_ids is not None
    assert batch.topk_logprobs is not None
    mask = batch.loss_mask
    assert int(mask.sum()) == sum(len(r.response_ids) for r in records)
    top = logprobs[mask].topk(4, dim=-1)
    assert torch.equal(top.indices, batch.topk_ids[mask])
    torch.testing.assert_close(top.values, batch.topk_logprobs[mask], atol=2e-3, rtol=0)
    # greedy: each response token is the teacher's top-1 at the position that predicts it
    assert torch.equal(batch.targets[mask], batch.topk_ids[mask][:, 0])


def test_batched_generation_answers_like_one_prompt_at_a_time() -> None:
    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(), seed=6)
    prompts = [e.prompt for e in sample_examples("addition", 8, seed=2)]
    batched = generate(teacher, tokenizer, prompts, SamplingConfig(max_new_tokens=6, batch_size=8))
    single = generate(teacher, tokenizer, prompts, SamplingConfig(max_new_tokens=6, batch_size=1))
    assert [r.response_ids for r in batched] == [r.response_ids for r in single]


def test_samples_stop_strings_and_finish_reasons() -> None:
    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(), seed=7)
    prompts = [e.prompt for e in sample_examples("addition", 4, seed=3)]
    config = SamplingConfig(max_new_tokens=8, temperature=1.5, samples=3, seed=1)
    records = generate(teacher, tokenizer, prompts, config)
    assert [r.prompt for r in records] == [p for p in prompts for _ in range(3)]
    assert len({tuple(r.response_ids) for r in records[:3]}) > 1  # samples differ
    assert {r.finish_reason for r in records} <= {"stop", "length"}
    for r in records:
        assert (r.finish_reason == "stop") == (r.response_ids[-1:] == [tokenizer.eos_token_id])
    # a stop string: every character is a stop string here, so each answer ends at once
    stopped = generate(
        teacher, tokenizer, prompts, SamplingConfig(max_new_tokens=8, stop=tuple(ALPHABET))
    )
    for r in stopped:
        assert r.response == ""
        assert 1 <= len(r.response_ids) <= 8
        if r.finish_reason == "length":  # only special tokens came out: nothing to stop on
            assert tokenizer.decode(r.response_ids, skip_special_tokens=True) == ""
    assert any(r.finish_reason == "stop" for r in stopped)
