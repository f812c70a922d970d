"""Distillation losses: the math, the masking, the chunked loss against the plain one, TRL."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st

from distillation_runtime.generation import sampled_logprobs
from distillation_runtime.losses import (
    MISSING_MASS_FLOOR,
    FeatureProjector,
    LogitLossOptions,
    OfflineTeacher,
    OnlineTeacher,
    VocabularyMismatchError,
    check_same_tokenizer,
    chunked_logit_losses,
    combine,
    feature_loss,
    full_logit_losses,
    kd_divergence,
    offline_kd,
    response_loss,
    shared_vocab_size,
)
from distillation_runtime.spec import Divergence, LossesSpec, MissingMass

DIVERGENCES = ["forwardKL", "reverseKL", "jsd"]
F64 = torch.float64


def val(x: torch.Tensor) -> float:
    return float(x.detach())


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, written out the textbook way."""
    p = p_logits.softmax(-1)
    return (p * (p.log() - q_logits.log_softmax(-1))).sum(-1)


def topk_of(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = logprobs.topk(k, dim=-1)
    return top.indices, top.values


# --------------------------------------------------------------------------------------------
# The math of the plain losses
# --------------------------------------------------------------------------------------------


def test_response_loss_is_cross_entropy_over_masked_tokens_only():
    logits, targets = rand(6, 5), torch.tensor([0, 4, 2, -100, 1, 3])
    mask = torch.tensor([True, True, False, False, True, True])
    expected = F.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(response_loss(logits, targets, mask), expected)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_divergences_are_the_textbook_ones_times_t_squared(temperature):
    s, t = rand(7, 9, seed=1), rand(7, 9, seed=2)
    mask = torch.tensor([True, False, True, True, False, True, True])
    scale = temperature**2
    fwd = kd_divergence(s, t, mask, divergence="forwardKL", temperature=temperature)
    rev = kd_divergence(s, t, mask, divergence="reverseKL", temperature=temperature)
    assert torch.allclose(fwd, scale * kl(t / temperature, s / temperature)[mask].mean())
    assert torch.allclose(rev, scale * kl(s / temperature, t / temperature)[mask].mean())
    assert not torch.allclose(fwd, rev)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_is_nonnegative_and_zero_when_the_student_is_the_teacher(divergence):
    s, t = rand(32, 11, seed=3, scale=3.0), rand(32, 11, seed=4, scale=3.0)
    mask = torch.ones(32, dtype=torch.bool)
    for beta in (0.0, 0.2, 0.5, 0.9, 1.0):
        for temperature in (0.5, 1.0, 3.0):
            options: dict[str, Any] = {
                "divergence": divergence,
                "beta": beta,
                "temperature": temperature,
            }
            per_token = [
                kd_divergence(s[i : i + 1], t[i : i + 1], mask[:1], **options) for i in range(32)
            ]
            assert min(val(v) for v in per_token) > 0
            same = kd_divergence(s, s.clone(), mask, **options)
            assert abs(val(same)) < 1e-12
            ids, logprobs = topk_of(s.log_softmax(-1), 4)
            offline = offline_kd(s, ids, logprobs, mask, missing_mass="ignore", **options)
            assert abs(val(offline)) < 1e-12


def test_jsd_interpolates_between_the_kls_as_trl_defines_it():
    s, t = rand(16, 13, seed=5, scale=2.0), rand(16, 13, seed=6, scale=2.0)
    mask = torch.ones(16, dtype=torch.bool)
    fwd = kd_divergence(s, t, mask, divergence="forwardKL", temperature=1.5)
    rev = kd_divergence(s, t, mask, divergence="reverseKL", temperature=1.5)

    def jsd(beta: float) -> float:
        return val(kd_divergence(s, t, mask, divergence="jsd", beta=beta, temperature=1.5))

    # TRL's endpoints are the KLs themselves ...
    assert jsd(0.0) == pytest.approx(val(fwd), rel=1e-12)
    assert jsd(1.0) == pytest.approx(val(rev), rel=1e-12)
    # ... and the continuous family approaches them to first order: JSD(b) ~ b KL(t||s) as
    # b -> 0 and JSD(b) ~ (1 - b) KL(s||t) as b -> 1.
    eps = 1e-5
    assert jsd(eps) / eps == pytest.approx(val(fwd), rel=1e-3)
    assert jsd(1 - eps) / eps == pytest.approx(val(rev), rel=1e-3)
    assert 0 < jsd(0.5) < min(val(fwd), val(rev))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_matches_trl_generalized_jsd(monkeypatch, beta, temperature):
    """Peer check against TRL's GKD loss (trl is a test-only dependency).

    TRL's reduction "batchmean" with labels is the same per-token mean over the unmasked
    positions as ours; TRL does not scale by T**2 and we do, so ours == T**2 * TRL's.
    """
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    batch, seq, vocab = 3, 5, 17
    s = rand(batch, seq, vocab, seed=7, scale=2.0).requires_grad_()
    t = rand(batch, seq, vocab, seed=8, scale=2.0)
    labels = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(9))
    labels[0, :2] = -100  # prompt
    labels[2, 3:] = -100  # padding
    theirs = GKDTrainer.generalized_jsd_loss(
        s, t, labels=labels, beta=beta, temperature=temperature
    )
    mask = (labels != -100).reshape(-1)
    flat_s, flat_t = s.reshape(-1, vocab), t.reshape(-1, vocab)
    ours = kd_divergence(flat_s, flat_t, mask, divergence="jsd", beta=beta, temperature=temperature)
    assert val(ours) == pytest.approx(temperature**2 * val(theirs), rel=1e-10)
    (grad_theirs,) = torch.autograd.grad(temperature**2 * theirs, s)
    (grad_ours,) = torch.autograd.grad(ours, s)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-12)
    if beta in (0.0, 1.0):  # TRL's endpoints, under our names
        name = "forwardKL" if beta == 0.0 else "reverseKL"
        named = kd_divergence(flat_s, flat_t, mask, divergence=name, temperature=temperature)
        assert val(named) == pytest.approx(temperature**2 * val(theirs), rel=1e-10)


