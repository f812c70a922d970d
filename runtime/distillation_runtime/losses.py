"""Distillation losses: small, shape-documented functions and modules.

Conventions (every function below):

- Callers pass tokens already shifted and flattened: ``N`` token positions, ``V`` vocabulary
  rows, ``H`` hidden size (``Hs``/``Ht`` for student/teacher), ``K`` stored top-k per position.
- ``mask`` is a boolean ``[N]``: True where a position counts (response tokens). Prompt tokens and
  padding never count, and the values at masked-out positions may be garbage (any finite logits,
  any target id, any top-k ids): they are neither read into the loss nor into its gradient.
- Every mean is over the masked tokens, and an empty mask gives 0 (still attached to the graph,
  so ``backward()`` works and gives zero gradients), never NaN.
- Softmaxes run in float32 at least (bf16/fp16 inputs are upcast; float64 stays float64).

Logit distillation with temperature ``T`` compares ``softmax(teacher / T)`` with
``softmax(student / T)`` and scales the per-token divergence by ``T**2`` (Hinton et al., 2015), so
the gradient's size does not shrink as ``T`` grows:

- ``forwardKL``: KL(teacher || student), mode covering.
- ``reverseKL``: KL(student || teacher), mode seeking.
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024) in TRL's
  convention (``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``): with
  ``m = beta * p_teacher + (1 - beta) * p_student``,
  ``jsd = beta * KL(teacher || m) + (1 - beta) * KL(student || m)``; like TRL, ``beta == 0`` *is*
  forward KL and ``beta == 1`` *is* reverse KL. (For ``0 < beta < 1`` the value is O(beta) near
  0 and O(1 - beta) near 1: ``jsd / beta -> forward KL`` and ``jsd / (1 - beta) -> reverse KL``.)
  Our value is TRL's times ``T**2`` (TRL does not scale), with the same per-token mean.

Offline, the teacher's stored tokens are its top-k (``sparsity: topK``, compared on those ids,
see :func:`_offline_logprobs`) or draws from its distribution (``sampled``, RS-KD: the distinct
ids with the log of their share ``w`` of the draws). For draws the loss is
``sum(w * (log w - log p_student))`` with the student's softmax over the whole vocabulary, whose
gradient ``p_student - w`` is in expectation forward KL's: unbiased, where a top-k cut is not.
Only forward KL at T = 1 can be estimated this way.

Training uses :func:`chunked_logit_losses`, which never holds the ``[N, V]`` logits: it computes
them ``chunk_size`` positions at a time from the student's last hidden states and its output
layer, and computes each chunk's gradient right away (see :class:`_ChunkedLogitLoss`). A stage
puts the parts together like this::

    options = LogitLossOptions.from_spec(spec.train.losses, compare_vocab=shared)  # once
    logit = chunked_logit_losses(hidden, model.lm_head.weight, target_ids=..., mask=...,
                                 teacher=OnlineTeacher(t_hidden, teacher.lm_head.weight),
                                 options=options)
    feats = feature_loss(student_states, teacher_states, projector, mask, distance="mse")
    total, report = combine({**logit, "features": feats}, {"loss": 1.0, "features": weight})
    total.backward()   # report: response, logits, features and the total loss, as floats
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import Tensor, nn

from distillation_runtime.spec import (
    Divergence,
    FeatureDistance,
    LogitLossSpec,
    LossesSpec,
    MissingMass,
    Sparsity,
)

__all__ = [
    "MISSING_MASS_FLOOR",
    "DistanceName",
    "DivergenceName",
    "FeatureProjector",
    "LogitLossOptions",
    "MissingMassName",
    "OfflineTeacher",
    "OnlineTeacher",
    "SparsityName",
    "VocabularyMismatchError",
    "check_same_tokenizer",
    "chunked_logit_losses",
    "combine",
    "feature_loss",
    "full_logit_losses",
    "kd_divergence",
    "offline_kd",
    "response_loss",
    "shared_vocab_size",
]

DivergenceName = Literal["forwardKL", "reverseKL", "jsd"]
MissingMassName = Literal["ignore", "uniform"]
SparsityName = Literal["topK", "sampled"]
DistanceName = Literal["mse", "cosine"]

_E = TypeVar("_E", bound=StrEnum)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _choice(enum: type[_E], value: str, name: str) -> _E:
    """``value`` as a member of ``enum``, or a ValueError that lists the allowed values."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise ValueError(f"{name} is {value!r}; allowed: {allowed}") from None


