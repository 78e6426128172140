"""Teacher scoring: the teacher's log-probs on the student's own tokens, without a ``[B, T, V]``
fp32 log-softmax.

The model's logits for a micro-batch (``[B, T, V]`` in the model's dtype, from
:func:`sdft_ray.forward.response_logits`) are the only vocabulary-sized tensor that spans every
position. Everything else is computed over chunks of positions (:func:`position_chunks`, at
most ``CHUNK_ELEMENTS`` fp32 entries each) as ``logit - logsumexp(logits)``
(:func:`logprob_stats`): the sampled-token log-probs, the top-k and the log-probs at given ids
are gathered per chunk, and the full-vocabulary payload is written chunk by chunk straight into
its transfer dtype. At 16 x 512 positions and a 152k vocabulary a full fp32 log-softmax is 5 GB
(10 GB with the ``.float()`` copy of bf16 logits); a chunk is 128 MB.

The rollout engine (:mod:`sdft_ray.engines.hf`) uses :func:`logprob_stats` on each generation
step's ``[B, V]`` logits, so both roles compute log-probs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sdft_ray.forward import micro_batches, pad_right, response_logits
from sdft_ray.trajectory import SignalKind, TeacherScores, Trajectories

#: What a teacher can send, and the ``TeacherScores.kind`` each one fills.
SIGNAL_KINDS: dict[str, SignalKind] = {"full": "full", "topk_teacher": "topk", "topk_student": "topk",
                                       "sampled": "sampled"}

#: fp32 entries of one chunk of positions (128 MiB): bounds the scoring's working memory.
CHUNK_ELEMENTS = 32 * 2**20


@dataclass
class LogprobStats:
    """Log-probs read off raw logits ``[..., V]`` (normalised over the whole vocabulary)."""

    token: Tensor | None = None  # [...] log-prob of the given token ids
    topk_ids: Tensor | None = None  # [..., k] the k most probable ids, best first
    topk: Tensor | None = None  # [..., k] their log-probs
    at_ids: Tensor | None = None  # [..., k] log-probs at given ids
    normalised: Tensor | None = None  # [..., V] fp32 log-probs over the whole vocabulary


def logprob_stats(logits: Tensor, token_ids: Tensor | None = None, top_k: int = 0,
                  at_ids: Tensor | None = None, normalised: bool = False) -> LogprobStats:
    """Log-probs from raw logits ``[..., V]`` (any float dtype), computed in fp32 as
    ``logit - logsumexp(logits)``: unless ``normalised`` is asked for, no normalised ``[..., V]``
    tensor is built, only the fp32 copy of ``logits`` (none when they are fp32 already) and
    ``logsumexp``'s temporaries. Call it on a chunk of positions to bound the memory.

    ``token_ids`` ``[...]``: log-prob of each; ``top_k``: the ``k`` best ids and their log-probs;
    ``at_ids`` ``[..., k]``: log-probs at those ids; ``normalised``: all ``V`` log-probs.
    """
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    out = LogprobStats()
    if token_ids is not None:
        out.token = (x.gather(-1, token_ids.unsqueeze(-1)) - lse).squeeze(-1)
    if top_k:
        top = x.topk(top_k, dim=-1)
        out.topk_ids, out.topk = top.indices, top.values - lse
    if at_ids is not None:
        out.at_ids = x.gather(-1, at_ids) - lse
    if normalised:
        out.normalised = x - lse
    return out


def position_chunks(batch: int, width: int, vocab: int, max_elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Slices over ``width`` positions so that ``batch x chunk x vocab`` stays within ``max_elements``
    (at least one position per chunk)."""
    step = max(1, max_elements // max(1, batch * vocab))
    return [slice(start, min(start + step, width)) for start in range(0, width, step)]


def to_transfer_numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A CPU tensor as numpy in the transfer dtype; numpy has no bfloat16, so 16-bit dtypes travel
    as their raw int16 bit pattern (``TeacherScores.as_float`` views them back)."""
    if dtype == torch.float32:
        return t.to(torch.float32).numpy()
    return t.to(dtype).view(torch.int16).numpy()


def kl_by_position(logits: Tensor, other_logits: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``[B, T]`` ``KL(softmax(logits) || softmax(other_logits))`` per position, in fp32, computed over
    chunks of positions (no ``[B, T, V]`` fp32 tensor)."""
    batch, width, vocab = logits.shape
    out = torch.empty((batch, width), dtype=torch.float32, device=logits.device)
    for cols in position_chunks(batch, width, vocab, chunk_elements):
        p = logits[:, cols].float().log_softmax(-1)
        q = other_logits[:, cols].float().log_softmax(-1)
        out[:, cols] = (p.exp() * (p - q)).sum(-1)
    return out


def score_trajectories(model, traj: Trajectories, pad_id: int, signal: str, top_k: int,
                       micro_batch_size: int, transfer_dtype: torch.dtype, version: int,
                       chunk_elements: int = CHUNK_ELEMENTS, demonstration_shift: bool = False) -> TeacherScores:
    """Run the teacher on ``teacher_prompt + response`` and keep what the loss needs.

    ``signal``: "full" (log-probs over the vocabulary, sent in ``transfer_dtype``), "topk_teacher"
    (the teacher's own top-k), "topk_student" (log-probs at the rollout's top-k ids) or "sampled"
    (sampled token). Sampled-token log-probs are always returned (for the implicit reward metric).
    Working memory beyond the model's own ``[B, T, V]`` logits is one chunk of positions
    (``chunk_elements`` fp32 entries) plus, for "full", the payload itself.

    ``demonstration_shift``: also score every response with ``traj.contrast_prompt_ids`` (the same
    query with another example's demonstration) and return, per position, how far this example's
    demonstration moves the teacher: ``KL(teacher(.|x, c) || teacher(.|x, c_other))``. Framing that
    any demonstration causes scores ~0; the positions where this demonstration's content matters
    score high (``loss.position_weights: demonstration_shift``).
    """
    if demonstration_shift and traj.contrast_prompt_ids is None:
        raise ValueError("the demonstration shift needs trajectories with contrast prompts "
                         "(loss.position_weights: demonstration_shift makes them)")
    if signal not in SIGNAL_KINDS:
        raise ValueError(f"teacher signal must be one of {sorted(SIGNAL_KINDS)}, got {signal!r}")
    if signal == "topk_student" and traj.rollout_topk_ids is None:
        raise ValueError("loss.topk_source 'student' needs the rollout's top-k ids")
    kind = SIGNAL_KINDS[signal]
    n = len(traj)
    out = TeacherScores(teacher_version=version, kind=kind, token_logprobs=[None] * n,
                        transfer_dtype=str(transfer_dtype).removeprefix("torch."))
    if kind == "full":
        out.full_logprobs = [None] * n
    if kind == "topk":
        out.topk_ids, out.topk_logprobs = [None] * n, [None] * n
    if demonstration_shift:
        out.demonstration_shift = [None] * n
    lengths = [len(p) + len(r) for p, r in zip(traj.teacher_prompt_ids, traj.response_ids)]
    with torch.no_grad():
        for rows in micro_batches(n, micro_batch_size, lengths):
            logits, ids, _ = response_logits(
                model, [traj.teacher_prompt_ids[r] for r in rows], [traj.response_ids[r] for r in rows], pad_id)
            batch, width, vocab = logits.shape
            steps = [len(traj.response_ids[r]) for r in rows]
            student_ids = None
            if signal == "topk_student":
                short = [r for r, t in zip(rows, steps) if len(traj.rollout_topk_ids[r]) < t]
                if short:
                    raise ValueError(f"rollout_topk_ids of row {short[0]} cover fewer positions than its response")
                student_ids = pad_right([traj.rollout_topk_ids[r][:t] for r, t in zip(rows, steps)], 0,
                                        torch.long, width).to(logits.device)
            full = [torch.empty((t, vocab), dtype=transfer_dtype) for t in steps] if kind == "full" else None
            parts: list[LogprobStats] = []
            for cols in position_chunks(batch, width, vocab, chunk_elements):
                chunk = logits[:, cols]
                stats = logprob_stats(chunk, ids[:, cols], top_k if signal == "topk_teacher" else 0,
                                      None if student_ids is None else student_ids[:, cols], full is not None)
                if full is not None:  # the payload, built chunk by chunk in its transfer dtype
                    normalised, stats.normalised = stats.normalised.to(transfer_dtype).cpu(), None
                    for j, t in enumerate(steps):
                        if cols.start < t:
                            full[j][cols.start:min(cols.stop, t)] = normalised[j, : min(cols.stop, t) - cols.start]
                parts.append(stats)
            shift = None
            if demonstration_shift:
                other, _, _ = response_logits(model, [traj.contrast_prompt_ids[r] for r in rows],
                                              [traj.response_ids[r] for r in rows], pad_id)
                shift = kl_by_position(logits, other, chunk_elements).cpu()
                del other
            token = torch.cat([p.token for p in parts], dim=1).cpu()  # one device->host copy per micro-batch
            if signal == "topk_teacher":
                top_ids = torch.cat([p.topk_ids for p in parts], dim=1).cpu()
                top_lp = torch.cat([p.topk for p in parts], dim=1).cpu()
            elif signal == "topk_student":
                top_ids, top_lp = student_ids.cpu(), torch.cat([p.at_ids for p in parts], dim=1).cpu()
            for j, (r, t) in enumerate(zip(rows, steps)):
                out.token_logprobs[r] = token[j, :t].numpy()
                if shift is not None:
                    out.demonstration_shift[r] = shift[j, :t].numpy()
                if full is not None:
                    out.full_logprobs[r] = to_transfer_numpy(full[j], transfer_dtype)
                elif kind == "topk":
                    out.topk_ids[r] = top_ids[j, :t].numpy()
                    out.topk_logprobs[r] = top_lp[j, :t].numpy()
    return out


def mix_scores(first: TeacherScores, second: TeacherScores, weight: float) -> TeacherScores:
    """The mixture ``weight * p_first + (1 - weight) * p_second`` of two teachers' distributions on
    the same rows, as log-probs: ``log(w e^a + (1 - w) e^b)`` per position (full vocabulary) and for
    the sampled tokens (exact: the mixture's probability of a token is the mix of theirs). For a loop
    that distils from two teacher groups (``sdft_ray.groups``, docs/variants.md)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {weight}")
    if first.kind != second.kind or first.kind == "topk" or len(first) != len(second):
        raise ValueError(f"mixing needs two full-vocabulary or two sampled-token scores of the same rows, got "
                         f"{first.kind} ({len(first)} rows) and {second.kind} ({len(second)} rows)")
    lw, lv = (np.log(weight) if weight > 0 else -np.inf), (np.log1p(-weight) if weight < 1 else -np.inf)

    def mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.logaddexp(lw + a.astype(np.float64), lv + b.astype(np.float64)).astype(np.float32)

    full = None
    if first.kind == "full":
        full = [mix(first.as_float(a), second.as_float(b)) for a, b in zip(first.full_logprobs, second.full_logprobs)]
    return TeacherScores(teacher_version=min(first.teacher_version, second.teacher_version), kind=first.kind,
                         full_logprobs=full,
                         token_logprobs=[mix(a, b) for a, b in zip(first.token_logprobs, second.token_logprobs)])