# --------------------------------------------------------------------------------------------
# Offline (stored top-k)
# --------------------------------------------------------------------------------------------


def test_offline_ignore_compares_the_renormalised_top_k_on_both_sides():
    s, t = rand(8, 12, seed=10), rand(8, 12, seed=11)
    ids, logprobs = topk_of(t.log_softmax(-1), 5)
    mask = torch.ones(8, dtype=torch.bool)
    got = offline_kd(s, ids, logprobs, mask, divergence="forwardKL", temperature=2.0)
    # Renormalising the top-k of softmax(t) and tempering it is the tempered softmax of t's
    # top-k logits: both sides restricted to the stored ids.
    expected = 4.0 * kl(t.gather(1, ids) / 2.0, s.gather(1, ids) / 2.0).mean()
    assert torch.allclose(got, expected)


def test_offline_uniform_spreads_the_missing_mass_over_the_rest_of_the_vocabulary():
    s, t = rand(6, 10, seed=12), rand(6, 10, seed=13)
    teacher_logprobs = t.log_softmax(-1)
    ids, logprobs = topk_of(teacher_logprobs, 3)
    mask = torch.ones(6, dtype=torch.bool)
    got = offline_kd(
        s, ids, logprobs, mask, divergence="forwardKL", missing_mass="uniform", temperature=1.0
    )
    # Built by hand: the stored probabilities where stored, the rest shared evenly.
    full = torch.empty_like(t)
    for row in range(6):
        missing = 1 - logprobs[row].exp().sum()
        full[row] = missing / (10 - 3)
        full[row, ids[row]] = logprobs[row].exp()
    assert torch.allclose(full.sum(-1), torch.ones(6, dtype=F64))
    expected = (full * (full.log() - s.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(got, expected)
    ignored = offline_kd(s, ids, logprobs, mask, divergence="forwardKL", missing_mass="ignore")
    assert not torch.allclose(got, ignored)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_offline_uniform_with_the_whole_vocabulary_stored_is_online_distillation(divergence):
    s, t = rand(5, 7, seed=14), rand(5, 7, seed=15)
    ids, logprobs = topk_of(t.log_softmax(-1), 7)
    mask = torch.tensor([True, True, False, True, True])
    options: dict[str, Any] = {"divergence": divergence, "beta": 0.3, "temperature": 1.7}
    for missing_mass in ("uniform", "ignore"):
        offline = offline_kd(s, ids, logprobs, mask, missing_mass=missing_mass, **options)
        assert torch.allclose(offline, kd_divergence(s, t, mask, **options))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 2])
