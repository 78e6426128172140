"""Forgetting that framing and truncation cannot pass for.

Accuracy on prior questions drops when a fine-tuned model wraps its answers in new framing, or
writes so long that the answer is cut off, even when it still knows everything it knew. Three
measurements keep those apart:

(a) **Teacher-forced divergence on the base model's own answers** (:class:`ForgettingProbe`).
    The base model answers every prior prompt greedily, once (:func:`base_answers`, cached in a
    JSONL file). For any model, one teacher-forced forward pass per batch scores those fixed
    answers: per prompt, the mean over the answer's tokens of ``KL(base || model)`` over the
    full vocabulary, and the mean negative log-likelihood of the base answer under the model
    (:func:`answer_divergence`). No generation, so no length limit and no framing enters it.
    The base model's log-probs are recomputed batch by batch beside the model's (a second
    forward pass of the base model) rather than cached: full-vocabulary log-probs of every
    answer token would take ``tokens x V x 4`` bytes (about 1.5 GB for 240 short answers at a
    49k vocabulary), and a top-k cache would make the KL approximate.
(b) **Accuracy at a generous length, with the share that finishes**: the evaluation runner
    (:func:`sdft_ray.evaluation.evaluate_checkpoint`) with the task's ``max_new_tokens`` raised
    (the study uses >= 96); its rows carry ``finished_fraction`` per kind.
(c) **Answer-length drift** (:func:`length_drift`): mean response tokens of a model minus the
    base model's, per task and kind, from the same evaluation rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.evaluation.stats import mean_interval
from sdft_ray.evaluation.tasks import EvalTask

__all__ = [
    "BaseAnswer",
    "ForgettingProbe",
    "PromptDivergence",
    "answer_divergence",
    "base_answers",
    "divergence_summary",
    "length_drift",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseAnswer:
    """The base model's greedy answer to one prompt (token ids; ``finished``: it ended on a stop
    token within the length limit)."""

    index: int
    kind: str | None
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    finished: bool


@dataclass(frozen=True)
class PromptDivergence:
    """Teacher-forced scores of one base answer under a model: ``kl`` = mean over the answer's
    tokens of KL(base || model), ``nll`` = mean negative log-likelihood of the answer's tokens."""

    index: int
    kind: str | None
    tokens: int
    kl: float
    nll: float
    finished: bool


def _cache_key(model_folder: Path, task: EvalTask, max_new_tokens: int, dtype: str) -> dict[str, Any]:
    path = task.resolved_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    # the prompt file by content (not by path), so that a cache copied to another checkout stays valid
    return {"model": str(model_folder), "prompts": path.name, "prompts_sha256": digest,
            "prompt_column": task.prompt_column, "system_prompt": task.system_prompt,
            "max_new_tokens": int(max_new_tokens), "dtype": dtype}


