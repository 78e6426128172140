"""Self-distillation losses (pure torch: no Ray, no model code).

Conventions: every tensor is batch-first. ``B`` sequences, ``T`` response positions (response
token ``t`` is predicted at position ``t``), ``V`` vocabulary entries, ``k`` top-k entries.
The student is ``pi_theta(.|x)``, the teacher ``pi(.|x, c)`` (EMA weights, demonstration in the
prompt). ``alpha`` follows GKD: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher),
in between the generalized JSD of TRL's ``generalized_jsd_loss``.

Computation happens in float32, or in float64 when the student logits are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Estimator = Literal["full", "topk", "sampled"]
Aggregation = Literal["sequence_mean", "token_mean"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
#: Valid names per ``LossSpec`` field, for config-schema validation.
VALID_NAMES: dict[str, tuple[str, ...]] = {"estimator": ESTIMATORS, "aggregation": AGGREGATIONS}


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kl(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p||q) summed over the last dim; entries with p == 0 contribute 0 (value and gradient)."""
    support = p_logp > -math.inf
    p_safe = torch.where(support, p_logp, torch.zeros_like(p_logp))
    q_safe = torch.where(support, q_logp, torch.zeros_like(q_logp))
    terms = torch.where(support, p_safe.exp() * (p_safe - q_safe), torch.zeros_like(p_safe))
    return terms.sum(-1)