def test_offline_ignores_garbage_at_masked_out_positions(divergence, k):
    s, t = rand(4, 6, seed=16).requires_grad_(), rand(4, 6, seed=17)
    ids, logprobs = topk_of(t.log_softmax(-1), k)
    ids[1], logprobs[1] = -1, -math.inf  # padding rows as a collator might fill them
    mask = torch.tensor([True, False, True, True])
    for missing_mass in ("ignore", "uniform"):
        loss = offline_kd(s, ids, logprobs, mask, divergence=divergence, missing_mass=missing_mass)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss)
        assert torch.isfinite(grad).all()
        assert (grad[1] == 0).all()


def test_offline_uniform_keeps_a_little_mass_outside_a_top_k_that_sums_to_one():
    s = rand(3, 5, seed=39).requires_grad_()
    ids = torch.tensor([[0, 1]] * 3)
    logprobs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5 + 1e-7]], dtype=F64).log()
    mask = torch.ones(3, dtype=torch.bool)
    loss = offline_kd(s, ids, logprobs, mask, divergence="reverseKL", missing_mass="uniform")
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    # Each of the other 3 ids gets MISSING_MASS_FLOOR / 3, then the row is renormalised.
    teacher = torch.cat([logprobs.exp(), torch.full((3, 3), MISSING_MASS_FLOOR / 3, dtype=F64)], 1)
    teacher = teacher / teacher.sum(-1, keepdim=True)
    student = s.log_softmax(-1)
    expected = (student.exp() * (student - teacher.log())).sum(-1).mean()
    assert torch.allclose(loss, expected)
    hidden, head = rand(3, 2, seed=40), rand(5, 2, seed=41)
    chunked = chunked_logit_losses(
        hidden,
        head,
        target_ids=torch.zeros(3, dtype=torch.long),
        mask=mask,
        teacher=OfflineTeacher(ids, logprobs),
        options=LogitLossOptions(
            divergence=Divergence.REVERSE_KL, missing_mass=MissingMass.UNIFORM, chunk_size=2
        ),
    )
    plain = offline_kd(
        hidden @ head.T, ids, logprobs, mask, divergence="reverseKL", missing_mass="uniform"
    )
    assert torch.allclose(chunked["logits"], plain)


def test_sampled_draws_give_forward_kls_gradient_on_average_where_a_top_k_cut_is_biased():
    """RS-KD's point: the gradient of the sampled loss w.r.t. the student's logits, averaged over
    independent draws, is forward KL's (p_student - p_teacher); a top-2 cut's is not."""
    vocab, draws, trials = 6, 4, 4000
    teacher = rand(1, vocab, seed=1, scale=1.5).log_softmax(-1)
    student = rand(1, vocab, seed=2).requires_grad_()
    mask = torch.ones(1, dtype=torch.bool)
    exact = torch.autograd.grad(
        kd_divergence(student, teacher, mask, divergence="forwardKL"), student
    )[0]
    stacked = teacher.expand(trials, vocab)
    ids, shares = sampled_logprobs(stacked, draws, seed=0)
    assert torch.allclose(shares.exp().sum(-1), torch.ones(trials, dtype=F64))
    many = student.expand(trials, vocab)
    sampled = offline_kd(
        many,
        ids,
        shares,
        torch.ones(trials, dtype=torch.bool),
        divergence="forwardKL",
        sparsity="sampled",
    )
    mean_grad = torch.autograd.grad(sampled * trials, student)[0] / trials
    assert torch.allclose(mean_grad, exact, atol=0.01), (mean_grad, exact)
    top_ids, top_values = topk_of(teacher, 2)
    cut = offline_kd(student, top_ids, top_values, mask, divergence="forwardKL")
    top_grad = torch.autograd.grad(cut, student)[0]
    assert (top_grad - exact).abs().max() > 0.05  # the cut is biased, by far more than 0.01
    with pytest.raises(ValueError, match="drawn tokens estimate forward KL at temperature 1"):
        offline_kd(student, ids[:1], shares[:1], mask, divergence="reverseKL", sparsity="sampled")


def test_offline_rejects_ids_outside_the_compared_vocabulary():
    s = rand(2, 5)
    ids, logprobs = torch.tensor([[0, 7], [1, 2]]), torch.full((2, 2), -1.0, dtype=F64)
    with pytest.raises(ValueError, match=r"ids range from 0 to 7, but only ids 0\.\.4"):
        offline_kd(s, ids, logprobs, torch.ones(2, dtype=torch.bool), divergence="forwardKL")