def _read_answers(cache: Path) -> tuple[dict[str, Any] | None, list[BaseAnswer]]:
    lines = [json.loads(x) for x in cache.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not lines or "header" not in lines[0]:
        return None, []
    answers = [BaseAnswer(int(r["index"]), r.get("kind"), tuple(r["prompt_ids"]), tuple(r["answer_ids"]),
                          bool(r["finished"])) for r in lines[1:]]
    return lines[0]["header"], answers


def base_answers(model_folder: str | os.PathLike[str], task: EvalTask, cache: str | os.PathLike[str], *,
                 max_new_tokens: int = 96, batch_size: int = 16, dtype: str = "float32") -> list[BaseAnswer]:
    """The greedy answers of ``model_folder`` to every prompt of ``task``, generated once and
    cached in ``cache`` (JSONL: a header line with what the answers depend on - model, prompt
    file and its hash, length limit, dtype - then one row per prompt with ``prompt_ids``,
    ``answer_ids`` and ``finished``). A cache whose header matches is read back without loading
    the model; one that does not match is regenerated."""
    from sdft_ray.engines import SamplingSpec, make_engine
    from sdft_ray.evaluation.runner import resolve_checkpoint, task_prompts

    folder = resolve_checkpoint(model_folder)
    key = _cache_key(folder, task, max_new_tokens, dtype)
    cache = Path(cache)
    if cache.is_file():
        header, answers = _read_answers(cache)
        if header == key:
            return answers
        log.warning("%s: cached base answers were made with %s, not %s: regenerating", cache, header, key)
    engine = make_engine("hf", str(folder), dtype, False, batch_size, None)
    examples, prompts = task_prompts(task, engine.tokenizer)
    gens = engine.generate(prompts, SamplingSpec(max_new_tokens=max_new_tokens, seed=0, greedy=True))
    answers = [BaseAnswer(ex.index, str(ex.extra[task.kind_column]) if task.kind_column else None, tuple(p),
                          tuple(int(t) for t in g.token_ids), bool(g.finished))
               for ex, p, g in zip(examples, prompts, gens)]
    empty = [a.index for a in answers if not a.answer_ids]
    if empty:
        raise ValueError(f"{folder}: empty greedy answers to prompts {empty[:5]} of {task.resolved_path()}")
    lines = [json.dumps({"header": key})] + [json.dumps(asdict(a)) for a in answers]
    atomic_write_text(cache, "\n".join(lines) + "\n")
    return answers


def answer_divergence(model: Any, base_model: Any, answers: Sequence[BaseAnswer], pad_id: int, *,
                      batch_size: int = 8, position_chunk: int = 16) -> list[PromptDivergence]:
    """Per answer: mean over its tokens of KL(base || model) over the full vocabulary, and the
    mean NLL of its tokens under ``model``; one teacher-forced forward pass of each model per
    batch of ``batch_size`` answers (both models on the same device).

    Only the two models' logits at the answer positions are kept ([b, T, V] in the models'
    dtype); log-softmax and the KL run in float32 on ``position_chunk`` positions at a time, so
    no further vocabulary-sized buffer grows with the answer length."""
    import torch

    from sdft_ray.forward import micro_batches, response_logits
    from sdft_ray.losses import divergence_from_logprobs

    out: dict[int, PromptDivergence] = {}
    lengths = [len(a.answer_ids) for a in answers]
    with torch.no_grad():
        for rows in micro_batches(len(answers), batch_size, lengths):
            batch = [answers[i] for i in rows]
            prompts = [np.asarray(a.prompt_ids, dtype=np.int64) for a in batch]
            responses = [np.asarray(a.answer_ids, dtype=np.int64) for a in batch]
            base_logits, ids, mask = response_logits(base_model, prompts, responses, pad_id)
            model_logits, _, _ = response_logits(model, prompts, responses, pad_id)
            kl_sum = torch.zeros(len(batch), dtype=torch.float64, device=ids.device)
            nll_sum = torch.zeros_like(kl_sum)
            for start in range(0, ids.shape[1], position_chunk):
                cols = slice(start, start + position_chunk)
                base_logp = base_logits[:, cols].float().log_softmax(-1)
                model_logp = model_logits[:, cols].float().log_softmax(-1)
                real = mask[:, cols]
                kl = divergence_from_logprobs(model_logp, base_logp, 0.0)  # KL(base || model)
                nll = -model_logp.gather(-1, ids[:, cols, None]).squeeze(-1)
                kl_sum += torch.where(real, kl, 0.0).sum(1).double()
                nll_sum += torch.where(real, nll, 0.0).sum(1).double()
                del base_logp, model_logp, kl, nll
            del base_logits, model_logits
            for j, a in enumerate(batch):
                n = len(a.answer_ids)
                out[rows[j]] = PromptDivergence(a.index, a.kind, n, float(kl_sum[j]) / n, float(nll_sum[j]) / n,
                                                a.finished)
    return [out[i] for i in range(len(answers))]


def divergence_summary(rows: Sequence[PromptDivergence]) -> dict[str, Any]:
    """Means over prompts with 95 % t intervals: ``kl``, ``kl_low``, ``kl_high``, ``nll``, ...;
    plus the number of prompts (``n``) and of answer tokens."""
    out: dict[str, Any] = {"n": len(rows), "answer_tokens": int(sum(r.tokens for r in rows))}
    for name in ("kl", "nll"):
        out.update(mean_interval([getattr(r, name) for r in rows]).as_dict(name))
        out.pop(f"{name}_n")
    return out


class ForgettingProbe:
    """The base model's cached greedy answers to a prompt set, and the teacher-forced divergence
    of any model from the base model on them (:func:`answer_divergence`).

    The base model is loaded on first use and kept (a second copy of the weights in memory);
    every model scored is loaded, scored and released."""

    def __init__(self, base_folder: str | os.PathLike[str], task: EvalTask, cache: str | os.PathLike[str], *,
                 max_new_tokens: int = 96, batch_size: int = 8, generation_batch_size: int = 16,
                 dtype: str = "float32", device: str | None = None):
        self.base_folder = base_folder
        self.task = task
        self.dtype = dtype
        self.batch_size = batch_size
        self.device = device
        self.answers = base_answers(base_folder, task, cache, max_new_tokens=max_new_tokens,
                                    batch_size=generation_batch_size, dtype=dtype)
        self._base: Any = None
        self._pad_id: int | None = None

    @property
    def digest(self) -> str:
        """A short hash of the cached answers: per-model results computed on other answers differ."""
        text = json.dumps([asdict(a) for a in self.answers])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _load(self, folder: str | os.PathLike[str]) -> Any:
        import torch

        from sdft_ray.evaluation.runner import resolve_checkpoint
        from sdft_ray.models import load_causal_lm

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return load_causal_lm(resolve_checkpoint(folder), self.dtype).to(device).eval()

    def divergence(self, model_folder: str | os.PathLike[str]) -> list[PromptDivergence]:
        """Per-prompt KL(base || model) and NLL of the base answers under ``model_folder``."""
        if self._base is None:
            from sdft_ray.evaluation.runner import resolve_checkpoint
            from sdft_ray.models import load_tokenizer

            self._base = self._load(self.base_folder)
            self._pad_id = int(load_tokenizer(resolve_checkpoint(self.base_folder)).pad_token_id)
        model = self._load(model_folder)
        try:
            return answer_divergence(model, self._base, self.answers, self._pad_id, batch_size=self.batch_size)
        finally:
            del model


def length_drift(model_rows: Sequence[Mapping[str, Any]], base_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean response tokens of a model minus the base model's, per (task, kind) present in both
    (evaluation rows with ``mean_response_tokens``)."""
    base = {(r["task"], r["kind"]): float(r["mean_response_tokens"]) for r in base_rows
            if "mean_response_tokens" in r}
    out = []
    for r in model_rows:
        key = (r["task"], r["kind"])
        if key in base and "mean_response_tokens" in r:
            tokens = float(r["mean_response_tokens"])
            out.append({"task": key[0], "kind": key[1], "mean_response_tokens": tokens,
                        "base_mean_response_tokens": base[key], "length_drift": tokens - base[key]})
    return out
