"""The single controller: its loop reads like the algorithm.

    for each step:
        batch    = pipeline.next()                      prompts -> rollout.generate -> teacher.score (refs)
        stats    = collect(batch)                       receipts only; lost work is re-issued
        metrics  = learners.train_step(batch)           DeepSpeed data parallel; EMA update
        every N steps: student weights -> rollout group, teacher weights -> teacher group

The controller passes ``ObjectRef``s between roles and reads back only receipts and metrics,
never trajectories or teacher scores. It is one user of :class:`sdft_ray.groups.RunGroups` (the
started role groups and the calls of a step; :mod:`sdft_ray.roles` for their weights, restarts and
recovery, :mod:`sdft_ray.weight_sync` for how weights reach them) and adds the data stream,
:mod:`sdft_ray.schedule` (bounded staleness) and :mod:`sdft_ray.checkpointing` (save / resume).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdft_ray import checkpointing
from sdft_ray.checkpoint import CheckpointManager
from sdft_ray.config import RunConfig
from sdft_ray.data import EpochSampler
from sdft_ray.groups import RunGroups
from sdft_ray.metrics import MetricsLogger, Progress
from sdft_ray.prompts import TokenizedExample
from sdft_ray.run_checks import TRUNCATION_WINDOW, TruncationWatch
from sdft_ray.schedule import Batch, Pipeline
from sdft_ray.step_metrics import print_utilisation, utilisation_summary
from sdft_ray.trajectory import PromptShard
from sdft_ray.variants import get_variant

log = logging.getLogger("sdft_ray")


def total_steps(cfg: RunConfig, num_examples: int) -> int:
    if cfg.schedule.max_steps is not None:
        return cfg.schedule.max_steps
    return max(1, math.ceil(cfg.schedule.epochs * num_examples / cfg.schedule.prompts_per_step))


class Controller:
    def __init__(self, cfg: RunConfig, model_folder: str | Path, examples: list[TokenizedExample],
                 run_dir: str | Path | None = None, contexts: dict[int, dict] | None = None,
                 targets: dict[int, tuple[int, ...]] | None = None):
        self.cfg = cfg
        self.variant = get_variant(cfg)
        self.model_folder = str(model_folder)
        self.teacher_folder = str(self.variant.teacher_model(Path(model_folder)))
        self.examples = examples
        self.contexts = contexts  # per dataset row, for variants that build the teacher context late
        self.targets = targets  # per dataset row, the demonstration's token ids (SFT)
        self.run_dir = Path(run_dir or cfg.output.dir)
        self.total_steps = total_steps(cfg, len(examples))
        self.sampler = EpochSampler(len(examples), cfg.schedule.seed, cfg.data.shuffle)
        self.step = 0  # steps trained = the learner's (student) weight version
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.output.keep_last, cfg.output.best_mode)
        self.groups = RunGroups(cfg, model_folder, self.total_steps, teacher_folder=self.teacher_folder,
                                generating=self.variant.uses_rollout)

    # ---- the role groups (sdft_ray/groups.py) -------------------------------------------------
    def start(self) -> None:
        self.groups.start()

    def shutdown(self) -> None:
        self.groups.shutdown()

    @property
    def rollout(self):
        return self.groups.rollout

    @property
    def teacher(self):
        return self.groups.teacher

    @property
    def learners(self):
        return self.groups.learners

    def sync_weights(self) -> int:
        """After step ``self.step``: student to the rollout group, teacher weights to the teacher
        group; returns the bytes published."""
        return self.groups.sync(self.step)

    # ---- one batch ---------------------------------------------------------------------------
    def make_shard(self, step: int, picks: list[tuple[int, int]]) -> PromptShard:
        return PromptShard.of_examples(step, self.cfg.schedule.seed * 1_000_003 + step, picks, self.examples,
                                       self.contexts)

    def launch(self, step: int) -> Batch:
        """Take the next prompts from the data stream and start generating and scoring them."""
        picks = self.sampler.next_batch(self.cfg.schedule.prompts_per_step)
        return self.launch_picks(step, picks, self.sampler.state_dict())

    def launch_picks(self, step: int, picks: list[tuple[int, int]], sampler_state: dict | None = None) -> Batch:
        """Start rollout + scoring for given (epoch, example) pairs (also used for fixed probe batches);
        SFT: the demonstrations are the responses."""
        shard = self.make_shard(step, picks)
        if not self.variant.uses_rollout:
            responses = [np.asarray(self.targets[self.examples[i].index], dtype=np.int64) for _, i in picks]
            return self.groups.demonstrations(shard, responses, self.step, sampler_state)
        return self.groups.generate(shard, sampler_state)

    def collect(self, batch: Batch) -> dict[str, Any]:
        """Wait for a batch's receipts, recovering lost actors and re-issuing their work."""
        return self.groups.collect(batch)

    def train_on(self, batch: Batch) -> dict[str, Any]:
        return self.groups.train(batch)

    def evaluate(self, batch: Batch, metric: str = "loss") -> float:
        """``loss`` (or ``divergence``) of the current student on a collected batch, without updating."""
        return self.groups.evaluate(batch, metric)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, resume: Path | None = None, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or ``stop_after`` more steps); returns a summary."""
        cfg = self.cfg
        self.checkpoints.clean_partial()
        in_flight = checkpointing.restore(self, resume) if resume is not None else []
        metrics_log = MetricsLogger.from_config(cfg, self.run_dir, resume_step=self.step if resume is not None else None)
        progress = Progress(self.total_steps, cfg.output.progress, start=self.step, log_every=cfg.output.log_every)
        last_step = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        # the pipeline looks ahead to the run's end even when stopping earlier, so that a stop (and
        # its checkpoint) holds the same in-flight batches as the uninterrupted run at that step
        pipeline = Pipeline(self.launch, cfg.schedule.max_staleness, self.step + 1, self.total_steps)
        pipeline.restore(in_flight)
        history: list[dict[str, Any]] = []
        truncation = TruncationWatch(cfg.rollout.max_new_tokens, window=min(TRUNCATION_WINDOW, self.total_steps))
        run_start = time.perf_counter()
        try:
            while self.step < last_step:
                batch = pipeline.next()
                queued = len(pipeline.in_flight)  # batches generated and scored ahead of this one
                step_start = time.perf_counter()
                stats = self.collect(batch)
                t_learn = time.perf_counter()
                learned = self.train_on(batch)
                self.step = batch.step
                t_sync = time.perf_counter()
                sync_bytes = self.sync_weights()
                t_end = time.perf_counter()
                record = self._record(batch, stats, learned, queued, step_start, t_learn, t_sync, t_end)
                record["sync/bytes"] = sync_bytes
                if self.variant.uses_rollout and (warning := truncation.observe(self.step, record["rollout/finished_fraction"])):
                    log.warning(warning)
                if cfg.output.checkpoint_every and self.step % cfg.output.checkpoint_every == 0 or (
                        cfg.output.save_final and self.step == self.total_steps):
                    t_ckpt = time.perf_counter()
                    record["checkpoint"] = str(checkpointing.save(self, pipeline.in_flight, record))
                    record["time/checkpoint"] = time.perf_counter() - t_ckpt
                metrics_log.log(self.step, record)
                history.append(record)
                progress.update(self.step, record)
            for group in (self.rollout, self.teacher):
                if group is not None:
                    group.drain()  # surface a failed weight push now, not in the next run
        finally:
            progress.close()
            metrics_log.close()
        seconds = time.perf_counter() - run_start
        utilisation = utilisation_summary(history, seconds)
        if history and cfg.output.progress != "off":
            print_utilisation(utilisation)
        return {"steps": self.step, "seconds": seconds, "history": history, "utilisation": utilisation,
                "latest_checkpoint": str(self.checkpoints.latest() or "")}

    def _record(self, batch: Batch, stats: dict, learned: dict, queued: int, step_start: float, t_learn: float,
                t_sync: float, t_end: float) -> dict[str, Any]:
        """The step's metrics line: learner sums divided once, rollout/teacher stats, versions, times."""
        staleness = (self.step - 1) - learned["policy_version_min"]
        bound = self.cfg.schedule.max_staleness + self.cfg.rollout.sync_every - 1
        if self.variant.uses_rollout and staleness > bound:
            raise RuntimeError(f"step {self.step}: trajectories {staleness} versions old, over the bound {bound}")
        groups = [("rollout", self.rollout), ("teacher", self.teacher)]
        return {
            **{k: v for k, v in learned.items() if k not in ("policy_version_min", "teacher_version_min")},
            **stats, "staleness": staleness, "queue/batches_ahead": queued, "student_version": self.step,
            "teacher_version": self.teacher.version if self.teacher is not None else 0,
            "rollout/policy_version_min": learned["policy_version_min"],
            "teacher/version_min": learned["teacher_version_min"],
            "epoch": batch.sampler_state["position"] / max(len(self.examples), 1),
            "time/learner": t_sync - t_learn, "time/sync": t_end - t_sync, "time/step": t_end - step_start,
            "throughput/tokens_per_s": stats["rollout/tokens"] / max(t_end - step_start, 1e-9),
            "actors/learner": len(self.learners),
            **{f"restarts/{name}": group.restarts for name, group in groups if group is not None},
        }