def _check_options(temperature: float, beta: float) -> None:
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature is {temperature}; it must be a finite number above 0")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta is {beta}; it must be between 0 and 1 (inclusive)")


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least: softmaxes in bf16/fp16 lose too much (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [N] over ``mask`` [N]; 0 (with grad) when the mask is empty."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / mask.sum().clamp(min=1)


def _check_rows(mask: Tensor, **tensors: Tensor) -> None:
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a boolean [N] tensor; got {mask.dtype} {list(mask.shape)}")
    for name, t in tensors.items():
        if t.shape[0] != mask.shape[0]:
            raise ValueError(
                f"{name} has {t.shape[0]} positions but mask has {mask.shape[0]}; pass tokens "
                "shifted and flattened to [N, ...]"
            )


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, from log-probabilities [n, V] -> [n]; terms with p == 0 count 0."""
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(
        -1
    )


def _token_divergence(
    student_logprobs: Tensor, teacher_logprobs: Tensor, divergence: Divergence, beta: float
) -> Tensor:
    """Divergence per row between two log-distributions over the same support [n, S] -> [n].

    Follows TRL's GKD convention exactly: ``beta == 0`` is forward KL, ``beta == 1`` reverse KL.
    """
    if divergence is Divergence.FORWARD_KL or (divergence is Divergence.JSD and beta == 0.0):
        return _kl(teacher_logprobs, student_logprobs)
    if divergence is Divergence.REVERSE_KL or (divergence is Divergence.JSD and beta == 1.0):
        return _kl(student_logprobs, teacher_logprobs)
    mixture = torch.logaddexp(
        teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta)
    )
    return beta * _kl(teacher_logprobs, mixture) + (1.0 - beta) * _kl(student_logprobs, mixture)


def _online_logprobs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities at temperature T over the full vocabulary."""
    student = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    teacher = F.log_softmax(_wide(teacher_logits.detach()) / temperature, dim=-1)
    return student, teacher.to(student.dtype)


def _offline_logprobs(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float,
    missing_mass: MissingMass,
    sparsity: Sparsity = Sparsity.TOP_K,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities from the teacher's stored top-k.

    ``sparsity: sampled``: the stored ids are draws with the log of their share; the student's
    log-probabilities over the whole vocabulary, at those ids, against the shares (T = 1).

    ``ignore``: both distributions live on the K stored ids: the teacher is
    ``log_softmax(topk_logprobs / T)`` (its top-k, renormalised) and the student is
    ``log_softmax(student_logits[topk_ids] / T)`` (restricted to the same ids and renormalised).
    Comparing the renormalised teacher with the *full* student softmax instead would make the
    student's probability outside the top-k free, and KL would push it nowhere; restricting both
    compares the shapes of the two distributions where the teacher told us something.

    ``uniform``: the teacher's missing mass ``r = 1 - sum(exp(topk_logprobs))`` is spread evenly
    over the other ``V - K`` ids, which gives a full distribution over ``V``; temperature is then
    applied to that distribution the same way, ``log_softmax(log p / T)`` over all ``V`` ids (at
    T = 1 this is the reconstructed distribution itself). This materialises the teacher's
    ``[n, V]`` log-probabilities, the same size as the student's logits for those rows (in
    :func:`chunked_logit_losses`: one chunk at a time). The missing mass is at least
    ``MISSING_MASS_FLOOR`` (see :func:`_uniform_fill`).
    """
    stored = _wide(topk_logprobs.detach())
    topk_ids = topk_ids.long()
    if sparsity is Sparsity.SAMPLED:
        student = F.log_softmax(_wide(student_logits) / temperature, dim=-1).gather(-1, topk_ids)
        return student, stored.to(student.dtype)
    if missing_mass is MissingMass.IGNORE:
        student = F.log_softmax(_wide(student_logits).gather(-1, topk_ids) / temperature, dim=-1)
        return student, F.log_softmax(stored / temperature, dim=-1).to(student.dtype)
    student = F.log_softmax(_wide(student_logits) / temperature, dim=-1)
    n, vocab = student.shape
    fill = _uniform_fill(stored, vocab - topk_ids.shape[-1])
    full = fill.to(student.dtype)[:, None].expand(n, vocab).clone()
    full.scatter_(-1, topk_ids, stored.to(student.dtype))
    return student, F.log_softmax(full / temperature, dim=-1)


MISSING_MASS_FLOOR = 1e-6
"""Least probability ``missing_mass: uniform`` leaves outside the stored top-k. Stored log-probs
can sum to 1 or a hair above it (rounding); a teacher that gives the rest of the vocabulary
exactly 0 would make reverse KL infinite wherever the student puts any mass there."""


def _uniform_fill(stored: Tensor, rest: int) -> Tensor:
    """Log-probability of each of the ``rest`` ids outside the top-k, per row: [n, K] -> [n].

    ``(1 - sum(exp(stored))) / rest``, the missing mass at least ``MISSING_MASS_FLOOR``; -inf
    when the top-k is the whole vocabulary (``rest == 0``: no id is left to fill).
    """
    if rest <= 0:
        return stored.new_full(stored.shape[:1], -math.inf)
    missing = (1.0 - stored.exp().sum(-1)).clamp(min=MISSING_MASS_FLOOR)
    return (missing / rest).log()


def _kd_tokens(
    student_logits: Tensor,
    *,
    teacher_logits: Tensor | None,
    topk: tuple[Tensor, Tensor] | None,
    divergence: Divergence,
    beta: float,
    temperature: float,
    missing_mass: MissingMass,
    sparsity: Sparsity = Sparsity.TOP_K,
) -> Tensor:
    """T**2 times the divergence per row [n], online (teacher logits) or offline (top-k)."""
    if teacher_logits is not None:
        student, teacher = _online_logprobs(student_logits, teacher_logits, temperature)
    else:
        assert topk is not None
        student, teacher = _offline_logprobs(
            student_logits, topk[0], topk[1], temperature, missing_mass, sparsity
        )
    return temperature**2 * _token_divergence(student, teacher, divergence, beta)


def _check_sampled(
    sparsity: Sparsity,
    divergence: Divergence,
    beta: float,
    temperature: float,
    missing_mass: MissingMass,
) -> None:
    """Drawn tokens estimate forward KL at T = 1 and nothing else."""
    if sparsity is not Sparsity.SAMPLED:
        return
    forward = divergence is Divergence.FORWARD_KL or (divergence is Divergence.JSD and beta == 0)
    if not forward or temperature != 1.0 or missing_mass is not MissingMass.IGNORE:
        raise ValueError(
            f"sparsity sampled with divergence {divergence.value}, temperature {temperature}, "
            f"missing_mass {missing_mass.value}: drawn tokens estimate forward KL at "
            "temperature 1 only, with missing_mass ignore"
        )


def _check_topk_ids(topk_ids: Tensor, vocab: int) -> None:
    """Stored ids must index the compared vocabulary (one device sync)."""
    if topk_ids.numel() == 0:
        return
    low, high = int(topk_ids.min()), int(topk_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(
            f"stored top-k ids range from {low} to {high}, but only ids 0..{vocab - 1} are "
            "compared: the log-probs were generated with a different tokenizer or vocabulary"
        )


# --------------------------------------------------------------------------------------------
# Plain losses (materialised logits)
# --------------------------------------------------------------------------------------------


def response_loss(student_logits: Tensor, target_ids: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy on the teacher's generated tokens, mean over masked positions.

    student_logits [N, V] (float), target_ids [N] (int, any value where masked out),
    mask [N] (bool) -> scalar.
    """
    _check_rows(mask, student_logits=student_logits, target_ids=target_ids)
    targets = torch.where(mask, target_ids, torch.zeros_like(target_ids))
    per_token = F.cross_entropy(_wide(student_logits), targets, reduction="none")
    return _masked_mean(per_token, mask)


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    divergence: Divergence | DivergenceName,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Logit distillation against the teacher's full distribution (module docstring: the math).

    student_logits [N, V], teacher_logits [N, V] (no grad is taken through it), mask [N] ->
    scalar: ``T**2 * divergence`` per token, mean over masked positions. ``beta`` is used only by
    ``jsd``.
    """
    _check_rows(mask, student_logits=student_logits, teacher_logits=teacher_logits)
    _check_options(temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {list(student_logits.shape)} and teacher logits "
            f"{list(teacher_logits.shape)} differ: compare the first shared_vocab_size(...) ids"
        )
    per_token = _kd_tokens(
        student_logits,
        teacher_logits=teacher_logits,
        topk=None,
        divergence=_choice(Divergence, divergence, "divergence"),
        beta=beta,
        temperature=temperature,
        missing_mass=MissingMass.IGNORE,
    )
    return _masked_mean(per_token, mask)


def offline_kd(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    mask: Tensor,
    *,
    divergence: Divergence | DivergenceName,
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: MissingMass | MissingMassName = "ignore",
    sparsity: Sparsity | SparsityName = "topK",
) -> Tensor:
    """Logit distillation from the teacher's stored top-k log-probs (or, ``sparsity:
    sampled``, its drawn tokens with the log of their share: forward KL at T = 1 only).

    student_logits [N, V], topk_ids [N, K] (int, distinct per row, < V), topk_logprobs [N, K]
    (the teacher's log-probs of those ids at T = 1), mask [N] -> scalar: ``T**2 * divergence``
    per token, mean over masked positions. ``missing_mass`` and how temperature applies to
    stored log-probs: see :func:`_offline_logprobs`.
    """
    _check_rows(mask, student_logits=student_logits, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    _check_options(temperature, beta)
    divergence = _choice(Divergence, divergence, "divergence")
    sparsity = _choice(Sparsity, sparsity, "sparsity")
    _check_sampled(sparsity, divergence, beta, temperature, MissingMass(missing_mass))
    if topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"topk_ids {list(topk_ids.shape)} and topk_logprobs {list(topk_logprobs.shape)} "
            "must have the same shape [N, K]"
        )
    # Masked-out rows may hold anything (padding ids, -inf): give them a harmless placeholder.
    ids = torch.where(mask[:, None], topk_ids, torch.arange(topk_ids.shape[1], device=mask.device))
    _check_topk_ids(ids, student_logits.shape[-1])
    uniform = torch.full((), -math.log(max(topk_ids.shape[1], 1)), device=mask.device)
    logprobs = torch.where(mask[:, None], topk_logprobs, uniform.to(topk_logprobs.dtype))
    per_token = _kd_tokens(
        student_logits,
        teacher_logits=None,
        topk=(ids, logprobs),
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        missing_mass=_choice(MissingMass, missing_mass, "missing_mass"),
        sparsity=sparsity,
    )
    return _masked_mean(per_token, mask)


# --------------------------------------------------------------------------------------------
# Feature distillation
# --------------------------------------------------------------------------------------------


class FeatureProjector(nn.Module):
    """One learned ``nn.Linear(student_hidden, teacher_hidden)`` per pair of the layer map.

    ``layer_map`` is a sequence of ``(student_layer, teacher_layer)`` pairs (the spec's
    ``train.losses.features.layerMap``); projection ``i`` belongs to pair ``i``. Train it with the
    student (put its parameters in the optimizer); it is thrown away after training.
    """

    def __init__(
        self, layer_map: Sequence[tuple[int, int]], student_hidden: int, teacher_hidden: int
    ) -> None:
        super().__init__()
        if not layer_map:
            raise ValueError("layer_map is empty: give at least one (student, teacher) pair")
        self.layer_map = [(int(s), int(t)) for s, t in layer_map]
        self.projections = nn.ModuleList(
            nn.Linear(student_hidden, teacher_hidden) for _ in self.layer_map
        )

    def __len__(self) -> int:
        return len(self.layer_map)

    def forward(self, student_states: Sequence[Tensor]) -> list[Tensor]:
        """student_states: one [N, Hs] per pair -> one [N, Ht] per pair."""
        if len(student_states) != len(self.projections):
            raise ValueError(
                f"got {len(student_states)} student hidden states for a layer map of "
                f"{len(self.projections)} pairs"
            )
        return [proj(x) for proj, x in zip(self.projections, student_states, strict=True)]


def feature_loss(
    student_states: Sequence[Tensor],
    teacher_states: Sequence[Tensor],
    projector: FeatureProjector,
    mask: Tensor,
    distance: FeatureDistance | DistanceName = "mse",
) -> Tensor:
    """Feature distillation: projected student hidden states match the teacher's.

    student_states: one [N, Hs] per layer pair, teacher_states: one [N, Ht] per pair (in the
    projector's layer-map order; no grad is taken through them), mask [N] -> scalar.
    ``mse``: mean over the hidden dimension of the squared difference; ``cosine``:
    ``1 - cos(projected student, teacher)``. Each is a mean over masked tokens, then a mean over
    pairs.
    """
    which = _choice(FeatureDistance, distance, "distance")
    if len(teacher_states) != len(student_states):
        raise ValueError(
            f"got {len(student_states)} student and {len(teacher_states)} teacher hidden states; "
            "pass one of each per layer pair"
        )
    _check_rows(mask, **{f"student_states[{i}]": s for i, s in enumerate(student_states)})
    _check_rows(mask, **{f"teacher_states[{i}]": t for i, t in enumerate(teacher_states)})
    # Only the masked rows are projected: cheaper, and padding rows (which can hold NaN, e.g. from
    # fully masked attention) cannot reach the loss or its gradient.
    rows = mask.nonzero().squeeze(1)
    count = max(rows.numel(), 1)
    losses = []
    selected = [s.index_select(0, rows) for s in student_states]
    for projected, teacher in zip(projector(selected), teacher_states, strict=True):
        p = _wide(projected)
        t = _wide(teacher.detach().index_select(0, rows)).to(p.dtype)
        if which is FeatureDistance.MSE:
            per_token = (p - t).pow(2).mean(-1)
        else:
            per_token = 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)
        losses.append(per_token.sum() / count)
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------
# Vocabulary checks
# --------------------------------------------------------------------------------------------


class VocabularyMismatchError(ValueError):
    """Student and teacher do not share token ids: only response distillation can be used."""


class _HasVocab(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


def shared_vocab_size(
    student_vocab_rows: int,
    teacher_vocab_rows: int,
    student_tokenizer_len: int | None = None,
    teacher_tokenizer_len: int | None = None,
) -> int:
    """How many token ids the logit losses compare: the first ``shared_vocab_size(...)``.

    Output layers are often padded past the tokenizer (e.g. 32000 tokens in 32064 rows, for
    faster matmuls); the padding rows are not tokens and differ between models. The compared ids
    are the first ``min(student rows, teacher rows)``, further cut to the ids that are real tokens
    in both tokenizers when their lengths are given. A model whose output layer has fewer rows
    than its tokenizer has tokens is an error.
    """
    for who, rows, length in (
        ("student", student_vocab_rows, student_tokenizer_len),
        ("teacher", teacher_vocab_rows, teacher_tokenizer_len),
    ):
        if rows < 1:
            raise ValueError(f"{who} output layer has {rows} rows; it needs at least 1")
        if length is not None and length > rows:
            raise ValueError(
                f"{who} tokenizer has {length} tokens but its output layer only {rows} rows: "
                "the tokenizer does not belong to this model"
            )
    size = min(student_vocab_rows, teacher_vocab_rows)
    lengths = [n for n in (student_tokenizer_len, teacher_tokenizer_len) if n is not None]
    return min([size, *lengths])


def check_same_tokenizer(student_tokenizer: _HasVocab, teacher_tokenizer: _HasVocab) -> int:
    """Check that two tokenizers give the same ids to the same tokens; return how many ids match.

    Tokenizers are anything with ``get_vocab() -> {token: id}`` (Hugging Face tokenizers). The
    ids both tokenizers have, ``0 .. min(len) - 1``, must name the same token; one tokenizer may
    have extra tokens after them (added special tokens), which are not compared. Raises
    :class:`VocabularyMismatchError` otherwise.
    """
    by_id = []
    for tokenizer in (student_tokenizer, teacher_tokenizer):
        vocab = tokenizer.get_vocab()
        by_id.append({i: token for token, i in vocab.items()})
    student, teacher = by_id
    shared = min(len(student), len(teacher))
    differ = [i for i in range(shared) if student.get(i) != teacher.get(i)]
    if shared == 0 or differ:
        examples = "; ".join(
            f"id {i}: student {student.get(i)!r}, teacher {teacher.get(i)!r}" for i in differ[:3]
        )
        raise VocabularyMismatchError(
            f"the student and teacher tokenizers disagree on {len(differ)} of the {shared} token "
            f"ids they share ({examples or 'an empty vocabulary'}). Logit and feature "
            "distillation compare the two models token by token, so they need the same "
            "tokenizer; response distillation (train.losses.response) still works: remove "
            "train.losses.logits and train.losses.features, or pick a student that uses the "
            "teacher's tokenizer."
        )
    return shared


# --------------------------------------------------------------------------------------------
# Memory-bounded logit losses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineTeacher:
    """The live teacher: its last hidden states and output layer (no grad is taken through them).

    hidden [N, Ht], head [Vt, Ht] (the teacher's ``lm_head.weight``).
    """

    hidden: Tensor
    head: Tensor


@dataclass(frozen=True)
class OfflineTeacher:
    """The teacher's stored top-k: topk_ids [N, K] (int), topk_logprobs [N, K] (at T = 1).

    ``vocab_size``: how many ids the teacher's distribution spans (its tokenizer's length);
    ``None`` means the student's output rows. Only ``missing_mass: uniform`` uses it (the missing
    mass is spread over the compared ids that are not in the top-k).
    """

    topk_ids: Tensor
    topk_logprobs: Tensor
    vocab_size: int | None = None


@dataclass(frozen=True)
class LogitLossOptions:
    """What :func:`chunked_logit_losses` computes: one value, built from the spec and checked once.

    ``response_weight`` and ``kd_weight`` weigh the response cross-entropy and the KD loss in
    ``loss``; ``divergence``, ``beta`` (jsd only), ``temperature`` and ``missing_mass`` (stored
    top-k only) pick the KD loss (the module docstring has the math); ``chunk_size`` is how many
    token positions one chunk computes; ``compare_vocab`` is how many ids the KD loss compares,
    None for ``min(student rows, teacher rows)`` (see :func:`shared_vocab_size`). The enums may
    be given by value (``"jsd"``); a value out of range raises a ValueError that names the field.
    """

    response_weight: float = 1.0
    kd_weight: float = 1.0
    divergence: Divergence = Divergence.FORWARD_KL
    beta: float = 0.5
    temperature: float = 1.0
    missing_mass: MissingMass = MissingMass.IGNORE
    sparsity: Sparsity = Sparsity.TOP_K
    chunk_size: int = 1024
    compare_vocab: int | None = None

    def __post_init__(self) -> None:
        for name in ("response_weight", "kd_weight", "beta", "temperature"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("response_weight", "kd_weight"):
            weight = getattr(self, name)
            if not weight >= 0 or not math.isfinite(weight):
                raise ValueError(f"{name} is {weight}; it must be a finite number of at least 0")
        _check_options(self.temperature, self.beta)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size is {self.chunk_size}; it must be at least 1")
        if self.compare_vocab is not None and self.compare_vocab < 1:
            raise ValueError(
                f"compare_vocab is {self.compare_vocab}; it must be at least 1 (or None: the ids "
                "both output layers have)"
            )
        object.__setattr__(self, "divergence", _choice(Divergence, self.divergence, "divergence"))
        object.__setattr__(
            self, "missing_mass", _choice(MissingMass, self.missing_mass, "missing_mass")
        )
        object.__setattr__(self, "sparsity", _choice(Sparsity, self.sparsity, "sparsity"))
        _check_sampled(
            self.sparsity, self.divergence, self.beta, self.temperature, self.missing_mass
        )

    @classmethod
    def from_spec(cls, losses: LossesSpec, compare_vocab: int | None = None) -> LogitLossOptions:
        """The options ``train.losses`` asks for; without ``logits``, the response loss only."""
        logits = losses.logits if losses.logits is not None else LogitLossSpec()
        return cls(
            response_weight=float(losses.response),
            kd_weight=float(logits.weight) if losses.logits is not None else 0.0,
            divergence=logits.divergence,
            beta=logits.jsd_beta,
            temperature=float(logits.temperature),
            missing_mass=logits.missing_mass,
            sparsity=logits.sparsity,
            chunk_size=logits.chunk_size,
            compare_vocab=compare_vocab,
        )


def _matmul_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out <- a @ b``, without a temporary when the dtypes already agree."""
    if a.dtype == out.dtype == b.dtype:
        return torch.matmul(a, b, out=out)
    return out.copy_(a @ b)


def _log_softmax_(x: Tensor, scratch: Tensor) -> Tensor:
    """``x <- log_softmax(x, -1)`` in place; ``scratch`` (same shape) is overwritten."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=scratch)
    return x.sub_(scratch.sum(-1, keepdim=True).log_())


def _kl_rows_(diff: Tensor, p: Tensor) -> Tensor:
    """Rows of ``sum(p * diff)`` where terms with p == 0 count 0; ``diff`` is overwritten."""
    return diff.mul_(p).masked_fill_(p == 0, 0.0).sum(-1)


def _full_kd_(
    student: Tensor,
    teacher: Tensor,
    scratch: Tensor,
    spare: Tensor,
    spare2: Tensor | None,
    grad: Tensor | None,
    coef: float,
    opts: LogitLossOptions,
) -> Tensor:
    """``T**2 * divergence`` per row over the full compared vocabulary, and its gradient.

    student [c, Vc]: the student's logits (up to a per-row shift), teacher [c, Vc]: the teacher's
    logits or log-probs; both are overwritten, as are scratch/spare/spare2 (same shape).
    ``grad`` [c, Vc] (when given) gets ``coef * d(T**2 * divergence) / d student_logits`` added.
    The gradients, with p = softmax(student / T), q = softmax(teacher / T):
    forward KL ``T (p - q)``; reverse KL ``T p (log p - log q - KL)``; jsd (mixture m)
    ``T (1 - beta) p (log p - log m - KL(p || m))``.
    """
    temperature, beta = opts.temperature, opts.beta
    log_q = _log_softmax_(teacher.div_(temperature), scratch)
    log_p = _log_softmax_(student.div_(temperature), scratch)
    p = torch.exp(log_p, out=scratch)
    step = coef * temperature
    forward = opts.divergence is Divergence.FORWARD_KL or (
        opts.divergence is Divergence.JSD and beta == 0.0
    )
    reverse = opts.divergence is Divergence.REVERSE_KL or (
        opts.divergence is Divergence.JSD and beta == 1.0
    )
    if forward:
        diff = torch.sub(log_q, log_p, out=spare)
        q = log_q.exp_()
        rows = _kl_rows_(diff, q)
        if grad is not None:
            grad.add_(p, alpha=step).sub_(q, alpha=step)
    elif reverse:
        rows = _kl_rows_(torch.sub(log_p, log_q, out=spare), p)  # spare: p (log p - log q)
        if grad is not None:
            grad.add_(spare, alpha=step).addcmul_(p, rows[:, None], value=-step)
    else:
        assert spare2 is not None
        log_m = torch.add(log_q, math.log(beta), out=spare)
        torch.logaddexp(log_m, torch.add(log_p, math.log1p(-beta), out=spare2), out=log_m)
        diff = torch.sub(log_q, log_m, out=spare2)
        rows_teacher = _kl_rows_(diff, log_q.exp_())
        rows_student = _kl_rows_(torch.sub(log_p, log_m, out=spare2), p)
        rows = beta * rows_teacher + (1.0 - beta) * rows_student
        if grad is not None:
            step *= 1.0 - beta
            grad.add_(spare2, alpha=step).addcmul_(p, rows_student[:, None], value=-step)
    return rows * temperature**2


class _Workspace:
    """The ``[chunk, V]`` buffers of one call, allocated once and reused by every chunk (fresh
    pages for every chunk cost time: the kernel zeroes them)."""

    def __init__(
        self,
        rows: int,
        opts: LogitLossOptions,
        vocab: int,
        compared: int,
        dtype: torch.dtype,
        device: Any,
    ) -> None:
        self.rows, self.opts, self.vocab, self.compared = rows, opts, vocab, compared
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, rows: int, cols: int) -> Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.rows, cols, dtype=self.dtype, device=self.device)
        return self.buffers[name][:rows]


def _chunk(
    h: Tensor,
    head: Tensor,
    targets: Tensor,
    teacher: OnlineTeacher | OfflineTeacher | None,
    idx: Tensor,
    work: _Workspace,
    coefs: tuple[float, float] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Summed response and KD losses of one chunk of masked rows, and d(weighted sum)/d logits.

    h [c, H], head [V, H], targets [c]; ``coefs`` = (response weight, KD weight) / token count,
    or None when no gradient is wanted. Returns (response sum, KD sum, grad [c, V] or None).
    """
    opts, c, vocab, vc = work.opts, h.shape[0], work.vocab, work.compared
    logits = _matmul_into(work.get("logits", c, vocab), h, head.T)
    scratch = work.get("scratch", c, vocab)
    log_p = _log_softmax_(logits, scratch)  # at T = 1: the response loss's
    response = -log_p.gather(1, targets[:, None]).sum()
    grad = None
    if coefs is not None:
        grad = torch.exp(log_p, out=work.get("grad", c, vocab))
        grad.scatter_add_(1, targets[:, None], torch.full_like(grad[:, :1], -1.0))
        grad.mul_(coefs[0])
    kd_coef = coefs[1] if coefs is not None else 0.0
    kd_grad = grad[:, :vc] if grad is not None and kd_coef != 0.0 else None
    if teacher is None:
        return response, torch.zeros_like(response), grad
    if isinstance(teacher, OfflineTeacher) and opts.sparsity is Sparsity.SAMPLED:
        ids = teacher.topk_ids.index_select(0, idx).long()
        shares = _wide(teacher.topk_logprobs.index_select(0, idx)).to(work.dtype)
        log_p_compared = log_p[:, :vc]
        if vc < vocab:  # the softmax over the compared ids only
            log_p_compared = log_p_compared - log_p_compared.logsumexp(dim=1, keepdim=True)
        rows = _kl(shares, log_p_compared.gather(1, ids))
        if kd_grad is not None:  # d/d logits of -sum(w log p) = p - w (the shares sum to 1)
            kd_grad.add_(torch.exp(log_p_compared, out=scratch[:, :vc]), alpha=kd_coef)
            kd_grad.scatter_add_(1, ids, shares.exp().mul_(-kd_coef))
        return response, rows.sum(), grad
    if isinstance(teacher, OfflineTeacher) and opts.missing_mass is MissingMass.IGNORE:
        ids = teacher.topk_ids.index_select(0, idx).long()
        stored = teacher.topk_logprobs.index_select(0, idx)
        with torch.enable_grad():
            student = log_p.gather(1, ids).requires_grad_(kd_grad is not None)
            rows = _kd_tokens(
                student,
                teacher_logits=None,
                topk=(torch.arange(ids.shape[1], device=ids.device).expand_as(ids), stored),
                divergence=opts.divergence,
                beta=opts.beta,
                temperature=opts.temperature,
                missing_mass=MissingMass.IGNORE,
            )
            kd = rows.sum()
            if kd_grad is not None:
                (grad_k,) = torch.autograd.grad(kd * kd_coef, student)
                kd_grad.scatter_add_(1, ids, grad_k.to(kd_grad.dtype))
        return response, kd.detach(), grad
    teacher_logits = work.get("teacher", c, vc)
    if isinstance(teacher, OnlineTeacher):
        _matmul_into(teacher_logits, teacher.hidden.index_select(0, idx), teacher.head[:vc].T)
    else:  # uniform: the full distribution the stored top-k describe (see _offline_logprobs)
        ids = teacher.topk_ids.index_select(0, idx).long()
        stored = _wide(teacher.topk_logprobs.index_select(0, idx)).to(work.dtype)
        fill = _uniform_fill(stored, vc - ids.shape[1])
        teacher_logits.copy_(fill[:, None].expand(c, vc)).scatter_(1, ids, stored)
    jsd = opts.divergence is Divergence.JSD and 0.0 < opts.beta < 1.0
    kd_rows = _full_kd_(
        log_p[:, :vc],
        teacher_logits,
        scratch[:, :vc],
        work.get("spare", c, vc),
        work.get("spare2", c, vc) if jsd else None,
        kd_grad,
        kd_coef,
        opts,
    )
    return response, kd_rows.sum(), grad


class _ChunkedLogitLoss(torch.autograd.Function):
    """Loss and gradients computed chunk by chunk in forward; backward only scales them.

    Why this and not ``torch.utils.checkpoint`` per chunk: checkpointing runs every chunk's
    output-layer matmul twice (most of the cost) and, during each chunk's recomputation, holds
    that chunk's whole autograd graph (a dozen ``[c, V]`` tensors for softmax + KL). Here, as in
    Liger's fused linear cross-entropy, each chunk's gradient w.r.t. its logits is written down
    analytically into reused buffers (about five ``[c, V]`` tensors in all, six for jsd), turned
    right away into ``grad_hidden[rows] = g @ W`` and ``grad_W += g.T @ h``, and only those
    (``[N, H] + [V, H]``) are kept for backward. The matmul runs once per chunk. Offline
    ``ignore`` is the exception that proves the rule: its divergence lives on ``[c, K]``, small
    enough for plain autograd.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        head: Tensor,
        rows: Tensor,
        targets: Tensor,
        teacher: OnlineTeacher | OfflineTeacher | None,
        opts: LogitLossOptions,
        compared: int,
        count: int,
        want_grads: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dtype = _wide(head).dtype
        grad_hidden = torch.zeros_like(hidden) if want_grads and ctx.needs_input_grad[0] else None
        grad_head = (
            torch.zeros(head.shape, dtype=dtype, device=head.device)
            if want_grads and ctx.needs_input_grad[1]
            else None
        )
        denominator = max(count, 1)
        coefs = (opts.response_weight / denominator, opts.kd_weight / denominator)
        work = _Workspace(
            min(opts.chunk_size, rows.numel()), opts, head.shape[0], compared, dtype, head.device
        )
        response_sum = torch.zeros((), dtype=dtype, device=hidden.device)
        kd_sum = torch.zeros_like(response_sum)
        for start in range(0, rows.numel(), opts.chunk_size):
            idx = rows[start : start + opts.chunk_size]
            h = hidden.index_select(0, idx).to(head.dtype)
            response, kd, grad = _chunk(
                h,
                head,
                targets.index_select(0, idx),
                teacher,
                idx,
                work,
                coefs if want_grads else None,
            )
            response_sum += response
            kd_sum += kd
            if grad is not None:
                # The two matmuls run in the head's dtype (bf16 on GPU: tensor cores); the head's
                # gradient accumulates over chunks in float32 at least.
                g = grad.to(head.dtype)
                if grad_hidden is not None:
                    grad_hidden.index_copy_(0, idx, (g @ head).to(hidden.dtype))
                if grad_head is not None and grad_head.dtype == g.dtype:
                    grad_head.addmm_(g.T, h)
                elif grad_head is not None:
                    grad_head.add_(g.T @ h)
                del g, grad
        del work
        response_mean = response_sum / denominator
        kd_mean = kd_sum / denominator
        loss = opts.response_weight * response_mean + opts.kd_weight * kd_mean
        ctx.grads = (grad_hidden, grad_head)
        ctx.head_dtype = head.dtype
        ctx.mark_non_differentiable(response_mean, kd_mean)
        return loss, response_mean, kd_mean

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_logit_losses computes its gradients once: backward can run only once "
                "(retain_graph is not supported)"
            )
        grad_hidden, grad_head = ctx.grads
        ctx.grads = None  # we own the tensors now: scale in place, let autograd take them
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_head is not None:
            grad_head = grad_head.mul_(grad_loss.to(grad_head.dtype)).to(ctx.head_dtype)
        return grad_hidden, grad_head, None, None, None, None, None, None, None


def _compared_vocab(
    student_hidden: Tensor,
    student_head: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    teacher: OnlineTeacher | OfflineTeacher | None,
    compare_vocab: int | None,
) -> int:
    """Check the logit losses' tensors against each other; how many ids the KD loss compares."""
    _check_rows(mask, student_hidden=student_hidden, target_ids=target_ids)
    if student_head.dim() != 2 or student_head.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"student_head {list(student_head.shape)} must be [V, H] with H = "
            f"{student_hidden.shape[-1]} (the hidden states' last dimension)"
        )
    rows = student_head.shape[0]
    if isinstance(teacher, OnlineTeacher):
        _check_rows(mask, **{"teacher.hidden": teacher.hidden})
        if teacher.head.dim() != 2 or teacher.head.shape[1] != teacher.hidden.shape[-1]:
            raise ValueError(
                f"teacher.head {list(teacher.head.shape)} must be [V, Ht] with Ht = "
                f"{teacher.hidden.shape[-1]}"
            )
        rows = min(rows, teacher.head.shape[0])
    elif isinstance(teacher, OfflineTeacher):
        _check_rows(mask, **{"teacher.topk_ids": teacher.topk_ids})
        if teacher.topk_ids.shape != teacher.topk_logprobs.shape:
            raise ValueError(
                f"topk_ids {list(teacher.topk_ids.shape)} and topk_logprobs "
                f"{list(teacher.topk_logprobs.shape)} must have the same shape [N, K]"
            )
        if teacher.vocab_size is not None:
            rows = min(rows, teacher.vocab_size)
    if compare_vocab is None:
        return int(rows)
    if not 1 <= compare_vocab <= rows:
        raise ValueError(f"compare_vocab is {compare_vocab}; it must be between 1 and {rows}")
    return compare_vocab