# --------------------------------------------------------------------------------------------
# Empty masks and bad options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 4])
def test_an_empty_mask_gives_zero_with_a_gradient_never_nan(rows):
    s = rand(rows, 6, seed=18).requires_grad_()
    t = rand(rows, 6, seed=19)
    mask = torch.zeros(rows, dtype=torch.bool)
    ids, logprobs = topk_of(t.log_softmax(-1), 3)
    hidden, head = rand(rows, 3).requires_grad_(), rand(6, 3).requires_grad_()
    projector = FeatureProjector([(0, 0)], 3, 4).double()
    values = [
        response_loss(s, torch.zeros(rows, dtype=torch.long), mask),
        kd_divergence(s, t, mask, divergence="jsd"),
        offline_kd(s, ids, logprobs, mask, divergence="reverseKL", missing_mass="uniform"),
        feature_loss([hidden], [rand(rows, 4)], projector, mask, "cosine"),
        *chunked_logit_losses(
            hidden,
            head,
            target_ids=torch.zeros(rows, dtype=torch.long),
            mask=mask,
            teacher=OnlineTeacher(rand(rows, 2), rand(6, 2)),
            options=LogitLossOptions(chunk_size=2),
        ).values(),
    ]
    for value in values:
        assert value.shape == ()
        assert val(value) == 0.0
    for value in (values[0], values[1], values[2], values[-1]):
        assert value.requires_grad
        grads = torch.autograd.grad(value, [s, hidden, head], allow_unused=True)
        assert all(g is None or (g == 0).all() for g in grads)


def test_bad_options_say_what_is_allowed():
    s, t, mask = rand(2, 3), rand(2, 3), torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="divergence is 'kl'; allowed: forwardKL, reverseKL, jsd"):
        kd_divergence(s, t, mask, divergence="kl")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"temperature is 0\.0; it must be a finite number above 0"
    ):
        kd_divergence(s, t, mask, divergence="jsd", temperature=0.0)
    with pytest.raises(ValueError, match=r"beta is 1\.5; it must be between 0 and 1"):
        kd_divergence(s, t, mask, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="has 3 positions but mask has 2"):
        response_loss(rand(3, 3), torch.zeros(3, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="chunk_size is 0"):
        chunked_logit_losses(
            rand(2, 4),
            rand(3, 4),
            target_ids=torch.zeros(2),
            mask=mask,
            teacher=None,
            options=LogitLossOptions(chunk_size=0),
        )


def test_logit_loss_options_carry_the_spec_values():
    losses = LossesSpec.model_validate(
        {
            "response": "0.5",
            "logits": {
                "weight": "2",
                "divergence": "jsd",
                "beta": "0.25",
                "temperature": "3.5",
                "missingMass": "uniform",
                "chunkSize": 64,
            },
        }
    )
    options = LogitLossOptions.from_spec(losses, compare_vocab=300)
    assert options == LogitLossOptions(
        response_weight=0.5,
        kd_weight=2.0,
        divergence=Divergence.JSD,
        beta=0.25,
        temperature=3.5,
        missing_mass=MissingMass.UNIFORM,
        chunk_size=64,
        compare_vocab=300,
    )
    assert type(options.kd_weight) is float
    assert options.divergence is Divergence.JSD
    response_only = LogitLossOptions.from_spec(LossesSpec.model_validate({"response": "1.5"}))
    assert response_only.response_weight == 1.5
    assert response_only.kd_weight == 0.0
    assert response_only.compare_vocab is None
    assert response_only.chunk_size == 512  # the spec's default
    by_value = LogitLossOptions(divergence="reverseKL")  # type: ignore[arg-type]
    assert by_value.divergence is Divergence.REVERSE_KL


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("response_weight", -1.0, r"response_weight is -1\.0; it must be a finite number of at"),
        ("kd_weight", math.inf, r"kd_weight is inf; it must be a finite number of at least 0"),
        ("kd_weight", math.nan, r"kd_weight is nan"),
        ("temperature", 0.0, r"temperature is 0\.0; it must be a finite number above 0"),
        ("beta", 1.5, r"beta is 1\.5; it must be between 0 and 1"),
        ("chunk_size", 0, r"chunk_size is 0; it must be at least 1"),
        ("compare_vocab", 0, r"compare_vocab is 0; it must be at least 1"),
        ("divergence", "kl", r"divergence is 'kl'; allowed: forwardKL, reverseKL, jsd"),
        ("missing_mass", "spread", r"missing_mass is 'spread'; allowed: ignore, uniform"),
    ],
)
def test_bad_logit_loss_options_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LogitLossOptions(**{field: value})


