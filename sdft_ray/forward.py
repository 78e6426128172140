"""Batched forward passes that return logits at the response positions only.

Teacher and learner both need "the distribution over the next token at every response
position, given a prompt". Prompts are left-padded so that every response starts at the
same column; position ids follow the attention mask, and the LM head runs only on the
last ``T + 1`` columns (``logits_to_keep``), so memory is O(B * T * V), not O(B * L * V).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_right(seqs: Sequence[np.ndarray], value, dtype=torch.long, width: int | None = None) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0) if width is None else width
    out = torch.full((len(seqs), width, *np.asarray(seqs[0]).shape[1:]) if seqs else (0, width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.tensor(np.asarray(s))
    return out


def response_mask(lengths: Sequence[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.as_tensor(list(lengths))[:, None]


def response_logits(
    model: torch.nn.Module,
    prompts: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits predicting each response token.

    Returns ``(logits [B, T, V], response_ids [B, T], mask [B, T])`` where ``T`` is the
    longest response, ``logits[b, t]`` is the model's next-token logits before
    ``responses[b][t]``, and ``mask`` marks real (non-padding) response tokens.
    """
    device = next(model.parameters()).device
    p_max = max(len(p) for p in prompts)
    t_max = max(max((len(r) for r in responses), default=0), 1)
    batch = len(prompts)
    input_ids = torch.full((batch, p_max + t_max), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, p_max + t_max), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        start = p_max - len(p)
        input_ids[b, start:p_max] = torch.tensor(np.asarray(p), dtype=torch.long)
        input_ids[b, p_max : p_max + len(r)] = torch.tensor(np.asarray(r), dtype=torch.long)
        attention[b, start : p_max + len(r)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=position_ids.to(device),
        logits_to_keep=t_max + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]  # column p_max-1+t predicts response token t
    ids = input_ids[:, p_max:].to(device)
    mask = response_mask([len(r) for r in responses], t_max).to(device)
    return logits, ids, mask


def micro_batches(n: int, size: int, lengths: Sequence[int] | None = None) -> list[Sequence[int]]:
    """Row indices in chunks of ``size``; with ``lengths``, longest first so that each chunk
    holds rows of similar length (less padding). Chunk sums are order-free, so losses agree."""
    order = list(range(n)) if lengths is None else sorted(range(n), key=lambda i: -lengths[i])
    return [order[i : i + size] for i in range(0, n, size)]