def divergence_from_logprobs(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Per-position divergence between two normalized log-prob vectors.

    Args:
        student_logp, teacher_logp: ``[..., C]`` log-probabilities over the same ``C`` categories
            (``-inf`` allowed for zero probability).
        alpha: 0 -> KL(teacher||student), 1 -> KL(student||teacher), otherwise generalized JSD
            ``alpha * KL(teacher||m) + (1 - alpha) * KL(student||m)`` with
            ``m = (1 - alpha) * student + alpha * teacher``.
    Returns:
        ``[...]`` divergence (summed over the last dim). Zero-probability entries never produce NaN
        in the value or the gradient; the value is ``+inf`` only where the KL is truly infinite
        (e.g. forward KL with student probability 0 where the teacher has mass).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(f"student_logp {tuple(student_logp.shape)} and teacher_logp "
                         f"{tuple(teacher_logp.shape)} must have the same shape")
    if alpha == 0.0:
        return _kl(teacher_logp, student_logp)
    if alpha == 1.0:
        return _kl(student_logp, teacher_logp)
    # Mixture in log space; positions where both are -inf are kept out of logaddexp (NaN grads).
    both_zero = (student_logp == -math.inf) & (teacher_logp == -math.inf)
    zero = torch.zeros_like(student_logp)
    mix = torch.logaddexp(torch.where(both_zero, zero, student_logp) + math.log1p(-alpha),
                          torch.where(both_zero, zero, teacher_logp) + math.log(alpha))
    mix = torch.where(both_zero, torch.full_like(mix, -math.inf), mix)
    return alpha * _kl(teacher_logp, mix) + (1.0 - alpha) * _kl(student_logp, mix)


class _ForwardKLFromLogits(torch.autograd.Function):
    """``KL(p || softmax(z))`` per position with a hand-written backward: the gradient with respect
    to the logits is ``softmax(z) * sum(p) - p``, so nothing of the vocabulary-sized intermediate
    graph is stored (the generic path keeps several ``[B, T, V]`` tensors for autograd). The
    teacher ``p`` (given as log-probs, ``-inf`` allowed) is a constant; logits must be finite."""

    @staticmethod
    def forward(ctx, logits: Tensor, teacher_logp: Tensor) -> Tensor:  # noqa: D102
        student_logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        p = teacher_logp.exp()
        # 0 * (finite - x) = 0 where the teacher has no mass: no NaN from -inf - x.
        floor = torch.finfo(teacher_logp.dtype).min
        value = (p * (teacher_logp.clamp(min=floor) - student_logp)).sum(-1)
        ctx.save_for_backward(student_logp, teacher_logp)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        student_logp, teacher_logp = ctx.saved_tensors
        p = teacher_logp.exp()
        return grad.unsqueeze(-1) * (student_logp.exp() * p.sum(-1, keepdim=True) - p), None


def forward_kl_from_logits(student_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """``[B, T]`` ``KL(teacher || student)`` over the full vocabulary from the student's raw logits
    (the published SDFT loss): fused when the logits are finite, else the generic
    :func:`divergence_from_logprobs` (which handles ``-inf`` logits). Same value and gradient."""
    dtype = _compute_dtype(student_logits)
    logits, teacher = student_logits.to(dtype), teacher_logprobs.to(dtype).detach()
    if not bool(torch.isfinite(logits).all()):
        return divergence_from_logprobs(logits.log_softmax(-1), teacher, 0.0)
    return _ForwardKLFromLogits.apply(logits, teacher)


def full_vocab_divergence(student_logits: Tensor, teacher_logprobs: Tensor, alpha: float) -> Tensor:
    """Divergence over the full vocabulary.

    Args:
        student_logits: ``[B, T, V]`` raw logits (log-softmaxed here in fp32/fp64).
        teacher_logprobs: ``[B, T, V]`` normalized teacher log-probs (constants: no gradient).
    Returns:
        ``[B, T]`` per-position divergence.
    """
    if alpha == 0.0:
        return forward_kl_from_logits(student_logits, teacher_logprobs)
    dtype = _compute_dtype(student_logits)
    student_logp = student_logits.to(dtype).log_softmax(-1)
    return divergence_from_logprobs(student_logp, teacher_logprobs.to(dtype), alpha)


def _log1mexp(x: Tensor) -> Tensor:
    """Stable ``log(1 - exp(x))`` for ``x <= 0``; ``x`` is clamped just below 0 so that a mass
    that rounds to >= 1 yields a tiny (finite) log-probability instead of NaN/-inf."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_tail(topk_logp: Tensor) -> Tensor:
    """``[..., k]`` -> ``[..., k+1]``: append the remaining mass ``log(1 - sum(exp(topk)))``."""
    tail = _log1mexp(torch.logsumexp(topk_logp, dim=-1, keepdim=True))
    return torch.cat([topk_logp, tail], dim=-1)


def topk_divergence(student_logits: Tensor, topk_ids: Tensor, teacher_topk_logprobs: Tensor,
                    alpha: float, tail_bucket: bool) -> Tensor:
    """Divergence restricted to ``k`` vocabulary ids per position.

    Args:
        student_logits: ``[B, T, V]`` raw logits.
        topk_ids: ``[B, T, k]`` long ids (student's or teacher's top-k, assumed distinct).
        teacher_topk_logprobs: ``[B, T, k]`` teacher log-probs at ``topk_ids``, normalized over
            the full vocabulary.
        tail_bucket: True -> add a ``k+1``-th category holding the remaining mass of each
            distribution; False -> renormalize both distributions over the ``k`` ids.
    Returns:
        ``[B, T]`` per-position divergence.
    """
    dtype = _compute_dtype(student_logits)
    return _topk_divergence_from_logp(student_logits.to(dtype).log_softmax(-1), topk_ids,
                                      teacher_topk_logprobs.to(dtype), alpha, tail_bucket)


def _topk_divergence_from_logp(student_logp: Tensor, topk_ids: Tensor, teacher_topk_logp: Tensor,
                               alpha: float, tail_bucket: bool) -> Tensor:
    s, t = student_logp.gather(-1, topk_ids), teacher_topk_logp
    if tail_bucket:
        s, t = _with_tail(s), _with_tail(t)
    else:
        s, t = s.log_softmax(-1), t.log_softmax(-1)
    return divergence_from_logprobs(s, t, alpha)


def implicit_reward(student_token_logp: Tensor, teacher_token_logp: Tensor) -> Tensor:
    """``[B, T]`` detached implicit reward ``log pi(y|x,c) - log pi(y|x)``."""
    return (teacher_token_logp - student_token_logp).detach()


def sampled_token_loss(student_token_logp: Tensor, teacher_token_logp: Tensor) -> Tensor:
    """``[B, T]`` reverse-KL policy-gradient surrogate on the sampled tokens.

    ``-(teacher - student).detach() * student``: its gradient w.r.t. ``student_token_logp`` is
    ``student - teacher``, i.e. REINFORCE with the implicit reward as (negative) advantage, whose
    expectation over ``y ~ pi_theta`` is the gradient of KL(student||teacher).
    """
    return -implicit_reward(student_token_logp, teacher_token_logp) * student_token_logp


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """``[B, T, V]`` logits, ``[B, T]`` ids -> ``[B, T]`` log-probs (fp32, fp64 for fp64 input).

    Computed as ``logit[y] - logsumexp(logits)``: no normalized ``[B, T, V]`` log-prob tensor is
    kept for backward (only the fp32 copy of the logits when the input is lower precision).
    """
    x = logits.to(_compute_dtype(logits))
    return x.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


def response_loss_mask(response_mask: Tensor, skip_first: int) -> Tensor:
    """``[B, T]`` bool: ``response_mask`` (left-aligned, right padded) minus the first
    ``skip_first`` response positions of every sequence."""
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}")
    positions = torch.arange(response_mask.shape[-1], device=response_mask.device)
    return response_mask.bool() & (positions >= skip_first)


def aggregate(per_token: Tensor, mask: Tensor, mode: Aggregation,
              seq_weights: Tensor | None = None, position_weights: Tensor | None = None) -> Tensor:
    """Reduce ``[B, T]`` per-token values under a ``[B, T]`` mask to a scalar.

    ``sequence_mean``: mean over each sequence's valid tokens, then mean of ``w_i * seq_mean_i``
    over sequences with >= 1 valid token. ``token_mean``: ``sum(w_i * x_it) / #valid tokens``.
    ``seq_weights`` (``[B]``, detached) default to 1. ``position_weights`` (``[B, T]``, >= 0,
    detached) turn both means into weighted means over positions: a sequence's mean is
    ``sum_t v_t x_t / sum_t v_t`` (0 when its weights are all 0; it still counts as a sequence), and
    ``token_mean`` divides by the total weight instead of the token count. Returns 0 (still
    attached to ``per_token``) when no token is valid. Masked entries never leak (not even inf/NaN).
    """
    mask = mask.bool()
    values = torch.where(mask, per_token, torch.zeros_like(per_token))
    if seq_weights is not None:
        values = values * seq_weights.detach().to(values.dtype).unsqueeze(-1)
    counts = mask.sum(-1).to(values.dtype)
    if position_weights is not None:
        weights = torch.where(mask, position_weights.detach().to(values.dtype), 0.0)
        values, counts = values * weights, weights.sum(-1)
    if mode == "token_mean":
        total = counts.sum()
        return values.sum() / torch.where(total > 0, total, torch.ones_like(total))
    if mode == "sequence_mean":
        seq_means = values.sum(-1) / torch.where(counts > 0, counts, torch.ones_like(counts))
        return seq_means.sum() / mask.any(-1).sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


def shift_position_weights(shift: Tensor, floor: float) -> Tensor:
    """``[B, T]`` position weights from the teacher's demonstration shift (nats, >= 0): ``shift +
    floor``. Positions where the demonstration does not move the teacher (framing, formatting that
    any demonstration causes) get ~``floor``; a large floor approaches uniform weights."""
    if floor < 0:
        raise ValueError(f"loss.shift_floor must be >= 0, got {floor}")
    return shift.detach().clamp(min=0.0) + floor


@torch.no_grad()
def importance_weights(train_token_logp: Tensor, rollout_token_logp: Tensor, mask: Tensor,
                       clip: float) -> Tensor:
    """``[B]`` detached per-sequence mean over valid tokens of ``min(exp(train - rollout), clip)``
    (correction for the rollout/learner log-prob mismatch); 1 for sequences without valid tokens."""
    if clip <= 0:
        raise ValueError(f"importance-weight clip must be > 0, got {clip}")
    mask = mask.bool()
    dtype = _compute_dtype(train_token_logp)
    log_ratio = torch.where(mask, train_token_logp.to(dtype) - rollout_token_logp.to(dtype), 0.0)
    ratio = torch.where(mask, log_ratio.exp().clamp(max=clip), 0.0)
    counts = mask.sum(-1)
    return torch.where(counts > 0, ratio.sum(-1) / counts.clamp(min=1), 1.0)


def sft_loss(logits: Tensor, response_ids: Tensor, response_mask: Tensor,
             aggregation: Aggregation = "sequence_mean") -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the demonstration tokens (the SFT baseline), same aggregation."""
    nll = -token_logprobs(logits, response_ids)
    mask = response_mask.bool()
    loss = aggregate(nll, mask, aggregation)
    with torch.no_grad():
        nll_sum = float(torch.where(mask, nll.detach(), 0.0).sum())
    return loss, {"loss": float(loss.detach()), "nll_sum": nll_sum, "loss_tokens": float(mask.sum())}


@dataclass(frozen=True)
class LossSpec:
    alpha: float = 0.0               # 0 forward KL, 1 reverse KL, between: generalized JSD
    estimator: Estimator = "full"
    tail_bucket: bool = True         # topk only
    skip_first_tokens: int = 3
    aggregation: Aggregation = "sequence_mean"
    is_clip: float | None = None     # None disables the importance correction
    position_weights: str = "uniform"  # or "demonstration_shift" (TeacherSignal.demonstration_shift)
    shift_floor: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"loss.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation must be one of {AGGREGATIONS}, "
                             f"got {self.aggregation!r}")
        if self.estimator == "sampled" and self.alpha != 1.0:
            raise ValueError(f"loss.estimator='sampled' is the reverse-KL estimator and requires "
                             f"loss.alpha == 1.0, got loss.alpha={self.alpha}")
        if self.skip_first_tokens < 0:
            raise ValueError(f"loss.skip_first_tokens must be >= 0, got {self.skip_first_tokens}")
        if self.is_clip is not None and self.is_clip <= 0:
            raise ValueError(f"loss.is_clip must be > 0 or None, got {self.is_clip}")
        if self.position_weights not in ("uniform", "demonstration_shift"):
            raise ValueError(f"loss.position_weights must be 'uniform' or 'demonstration_shift', "
                             f"got {self.position_weights!r}")


@dataclass(frozen=True)
class TeacherSignal:
    """Teacher scores for the student's response, exactly one of: ``full_logprobs`` ``[B,T,V]``;
    (``topk_ids`` ``[B,T,k]`` long, ``topk_logprobs`` ``[B,T,k]``); ``token_logprobs`` ``[B,T]``.
    All are teacher log-probs normalized over the full vocabulary."""
    full_logprobs: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    token_logprobs: Tensor | None = None
    demonstration_shift: Tensor | None = None  # [B, T] KL(teacher with c || teacher with another c)

    def __post_init__(self) -> None:
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("TeacherSignal: topk_ids and topk_logprobs must be given together")
        given = [self.full_logprobs is not None, self.topk_ids is not None,
                 self.token_logprobs is not None]
        if sum(given) != 1:
            raise ValueError("TeacherSignal must hold exactly one of full_logprobs, "
                             "(topk_ids, topk_logprobs) or token_logprobs")

    @property
    def kind(self) -> Estimator:
        """The estimator this signal supports: ``"full"``, ``"topk"`` or ``"sampled"``."""
        if self.full_logprobs is not None:
            return "full"
        return "topk" if self.topk_ids is not None else "sampled"


def _check_shape(name: str, t: Tensor, expected: tuple[int, ...], ref: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected} ({ref})")


def distillation_loss(spec: LossSpec, student_logits: Tensor, response_ids: Tensor,
                      response_mask: Tensor, teacher: TeacherSignal,
                      rollout_logprobs: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """SDFT loss for one micro-batch.

    Args:
        student_logits: ``[B, T, V]`` student logits at the response positions.
        response_ids: ``[B, T]`` long, the sampled response tokens.
        response_mask: ``[B, T]`` bool, True on real (non-padding) response tokens.
        teacher: teacher signal matching ``spec.estimator`` (treated as constant).
        rollout_logprobs: ``[B, T]`` behaviour-policy log-probs of ``response_ids``; required
            when ``spec.is_clip`` is set.
    Returns:
        ``(loss, metrics)``: scalar loss with grad to ``student_logits``; metrics are python floats,
        sums with their counts so that micro-batches and ranks combine exactly (divide once, at the
        end): ``loss`` (this micro-batch's aggregated loss), ``divergence_sum`` over the
        ``loss_tokens`` positions in the loss, ``reward_sum`` (implicit reward) over the
        ``reward_tokens`` positions where the teacher's log-prob of the sampled token is known, and
        with the importance correction ``is_weight_sum`` over ``is_weight_sequences``.
    """
    if teacher.kind != spec.estimator:
        raise ValueError(f"loss.estimator={spec.estimator!r} but the teacher signal holds "
                         f"{teacher.kind!r} data")
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got {tuple(student_logits.shape)}")
    B, T, V = student_logits.shape
    ref = f"student_logits is {(B, T, V)}"
    _check_shape("response_ids", response_ids, (B, T), ref)
    _check_shape("response_mask", response_mask, (B, T), ref)
    if rollout_logprobs is not None:
        _check_shape("rollout_logprobs", rollout_logprobs, (B, T), ref)
    elif spec.is_clip is not None:
        raise ValueError("loss.is_clip is set but rollout_logprobs were not given")

    dtype = _compute_dtype(student_logits)
    mask = response_loss_mask(response_mask, spec.skip_first_tokens)
    tok_valid = mask  # where teacher_tok (teacher log-prob of the sampled token) is known
    if spec.estimator == "sampled":
        assert teacher.token_logprobs is not None
        _check_shape("teacher.token_logprobs", teacher.token_logprobs, (B, T), ref)
        student_tok = token_logprobs(student_logits, response_ids)
        teacher_tok = teacher.token_logprobs.detach().to(dtype)
        per_token = sampled_token_loss(student_tok, teacher_tok)
        divergence = (student_tok - teacher_tok).detach()
    else:
        if spec.estimator == "full":
            assert teacher.full_logprobs is not None
            _check_shape("teacher.full_logprobs", teacher.full_logprobs, (B, T, V), ref)
            teacher_logp = teacher.full_logprobs.detach().to(dtype)
            with torch.no_grad():  # only for metrics and importance weights
                student_tok = token_logprobs(student_logits, response_ids)
            per_token = full_vocab_divergence(student_logits, teacher_logp, spec.alpha)
            teacher_tok = teacher_logp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        else:
            student_logp = student_logits.to(dtype).log_softmax(-1)
            student_tok = student_logp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
            assert teacher.topk_ids is not None and teacher.topk_logprobs is not None
            k = teacher.topk_ids.shape[-1]
            _check_shape("teacher.topk_ids", teacher.topk_ids, (B, T, k), ref)
            _check_shape("teacher.topk_logprobs", teacher.topk_logprobs, (B, T, k), ref)
            ids, teacher_topk = teacher.topk_ids.long(), teacher.topk_logprobs.detach().to(dtype)
            per_token = _topk_divergence_from_logp(student_logp, ids, teacher_topk, spec.alpha,
                                                   spec.tail_bucket)
            hit = ids == response_ids.unsqueeze(-1)
            teacher_tok = teacher_topk.gather(-1, hit.int().argmax(-1, keepdim=True)).squeeze(-1)
            tok_valid = mask & hit.any(-1)
        divergence = per_token.detach()

    weights = None
    if spec.is_clip is not None:
        assert rollout_logprobs is not None
        weights = importance_weights(student_tok.detach(), rollout_logprobs, mask, spec.is_clip)
    positions = None
    if spec.position_weights == "demonstration_shift":
        if teacher.demonstration_shift is None:
            raise ValueError("loss.position_weights 'demonstration_shift' but the teacher sent no demonstration shift")
        _check_shape("teacher.demonstration_shift", teacher.demonstration_shift, (B, T), ref)
        positions = shift_position_weights(teacher.demonstration_shift.to(dtype), spec.shift_floor)
    loss = aggregate(per_token, mask, spec.aggregation, weights, positions)

    with torch.no_grad():
        reward = torch.where(tok_valid, teacher_tok - student_tok.detach(), 0.0)
        metrics = {"loss": float(loss.detach()),
                   "divergence_sum": float(torch.where(mask, divergence, 0.0).sum()),
                   "loss_tokens": float(mask.sum()),
                   "reward_sum": float(reward.sum()), "reward_tokens": float(tok_valid.sum())}
        if weights is not None:
            used = weights[mask.any(-1)]  # sequences that contribute to the loss
            metrics["is_weight_sum"] = float(used.sum())
            metrics["is_weight_sequences"] = float(used.numel())
        if teacher.demonstration_shift is not None:
            metrics["shift_sum"] = float(torch.where(mask, teacher.demonstration_shift.to(dtype), 0.0).sum())
        if positions is not None:
            metrics["position_weight_sum"] = float(torch.where(mask, positions, 0.0).sum())
    return loss, metrics