def chunked_on_all_rows(hidden, head, teacher, options):
    """The chunked loss over every row of ``hidden``, each with target id 0."""
    rows = hidden.shape[0]
    return chunked_logit_losses(
        hidden,
        head,
        target_ids=torch.zeros(rows, dtype=torch.long),
        mask=torch.ones(rows, dtype=torch.bool),
        teacher=teacher,
        options=options,
    )


def test_a_compared_vocabulary_larger_than_the_heads_is_refused():
    teacher = OnlineTeacher(rand(2, 2), rand(6, 2))
    with pytest.raises(ValueError, match="compare_vocab is 7; it must be between 1 and 5"):
        chunked_on_all_rows(rand(2, 3), rand(5, 3), teacher, LogitLossOptions(compare_vocab=7))


# --------------------------------------------------------------------------------------------
# The chunked loss against the plain one
# --------------------------------------------------------------------------------------------


@st.composite
def problems(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 13))
    hidden = draw(st.integers(1, 5))
    vocab = draw(st.integers(2, 9))
    student_rows = vocab + draw(st.integers(0, 2))  # padded output layers
    teacher_rows = vocab + draw(st.integers(0, 2))
    kind = draw(st.sampled_from(["online", "offline", "sampled", "none"]))
    seed = draw(st.integers(0, 2**16))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    targets = torch.randint(0, student_rows, (n,), generator=torch.Generator().manual_seed(seed))
    targets[~mask] = -100  # anything may sit at masked-out positions
    teacher: OnlineTeacher | OfflineTeacher | None = None
    compared = min(student_rows, teacher_rows)
    if kind == "online":
        th = draw(st.integers(1, 4))
        teacher = OnlineTeacher(rand(n, th, seed=seed + 1), rand(teacher_rows, th, seed=seed + 2))
    elif kind == "offline":
        k = draw(st.integers(1, compared))
        logprobs = rand(n, compared, seed=seed + 3, scale=2.0).log_softmax(-1)
        ids, values = topk_of(logprobs, k)
        ids[~mask], values[~mask] = -1, -math.inf
        teacher = OfflineTeacher(ids, values, vocab_size=teacher_rows)
    elif kind == "sampled":
        logprobs = rand(n, compared, seed=seed + 3, scale=2.0).log_softmax(-1)
        ids, values = sampled_logprobs(logprobs, draw(st.integers(1, 12)), seed)
        ids[~mask], values[~mask] = -1, -math.inf
        teacher = OfflineTeacher(ids, values, vocab_size=teacher_rows)
    sampled = {"divergence": "forwardKL", "temperature": 1.0, "missing_mass": "ignore"}
    return {
        "hidden": rand(n, hidden, seed=seed + 4, scale=1.5).requires_grad_(),
        "head": rand(student_rows, hidden, seed=seed + 5).requires_grad_(),
        "target_ids": targets,
        "mask": mask,
        "teacher": teacher,
        "compared": compared,
        "options": {
            "response_weight": draw(st.sampled_from([0.0, 1.0, 0.7])),
            "kd_weight": draw(st.sampled_from([0.0, 0.5, 2.0])),
            "divergence": draw(st.sampled_from(DIVERGENCES)),
            "beta": draw(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0])),
            "temperature": draw(st.sampled_from([0.5, 1.0, 2.0, 3.7])),
            "missing_mass": draw(st.sampled_from(["ignore", "uniform"])),
        }
        | (sampled | {"sparsity": "sampled"} if kind == "sampled" else {}),
        "chunk_size": draw(st.integers(1, 6)),
    }