def chunked_logit_losses(
    student_hidden: Tensor,
    student_head: Tensor,
    *,
    target_ids: Tensor,
    mask: Tensor,
    teacher: OnlineTeacher | OfflineTeacher | None,
    options: LogitLossOptions,
) -> dict[str, Tensor]:
    """Response and logit distillation without ever holding the ``[N, V]`` logits.

    student_hidden [N, H] (the student's last hidden states, after the final norm),
    student_head [V, H] (its ``lm_head.weight``), target_ids [N], mask [N], teacher: the live
    teacher, its stored top-k, or None (response only); ``options``: the weights, divergence and
    chunk size (:class:`LogitLossOptions`).

    Returns ``{"response", "logits", "loss"}``: the response cross-entropy (over the student's
    full head) and the KD loss (``T**2 * divergence``), each a mean over all masked tokens of the
    batch (normalised by the total count, not per chunk), and ``loss = response_weight *
    response + kd_weight * logits``. Only ``loss`` carries the gradient (w.r.t. student_hidden
    and student_head); ``response`` and ``logits`` are detached values for the report.

    Only the masked positions are computed, ``options.chunk_size`` at a time (see
    :class:`_ChunkedLogitLoss`). Output layers padded past the tokenizer: the KD loss compares the
    first ``options.compare_vocab`` ids, by default ``min(student rows, teacher rows)`` (see
    :func:`shared_vocab_size`); both softmaxes are over those ids only, so padding rows get no KD
    gradient. Values and gradients equal :func:`full_logit_losses` (tested).
    """
    compared = _compared_vocab(
        student_hidden, student_head, target_ids, mask, teacher, options.compare_vocab
    )
    rows = mask.nonzero().squeeze(1)
    if isinstance(teacher, OfflineTeacher):
        _check_topk_ids(teacher.topk_ids.index_select(0, rows), compared)
    want_grads = torch.is_grad_enabled() and (
        student_hidden.requires_grad or student_head.requires_grad
    )
    loss, response, kd = _ChunkedLogitLoss.apply(
        student_hidden,
        student_head,
        rows,
        target_ids,
        teacher,
        options,
        compared,
        rows.numel(),
        want_grads,
    )
    return {"response": response, "logits": kd, "loss": loss}


