"""The bounded-staleness schedule: which batches are generated and scored ahead of the learner.

With ``schedule.max_staleness = k`` the batches of the next ``k`` steps are launched (generated
and scored with the weights the rollout and teacher groups hold at that moment) while the learner
trains the current one; ``k = 0`` is the synchronous algorithm. Batch ``s + k`` is launched just
before step ``s`` trains, when the rollout workers hold the student of the last sync at or before
step ``s - 1``: its trajectories are at most ``k + rollout.sync_every - 1`` versions old.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

from sdft_ray.trajectory import PromptShard


@dataclass
class Batch:
    """A launched step's work: references only, plus what is needed to re-issue it."""

    step: int
    shards: list[PromptShard]
    sampler_state: dict[str, Any]  # data position after this batch (for checkpoints)
    rollout_refs: list[list[ray.ObjectRef]] = field(default_factory=list)  # [worker] -> [receipt, part_0..]
    score_refs: list[list[list[ray.ObjectRef]]] = field(default_factory=list)  # [worker][part] -> [receipt, scores]
    stats: dict[str, Any] | None = None  # rollout/teacher statistics, once collected
    # other teacher groups' scores of the same rows: name -> ([worker][part] -> [receipt, scores], prompts ref)
    extra_scores: dict[str, tuple[list[list[list[ray.ObjectRef]]], Any]] = field(default_factory=dict)

    def trajectory_refs(self, part: int) -> list[ray.ObjectRef]:
        """Learner shard ``part`` of every rollout worker's output."""
        return [refs[1 + part] for refs in self.rollout_refs]

    def scores(self, teacher: str = "teacher") -> list[list[ray.ObjectRef]]:
        """``[worker][part]`` refs to a teacher group's scores (the run's own: ``teacher``)."""
        refs = self.score_refs if teacher == "teacher" else self.extra_scores[teacher][0]
        return [[pair[1] for pair in parts] for parts in refs]


class Pipeline:
    """Keeps up to ``max_staleness`` batches in flight beyond the one the learner takes next."""

    def __init__(self, launch: Callable[[int], Batch], max_staleness: int, next_step: int, last_step: int):
        self.launch = launch
        self.max_staleness = max_staleness
        self.next_launch = next_step
        self.last_step = last_step
        self.pending: deque[Batch] = deque()

    def restore(self, batches: Iterable[Batch]) -> None:
        """Put back the batches that were in flight when a checkpoint was written."""
        for batch in batches:
            if batch.step != self.next_launch:
                raise ValueError(f"restored in-flight batch for step {batch.step}, expected step {self.next_launch}")
            self.pending.append(batch)
            self.next_launch += 1

    def next(self) -> Batch:
        """Launch up to ``max_staleness`` batches ahead, then hand over the oldest."""
        while self.next_launch <= self.last_step and len(self.pending) <= self.max_staleness:
            self.pending.append(self.launch(self.next_launch))
            self.next_launch += 1
        return self.pending.popleft()

    @property
    def in_flight(self) -> list[Batch]:
        """Batches launched and not yet handed over (what a checkpoint must keep)."""
        return list(self.pending)