@settings(max_examples=25, deadline=None, database=None)
@given(problems())
def test_chunked_values_and_gradients_equal_the_plain_loss(problem):
    hidden, head = problem["hidden"], problem["head"]
    common = {
        "target_ids": problem["target_ids"],
        "mask": problem["mask"],
        "teacher": problem["teacher"],
    }
    options = LogitLossOptions(**problem["options"], chunk_size=problem["chunk_size"])
    plain = full_logit_losses(hidden, head, **common, options=options)
    chunked = chunked_logit_losses(hidden, head, **common, options=options)
    for name in ("response", "logits", "loss"):
        assert torch.allclose(chunked[name], plain[name], rtol=1e-9, atol=1e-12), name
    assert val(plain["logits"]) >= -1e-12
    expected = torch.autograd.grad(plain["loss"], [hidden, head])
    got = torch.autograd.grad(chunked["loss"], [hidden, head])
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-8, atol=1e-11)
    if problem["teacher"] is not None and problem["mask"].any():  # the padding rows
        compared = problem["compared"]
        kd_only = chunked_logit_losses(
            hidden, head, **common, options=dataclasses.replace(options, response_weight=0.0)
        )
        (grad_head,) = torch.autograd.grad(kd_only["loss"], [head])
        assert (grad_head[compared:] == 0).all()


def test_chunked_is_normalised_by_all_masked_tokens_not_per_chunk():
    n, h, v = 10, 3, 5
    hidden, head = rand(n, h, seed=20), rand(v, h, seed=21)
    targets = torch.arange(n) % v
    mask = torch.tensor([True] * 7 + [False] * 3)
    logits = hidden @ head.T
    expected = F.cross_entropy(logits[:7], targets[:7])
    for chunk_size in (1, 3, 4, 7, 100):
        got = chunked_logit_losses(
            hidden,
            head,
            target_ids=targets,
            mask=mask,
            teacher=None,
            options=LogitLossOptions(chunk_size=chunk_size),
        )
        assert torch.allclose(got["response"], expected)
        assert torch.allclose(got["loss"], expected)


def test_chunked_in_float32_matches_the_plain_loss_in_float64():
    n, h, ht, v = 96, 16, 24, 300
    hidden = rand(n, h, seed=22).requires_grad_()
    head = rand(v, h, seed=23, scale=0.3).requires_grad_()
    teacher = OnlineTeacher(rand(n, ht, seed=24), rand(v, ht, seed=25, scale=0.3))
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(26))
    mask = torch.rand(n, generator=torch.Generator().manual_seed(27)) < 0.8
    options = LogitLossOptions(divergence=Divergence.JSD, beta=0.4, temperature=2.0, chunk_size=32)
    expected = full_logit_losses(
        hidden, head, target_ids=targets, mask=mask, teacher=teacher, options=options
    )
    h32 = hidden.detach().float().requires_grad_()
    w32 = head.detach().float().requires_grad_()
    teacher32 = OnlineTeacher(teacher.hidden.float(), teacher.head.float())
    got = chunked_logit_losses(
        h32, w32, target_ids=targets, mask=mask, teacher=teacher32, options=options
    )
    assert got["loss"].dtype == torch.float32
    assert val(got["loss"]) == pytest.approx(val(expected["loss"]), rel=1e-5)
    got["loss"].backward()
    (grad_head,) = torch.autograd.grad(expected["loss"], [head])
    assert torch.allclose(w32.grad.double(), grad_head, rtol=1e-4, atol=1e-7)


def test_chunked_parts_are_for_the_report_and_the_loss_carries_the_gradient():
    hidden, head = rand(6, 3, seed=28).requires_grad_(), rand(5, 3, seed=29).requires_grad_()
    teacher = OnlineTeacher(rand(6, 2, seed=30), rand(5, 2, seed=31))
    out = chunked_logit_losses(
        hidden,
        head,
        target_ids=torch.zeros(6, dtype=torch.long),
        mask=torch.ones(6, dtype=torch.bool),
        teacher=teacher,
        options=LogitLossOptions(response_weight=1.0, kd_weight=0.5, chunk_size=4),
    )
    assert set(out) >= {"response", "logits", "loss"}
    assert not out["response"].requires_grad
    assert not out["logits"].requires_grad
    assert torch.allclose(out["loss"], out["response"] + 0.5 * out["logits"])
    (2.0 * out["loss"]).backward()  # the incoming gradient scales the stored one
    expected = torch.autograd.grad(
        2.0
        * full_logit_losses(
            hidden,
            head,
            target_ids=torch.zeros(6, dtype=torch.long),
            mask=torch.ones(6, dtype=torch.bool),
            teacher=teacher,
            options=LogitLossOptions(response_weight=1.0, kd_weight=0.5),
        )["loss"],
        [hidden, head],
    )
    assert torch.allclose(hidden.grad, expected[0])
    assert torch.allclose(head.grad, expected[1])