def full_logit_losses(
    student_hidden: Tensor,
    student_head: Tensor,
    *,
    target_ids: Tensor,
    mask: Tensor,
    teacher: OnlineTeacher | OfflineTeacher | None,
    options: LogitLossOptions,
) -> dict[str, Tensor]:
    """The plain reference for :func:`chunked_logit_losses`: materialise the ``[N, V]`` logits,
    then call :func:`response_loss` and :func:`kd_divergence` / :func:`offline_kd`.

    Same arguments and results (here every entry carries its gradient; ``options.chunk_size``
    is not used). For tests and the benchmark; training should use the chunked version.
    """
    compared = _compared_vocab(
        student_hidden, student_head, target_ids, mask, teacher, options.compare_vocab
    )
    logits = student_hidden @ student_head.T
    response = response_loss(logits, target_ids, mask)
    student = logits[:, :compared]
    if isinstance(teacher, OnlineTeacher):
        with torch.no_grad():
            teacher_logits = teacher.hidden @ teacher.head[:compared].T
        kd = kd_divergence(
            student,
            teacher_logits,
            mask,
            divergence=options.divergence,
            beta=options.beta,
            temperature=options.temperature,
        )
    elif isinstance(teacher, OfflineTeacher):
        kd = offline_kd(
            student,
            teacher.topk_ids,
            teacher.topk_logprobs,
            mask,
            divergence=options.divergence,
            beta=options.beta,
            temperature=options.temperature,
            missing_mass=options.missing_mass,
            sparsity=options.sparsity,
        )
    else:
        kd = torch.zeros_like(response)
    loss = options.response_weight * response + options.kd_weight * kd
    return {"response": response, "logits": kd, "loss": loss}


# --------------------------------------------------------------------------------------------
# Putting the parts together
# --------------------------------------------------------------------------------------------


def combine(
    parts: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of loss parts, and a report of every part (and the total) as floats.

    Every weight needs its part; parts without a weight are reported but not summed (e.g. the
    detached ``response``/``logits`` values of :func:`chunked_logit_losses`). The report's
    ``"loss"`` is the total (it replaces a part of that name).
    """
    if not weights:
        raise ValueError("weights is empty: give a weight for at least one loss part")
    missing = sorted(set(weights) - set(parts))
    if missing:
        raise ValueError(f"weights name parts {missing} that are not given; parts: {sorted(parts)}")
    terms = [float(w) * parts[name] for name, w in weights.items()]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    report = {name: float(value.detach()) for name, value in parts.items()}
    report["loss"] = float(total.detach())
    return total, report
