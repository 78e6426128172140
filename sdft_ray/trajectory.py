"""The records that flow between roles through the Ray object store.

A ``PromptShard`` goes to a rollout worker; it returns one ``Trajectories`` record per
learner shard; a teacher turns each into ``TeacherScores``; learners read both. Arrays are
numpy (zero-copy out of the object store), ragged per sequence. The controller only ever
holds ``ObjectRef``s to ``Trajectories`` and ``TeacherScores``; what it reads back are the
small ``*Receipt`` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class PromptShard:
    """Prompts for one rollout call: already tokenized for both roles."""

    step: int
    seed: int
    example_index: np.ndarray  # [N] int64, row of the dataset
    epoch: np.ndarray  # [N] int64
    prompt_ids: list[np.ndarray]  # student prompt token ids
    teacher_prompt_ids: list[np.ndarray]  # demonstration-conditioned prompt token ids
    contexts: list[dict] | None = None  # prompt text + extra columns, for variants that build context late
    contrast_prompt_ids: list[np.ndarray] | None = None  # teacher prompt with another example's demonstration

    @classmethod
    def of_examples(cls, step: int, seed: int, picks: list[tuple[int, int]], examples: list,
                    contexts: dict[int, dict] | None = None) -> "PromptShard":
        """The prompts of ``picks`` (``(epoch, example)`` pairs) from tokenized examples."""
        rows = [examples[i] for _, i in picks]
        return cls(step=step, seed=seed, example_index=np.array([i for _, i in picks], dtype=np.int64),
                   epoch=np.array([e for e, _ in picks], dtype=np.int64),
                   prompt_ids=[np.asarray(r.prompt_ids, dtype=np.int64) for r in rows],
                   teacher_prompt_ids=[np.asarray(r.teacher_prompt_ids, dtype=np.int64) for r in rows],
                   contexts=[contexts[r.index] for r in rows] if contexts is not None else None,
                   contrast_prompt_ids=[np.asarray(r.contrast_prompt_ids, dtype=np.int64) for r in rows]
                   if rows and rows[0].contrast_prompt_ids is not None else None)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def split(self, parts: int) -> list["PromptShard"]:
        bounds = np.linspace(0, len(self), parts + 1).astype(int)
        return [self.select(range(a, b), seed=self.seed * 1009 + i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def select(self, rows, seed: int | None = None) -> "PromptShard":
        rows = list(rows)
        return PromptShard(
            step=self.step,
            seed=self.seed if seed is None else seed,
            example_index=self.example_index[rows],
            epoch=self.epoch[rows],
            prompt_ids=[self.prompt_ids[r] for r in rows],
            teacher_prompt_ids=[self.teacher_prompt_ids[r] for r in rows],
            contexts=None if self.contexts is None else [self.contexts[r] for r in rows],
            contrast_prompt_ids=None if self.contrast_prompt_ids is None else [self.contrast_prompt_ids[r] for r in rows],
        )


@dataclass
class Trajectories:
    """Student samples for a set of prompts (one row per sampled response)."""

    step: int
    policy_version: int  # student weight version that generated these rows
    example_index: np.ndarray  # [B] int64
    epoch: np.ndarray  # [B] int64
    sample_index: np.ndarray  # [B] int64, which of num_samples
    prompt_ids: list[np.ndarray]
    teacher_prompt_ids: list[np.ndarray]
    response_ids: list[np.ndarray]  # includes the stop token when one was produced
    rollout_logprobs: list[np.ndarray]  # [T] float32, behaviour-policy log-probs (temperature 1)
    finished: np.ndarray  # [B] bool, stopped on a stop token (else hit max_new_tokens)
    rollout_topk_ids: list[np.ndarray] | None = None  # [T, k] int64, the sampler's top-k
    contexts: list[dict] | None = None  # see PromptShard.contexts
    contrast_prompt_ids: list[np.ndarray] | None = None  # see PromptShard.contrast_prompt_ids

    @classmethod
    def of_demonstrations(cls, shard: PromptShard, responses: list[np.ndarray], policy_version: int) -> "Trajectories":
        """Supervised rows: the demonstrations are the responses (SFT), nothing sampled."""
        return cls(step=shard.step, policy_version=policy_version, example_index=shard.example_index,
                   epoch=shard.epoch, sample_index=np.zeros(len(shard), dtype=np.int64), prompt_ids=shard.prompt_ids,
                   teacher_prompt_ids=shard.teacher_prompt_ids, response_ids=responses,
                   rollout_logprobs=[np.zeros(len(r), dtype=np.float32) for r in responses],
                   finished=np.ones(len(shard), dtype=bool))

    def receipt(self, worker: int, seconds: float) -> "RolloutReceipt":
        """What the controller reads back about these rows."""
        lengths = [len(r) for r in self.response_ids]
        return RolloutReceipt(worker=worker, step=self.step, policy_version=self.policy_version, sequences=len(self),
                              response_tokens=int(sum(lengths)),
                              mean_response_len=float(np.mean(lengths)) if lengths else 0.0,
                              finished_fraction=float(self.finished.mean()) if len(self) else 0.0, seconds=seconds,
                              example_index=[int(i) for i, k in zip(self.example_index, self.sample_index) if k == 0])

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, rows) -> "Trajectories":
        rows = list(rows)
        pick = lambda xs: None if xs is None else [xs[r] for r in rows]  # noqa: E731
        return Trajectories(
            step=self.step,
            policy_version=self.policy_version,
            example_index=self.example_index[rows],
            epoch=self.epoch[rows],
            sample_index=self.sample_index[rows],
            prompt_ids=pick(self.prompt_ids),
            teacher_prompt_ids=pick(self.teacher_prompt_ids),
            response_ids=pick(self.response_ids),
            rollout_logprobs=pick(self.rollout_logprobs),
            finished=self.finished[rows],
            rollout_topk_ids=pick(self.rollout_topk_ids),
            contexts=pick(self.contexts),
            contrast_prompt_ids=pick(self.contrast_prompt_ids),
        )

    def split(self, parts: int) -> list["Trajectories"]:
        """Equal-count parts for the learner ranks, dealt longest-first so token counts balance too."""
        order = sorted(range(len(self)), key=lambda i: -(len(self.prompt_ids[i]) + len(self.response_ids[i])))
        return [self.select(sorted(order[p::parts])) for p in range(parts)]

    @property
    def response_tokens(self) -> int:
        return int(sum(len(r) for r in self.response_ids))


SignalKind = Literal["full", "topk", "sampled"]


@dataclass
class TeacherScores:
    """The teacher's distribution on the student's response tokens, aligned with ``Trajectories``."""

    teacher_version: int
    kind: SignalKind
    full_logprobs: list[np.ndarray] | None = None  # [T, V]
    topk_ids: list[np.ndarray] | None = None  # [T, k]
    topk_logprobs: list[np.ndarray] | None = None  # [T, k]
    token_logprobs: list[np.ndarray] | None = None  # [T], always filled: log pi(y_t | x, c)
    demonstration_shift: list[np.ndarray] | None = None  # [T] KL(teacher with c || teacher with another c)
    transfer_dtype: str = "float32"  # 16-bit full log-probs travel as raw int16 bit patterns

    def __len__(self) -> int:
        return len(self.token_logprobs or [])

    def as_float(self, array: np.ndarray) -> np.ndarray:
        """A transferred array as float32 (undoing the 16-bit packing of full log-probs)."""
        if array.dtype != np.int16:
            return array.astype(np.float32, copy=False)
        import torch

        return torch.from_numpy(array.copy()).view(getattr(torch, self.transfer_dtype)).float().numpy()


@dataclass
class RolloutReceipt:
    """What the controller reads back from a rollout call: sizes, versions and timings."""

    worker: int
    step: int
    policy_version: int
    sequences: int
    response_tokens: int
    mean_response_len: float
    finished_fraction: float
    seconds: float
    example_index: list[int] = field(default_factory=list)


@dataclass
class ScoreReceipt:
    worker: int
    teacher_version: int
    sequences: int
    seconds: float