def test_chunked_without_grad_and_with_a_frozen_head():
    hidden, head = rand(5, 3, seed=32).requires_grad_(), rand(4, 3, seed=33)
    common: dict[str, Any] = {
        "target_ids": torch.zeros(5, dtype=torch.long),
        "mask": torch.ones(5, dtype=torch.bool),
        "teacher": None,
        "options": LogitLossOptions(chunk_size=2),
    }
    with torch.no_grad():
        evaluated = chunked_logit_losses(hidden, head, **common)
    assert not evaluated["loss"].requires_grad
    trained = chunked_logit_losses(hidden, head, **common)
    assert torch.allclose(evaluated["loss"], trained["loss"])
    trained["loss"].backward()
    assert hidden.grad is not None
    assert head.grad is None
    again = chunked_logit_losses(hidden, head, **common)["loss"]
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        again.backward()


def test_chunked_rejects_stored_ids_from_another_vocabulary():
    teacher = OfflineTeacher(torch.tensor([[3, 9]]), torch.full((1, 2), -1.0, dtype=F64))
    with pytest.raises(ValueError, match="different tokenizer or vocabulary"):
        chunked_on_all_rows(rand(1, 2), rand(6, 2), teacher, LogitLossOptions())


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def test_feature_loss_averages_pairs_and_masked_tokens_and_trains_the_projector():
    torch.manual_seed(0)
    projector = FeatureProjector([(0, 1), (2, 3)], student_hidden=4, teacher_hidden=6).double()
    assert len(projector) == 2
    students = [rand(5, 4, seed=34).requires_grad_(), rand(5, 4, seed=35).requires_grad_()]
    teachers = [rand(5, 6, seed=36), rand(5, 6, seed=37)]
    mask = torch.tensor([True, False, True, True, False])
    teachers[0][1] = math.nan  # garbage at a masked-out position
    mse = feature_loss(students, teachers, projector, mask, "mse")
    projected = projector(students)
    expected = torch.stack(
        [((p[mask] - t[mask]) ** 2).mean() for p, t in zip(projected, teachers, strict=True)]
    ).mean()
    assert torch.allclose(mse, expected)
    mse.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert torch.isfinite(students[0].grad).all()
    cosine = feature_loss(students, teachers, projector, mask, "cosine")
    expected_cos = torch.stack(
        [
            (1 - F.cosine_similarity(p[mask], t[mask], dim=-1)).mean()
            for p, t in zip(projector(students), teachers, strict=True)
        ]
    ).mean()
    assert torch.allclose(cosine, expected_cos)


def test_feature_loss_is_zero_when_the_projection_maps_onto_the_teacher():
    projector = FeatureProjector([(1, 2)], 3, 3).double()
    with torch.no_grad():
        projector.projections[0].weight.copy_(torch.eye(3))
        projector.projections[0].bias.zero_()
    x = rand(4, 3, seed=38)
    mask = torch.ones(4, dtype=torch.bool)
    for distance in ("mse", "cosine"):
        assert abs(val(feature_loss([x], [x], projector, mask, distance))) < 1e-12
    assert val(feature_loss([x], [2 * x], projector, mask, "cosine")) == pytest.approx(0, abs=1e-12)
    assert val(feature_loss([x], [2 * x], projector, mask, "mse")) > 0


def test_feature_loss_needs_one_state_per_pair():
    projector = FeatureProjector([(0, 0), (1, 1)], 2, 2)
    with pytest.raises(ValueError, match="2 student and 1 teacher"):
        feature_loss([torch.zeros(3, 2)] * 2, [torch.zeros(3, 2)], projector, torch.ones(3) > 0)
    with pytest.raises(ValueError, match="layer map of 2 pairs"):
        projector([torch.zeros(3, 2)])


# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------


def word_level(tokens: list[str], extra_special: list[str] | None = None) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel({tok: i for i, tok in enumerate(tokens)}, unk_token=tokens[0])
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=tokens[0])
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": extra_special})
    return tokenizer


def test_same_tokenizer_passes_and_returns_the_shared_ids():
    words = ["[UNK]", "the", "cat", "sat", "on", "mat"]
    assert check_same_tokenizer(word_level(words), word_level(words)) == 6
    # A teacher with extra special tokens after the shared ones still distils the shared ids.
    teacher = word_level(words, extra_special=["<tool>", "<think>"])
    assert len(teacher) == 8
    assert check_same_tokenizer(word_level(words), teacher) == 6


