"""The single controller: its loop reads like the algorithm.

    for each step:
        batch    = pipeline.next()                      prompts -> rollout.generate -> teacher.score (refs)
        stats    = collect(batch)                       receipts only; lost work is re-issued
        metrics  = learners.train_step(batch)           DeepSpeed data parallel; EMA update
        every N steps: student weights -> rollout group, teacher weights -> teacher group

The controller passes ``ObjectRef``s between roles and reads back only receipts and metrics,
never trajectories or teacher scores. Beside it: :mod:`sdft_ray.roles` (role groups, their
weights, restarts and recovery), :mod:`sdft_ray.weight_sync` (how weights reach a group),
:mod:`sdft_ray.schedule` (bounded staleness), :mod:`sdft_ray.checkpointing` (save / resume).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import remove_placement_group

from actors.learner import LearnerWorker, teacher_signal_kind
from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer
from sdft_ray import checkpointing
from sdft_ray.checkpoint import CheckpointManager
from sdft_ray.config import RunConfig
from sdft_ray.data import EpochSampler
from sdft_ray.metrics import MetricsLogger, Progress
from sdft_ray.placement import reserve
from sdft_ray.prompts import TokenizedExample
from sdft_ray.roles import LearnerGroup, RoleGroup, spawn
from sdft_ray.schedule import Batch, Pipeline
from sdft_ray.step_metrics import (combine_learner_metrics, print_utilisation, ratio_metrics, rollout_stats,
                                   utilisation_summary)
from sdft_ray.trajectory import PromptShard, Trajectories
from sdft_ray.variants import get_variant
from sdft_ray.weight_sync import make_weight_sync

log = logging.getLogger("sdft_ray")


def total_steps(cfg: RunConfig, num_examples: int) -> int:
    if cfg.schedule.max_steps is not None:
        return cfg.schedule.max_steps
    return max(1, math.ceil(cfg.schedule.epochs * num_examples / cfg.schedule.prompts_per_step))


class Controller:
    #: the actor classes the role groups start (a test or a new variant may replace them)
    rollout_actor: type = RolloutWorker
    teacher_actor: type = TeacherScorer
    learner_actor: type = LearnerWorker

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
        self.placement = None
        self.rollout: RoleGroup | None = None
        self.teacher: RoleGroup | None = None
        self.learners: LearnerGroup | None = None
        self.signal = teacher_signal_kind(cfg)

    # ---- actors ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg, timeout = self.cfg, self.cfg.fault_tolerance.call_timeout_s
        self.placement = place = reserve(cfg, self.variant.uses_rollout)
        cfg_dict, restarts = cfg.model_dump(mode="json"), cfg.fault_tolerance.max_actor_restarts
        learner_args = lambda i: ((i, place.learner.count, cfg_dict, self.model_folder, self.total_steps), {})  # noqa: E731
        self.learners = LearnerGroup(self.learner_actor, spawn(
            self.learner_actor, place.learner.count, place.group, place.learner.first_bundle,
            place.learner.resources, learner_args), timeout)
        setup = self.learners.send("setup", *self.learners.call("address"))
        if not self.variant.uses_rollout:
            self.learners.wait("setup", setup)
            return
        common = dict(dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        self.rollout = RoleGroup("rollout", spawn(
            self.rollout_actor, place.rollout.count, place.group, place.rollout.first_bundle, place.rollout.resources,
            lambda i: ((i, self.model_folder, cfg.rollout.engine), dict(
                batch_size=cfg.rollout.batch_size, engine_options=cfg.rollout.vllm,
                resources=place.rollout.resources.model_dump(), **common)),
            max_restarts=restarts), max_restarts=restarts, timeout_s=timeout)
        self.teacher = RoleGroup("teacher", spawn(
            self.teacher_actor, place.teacher.count, place.group, place.teacher.first_bundle, place.teacher.resources,
            lambda i: ((i, self.teacher_folder, cfg.model.dtype, self.signal, cfg.loss.top_k,
                        cfg.teacher.micro_batch_size), dict(
                transfer_dtype=cfg.teacher.transfer_dtype, trust_remote_code=cfg.model.trust_remote_code,
                resources=place.teacher.resources.model_dump(), run_config=cfg_dict, engine=cfg.teacher.engine,
                engine_options=cfg.teacher.vllm)),
            max_restarts=restarts), max_restarts=restarts, timeout_s=timeout)
        self.learners.wait("setup", setup)
        self.rollout.ready()
        self.teacher.ready()
        self.sync = make_weight_sync(cfg, self.learners)
        for group in (self.rollout, self.teacher):
            self.sync.attach(group)

    def shutdown(self) -> None:
        for group in (self.rollout, self.teacher, self.learners):
            if group is not None:
                group.kill()
        if self.placement is not None:
            remove_placement_group(self.placement.group)
        self.rollout = self.teacher = self.learners = self.placement = None

    # ---- weight sync -------------------------------------------------------------------------
    def sync_group(self, group: RoleGroup, version: int) -> None:
        """The learner's weights for ``group`` (student, or the teacher's kind) as ``version``."""
        ema = group is self.teacher and self.cfg.teacher.kind == "ema"
        self.sync.push(group, "teacher" if ema else "student", version)

    def sync_weights(self) -> None:
        """After step ``self.step``: student to the rollout group, teacher weights to the teacher group."""
        if self.rollout is not None and self.step % self.cfg.rollout.sync_every == 0:
            self.sync_group(self.rollout, self.step)
        if self.teacher is not None and self.cfg.teacher.kind != "frozen" and self.step % self.cfg.teacher.sync_every == 0:
            self.sync_group(self.teacher, self.step)

    # ---- one batch ---------------------------------------------------------------------------
    def make_shard(self, step: int, picks: list[tuple[int, int]]) -> PromptShard:
        return PromptShard.of_examples(step, self.cfg.schedule.seed * 1_000_003 + step, picks, self.examples,
                                       self.contexts)

    def launch(self, step: int) -> Batch:
        """Take the next prompts from the data stream and start generating and scoring them."""
        picks = self.sampler.next_batch(self.cfg.schedule.prompts_per_step)
        return self.launch_picks(step, picks, self.sampler.state_dict())

    def launch_picks(self, step: int, picks: list[tuple[int, int]], sampler_state: dict | None = None) -> Batch:
        """Start rollout + scoring for given (epoch, example) pairs (also used for fixed probe batches)."""
        if not self.variant.uses_rollout:
            return self._demonstration_batch(step, picks, sampler_state)
        batch = Batch(step, self.make_shard(step, picks).split(len(self.rollout)), sampler_state or {})
        for worker in range(len(batch.shards)):
            batch.rollout_refs.append(self._generate(batch, worker))
            batch.score_refs.append([self._score(batch, worker, part) for part in range(len(self.learners))])
        return batch

    def _generate(self, batch: Batch, worker: int) -> list[ray.ObjectRef]:
        rc, parts = self.cfg.rollout, len(self.learners)
        topk = self.cfg.loss.top_k if self.signal == "topk_student" else 0
        sampling = dict(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p, topk_logprobs=topk)
        return self.rollout.work(worker, "generate", batch.shards[worker], parts, sampling, rc.num_samples,
                                 num_returns=1 + parts)

    def _regenerate(self, batch: Batch, worker: int) -> list[ray.ObjectRef]:
        """Re-issue a worker's rollout (its actor was recovered) and the scoring that depends on it."""
        batch.rollout_refs[worker] = self._generate(batch, worker)
        batch.score_refs[worker] = [self._score(batch, worker, part) for part in range(len(self.learners))]
        return batch.rollout_refs[worker]

    def _teacher_for(self, worker: int, part: int) -> int:
        return (worker * len(self.learners) + part) % len(self.teacher)

    def _score(self, batch: Batch, worker: int, part: int) -> list[ray.ObjectRef]:
        return self.teacher.work(self._teacher_for(worker, part), "score", batch.rollout_refs[worker][1 + part],
                                 num_returns=2)

    def _demonstration_batch(self, step: int, picks, sampler_state) -> Batch:
        """SFT: the demonstrations are the responses; put one part per learner into the object store."""
        shard = self.make_shard(step, picks)
        traj = Trajectories.of_demonstrations(
            shard, [np.asarray(self.targets[self.examples[i].index], dtype=np.int64) for _, i in picks], self.step)
        parts = [ray.put(p) for p in traj.split(len(self.learners))]
        return Batch(step, [shard], sampler_state or {}, rollout_refs=[[ray.put(traj.receipt(-1, 0.0)), *parts]])

    def collect(self, batch: Batch) -> dict[str, Any]:
        """Wait for a batch's receipts, recovering lost actors and re-issuing their work."""
        if batch.stats is not None:
            return batch.stats
        t0 = time.perf_counter()
        if self.rollout is None:  # demonstrations: nothing to wait for
            receipts = ray.get([refs[0] for refs in batch.rollout_refs], timeout=self.cfg.fault_tolerance.call_timeout_s)
        else:
            receipts = []
            for worker in range(len(batch.rollout_refs)):
                receipt, _ = self.rollout.result(worker, batch.rollout_refs[worker],
                                                 lambda w=worker: self._regenerate(batch, w))
                receipts.append(receipt)
        t_rollout = time.perf_counter() - t0
        score_receipts = []
        for worker, parts in enumerate(batch.score_refs):
            for part in range(len(parts)):
                receipt, parts[part] = self.teacher.result(
                    self._teacher_for(worker, part), parts[part], lambda w=worker, p=part: self._score(batch, w, p))
                score_receipts.append(receipt)
        batch.stats = rollout_stats(receipts, score_receipts, t_rollout, time.perf_counter() - t0 - t_rollout)
        return batch.stats

    def _learner_args(self, batch: Batch, *args) -> list[tuple]:
        """Learner ``rank`` gets part ``rank`` of every rollout worker's output (refs only)."""
        return [(*args, batch.trajectory_refs(rank), batch.score_refs_for(rank)) for rank in range(len(self.learners))]

    def train_on(self, batch: Batch) -> dict[str, Any]:
        return combine_learner_metrics(self.learners.call_each("train_step", self._learner_args(batch, batch.step)))

    def evaluate(self, batch: Batch, metric: str = "loss") -> float:
        """``loss`` (or ``divergence``) of the current student on a collected batch, without updating."""
        return ratio_metrics(self.learners.call_each("evaluate", self._learner_args(batch)))[metric]

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
                self.sync_weights()
                t_end = time.perf_counter()
                record = self._record(batch, stats, learned, queued, step_start, t_learn, t_sync, t_end)
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
