"""How much probability a model gives a fact, not only whether its greedy answer contains it.

Greedy accuracy on a dozen fact questions moves in steps of 8 points and reads 0 % for a model
that has raised a fact from one chance in a million to one in ten. The log-likelihood of the
fact itself is the continuous measure beneath it: the question as the student's prompt, the
demonstration as its answer (teacher-forced), and the log-probability of the answer's tokens
inside it, summed (nats; ``-log p(answer | question, the demonstration's words before it)``).
Trained facts against control facts of other entities tell learning the fact apart from
learning the demonstrations' phrasing, which lowers both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FactProbe", "answer_token_logprobs", "answer_token_span"]


@dataclass(frozen=True)
class FactProbe:
    """One fact to score: the student prompt, the demonstration's token ids as the response and
    the ``[first, end)`` response positions of the answer's tokens."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    span: tuple[int, int]


def answer_token_span(tokenizer: Any, text: str, answer: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``text`` (no special tokens) and the ``[first, end)`` token positions that
    cover ``answer``'s last occurrence in it as a whole word (every token overlapping its
    characters; "Rome" is not found inside "Romeo").

    Needs a fast tokenizer (character offsets). Raises ``ValueError`` naming the answer and the
    text when the answer is not in the text."""
    found = list(re.finditer(rf"(?<!\w){re.escape(answer)}(?!\w)", text)) if answer else []
    if not found:
        raise ValueError(f"answer {answer!r} does not occur in {text!r} (as a whole word)")
    start = found[-1].start()
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("answer_token_span needs a fast tokenizer (character offsets)")
    end = start + len(answer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    covering = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return list(enc["input_ids"]), (covering[0], covering[-1] + 1)


def answer_token_logprobs(model: Any, probes: Sequence[FactProbe], pad_id: int, *,
                          batch_size: int = 8) -> list[list[float]]:
    """Per probe: the log-probability (nats) that ``model`` gives each of the answer's tokens,
    teacher-forced after the prompt and the response tokens before it; their sum is the
    log-probability of the whole answer.

    One forward pass per batch; the log-softmax runs only on the span positions ([b, span, V],
    float32), never on the whole response."""
    import torch

    from sdft_ray.forward import micro_batches, response_logits

    for i, p in enumerate(probes):
        if not 0 <= p.span[0] < p.span[1] <= len(p.response_ids):
            raise ValueError(f"probe {i}: span {p.span} is not within its {len(p.response_ids)} response tokens")
    out: dict[int, list[float]] = {}
    with torch.no_grad():
        for rows in micro_batches(len(probes), batch_size, [len(p.response_ids) for p in probes]):
            batch = [probes[i] for i in rows]
            logits, ids, _ = response_logits(model, [np.asarray(p.prompt_ids, dtype=np.int64) for p in batch],
                                             [np.asarray(p.response_ids, dtype=np.int64) for p in batch], pad_id)
            for j, p in enumerate(batch):
                cols = slice(*p.span)
                logp = logits[j, cols].float().log_softmax(-1)
                out[rows[j]] = logp.gather(-1, ids[j, cols, None]).squeeze(-1).double().tolist()
            del logits
    return [out[i] for i in range(len(probes))]