def test_different_tokenizers_are_refused_with_what_still_works():
    student = word_level(["[UNK]", "the", "cat", "sat"])
    teacher = word_level(["[UNK]", "cat", "the", "sat"])
    with pytest.raises(VocabularyMismatchError) as caught:
        check_same_tokenizer(student, teacher)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "disagree on 2 of the 4" in message
    assert "id 1: student 'the', teacher 'cat'" in message
    assert "need the same tokenizer" in message
    assert "response distillation" in message
    assert "still works" in message


def test_shared_vocab_size_skips_padding_rows():
    assert shared_vocab_size(32064, 32000) == 32000
    assert shared_vocab_size(32064, 32128, 32000, 32000) == 32000
    assert shared_vocab_size(128256, 128256) == 128256
    with pytest.raises(ValueError, match="tokenizer has 32100 tokens but its output layer only"):
        shared_vocab_size(32064, 32128, 32100, 32000)


# --------------------------------------------------------------------------------------------
# Putting parts together
# --------------------------------------------------------------------------------------------


def test_combine_weights_parts_and_reports_each_as_a_float():
    x = torch.tensor(2.0, requires_grad=True)
    parts = {"logits": x * 3, "features": x**2, "response": torch.tensor(9.0)}
    total, report = combine(parts, {"logits": 1.0, "features": 0.5})
    assert val(total) == pytest.approx(6.0 + 2.0)
    assert report == {"logits": 6.0, "features": 4.0, "response": 9.0, "loss": 8.0}
    assert all(isinstance(v, float) for v in report.values())
    total.backward()
    assert val(x.grad) == pytest.approx(3.0 + 0.5 * 2 * 2.0)
    with pytest.raises(ValueError, match=r"weights name parts \['kd'\] that are not given"):
        combine(parts, {"kd": 1.0})


def test_combine_puts_the_chunked_loss_and_the_features_together_as_documented():
    hidden, head = rand(6, 4, seed=40).requires_grad_(), rand(7, 4, seed=41).requires_grad_()
    mask = torch.tensor([False, True, True, True, True, False])
    logit = chunked_logit_losses(
        hidden,
        head,
        target_ids=torch.arange(6),
        mask=mask,
        teacher=OnlineTeacher(rand(6, 5, seed=42), rand(7, 5, seed=43)),
        options=LogitLossOptions(kd_weight=0.5, chunk_size=3),
    )
    projector = FeatureProjector([(0, 1)], 4, 5).double()
    feats = feature_loss([hidden], [rand(6, 5, seed=44)], projector, mask)
    total, report = combine({**logit, "features": feats}, {"loss": 1.0, "features": 0.3})
    assert set(report) == {"response", "logits", "features", "loss"}
    assert report["loss"] == pytest.approx(val(logit["loss"]) + 0.3 * val(feats))
    assert report["loss"] == pytest.approx(
        report["response"] + 0.5 * report["logits"] + 0.3 * report["features"]
    )
    total.backward()
    assert head.grad is not None
    assert hidden.grad is not None
    assert projector.projections[0].weight.grad is not None


def test_chunked_in_bfloat16_stays_close_to_float64():
    n, h, v = 64, 32, 200
    hidden = rand(n, h, seed=45).requires_grad_()
    head = rand(v, h, seed=46, scale=0.2).requires_grad_()
    teacher = OnlineTeacher(rand(n, h, seed=47), rand(v, h, seed=48, scale=0.2))
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(49))
    mask = torch.ones(n, dtype=torch.bool)
    options = LogitLossOptions(divergence=Divergence.REVERSE_KL, temperature=2.0, chunk_size=16)
    expected = full_logit_losses(
        hidden, head, target_ids=targets, mask=mask, teacher=teacher, options=options
    )
    expected_grad = torch.autograd.grad(expected["loss"], [head])[0]
    w16 = head.detach().bfloat16().requires_grad_()
    got = chunked_logit_losses(
        hidden.detach().bfloat16(),
        w16,
        target_ids=targets,
        mask=mask,
        teacher=OnlineTeacher(teacher.hidden.bfloat16(), teacher.head.bfloat16()),
        options=options,
    )
    assert got["loss"].dtype == torch.float32  # softmaxes in float32
    assert val(got["loss"]) == pytest.approx(val(expected["loss"]), rel=2e-2)
    got["loss"].backward()
    assert w16.grad.dtype == torch.bfloat16
    error = (w16.grad.double() - expected_grad).norm() / expected_grad.norm()
    assert error < 5e-2
