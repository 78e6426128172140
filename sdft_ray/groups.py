"""The role groups of one run, started together, and the calls of one SDFT step on them.

:class:`RunGroups` is the public API for composing a training loop (docs/variants.md): start the
groups on one placement group, then per step

    batch   = groups.generate(shard)                # rollout + the run's teacher's scores (refs)
    groups.score(batch, "hint", prompts_ref)        # another teacher group on the same rows
    stats   = groups.collect(batch)                 # receipts; lost actors recovered, work re-issued
    metrics = groups.train(batch, scores)           # every learner rank, its part of every worker's rows
    groups.sync(step)                               # student -> rollout; teacher weights -> teachers

Only ``ObjectRef``s pass through the caller. The controller (:mod:`sdft_ray.controller`) is one
user of this API: it adds the data stream, the bounded-staleness schedule, checkpoints and metrics.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
from ray.util.placement_group import remove_placement_group

from actors.colocated import ColocatedWorker
from actors.learner import LearnerWorker, teacher_signal_kind
from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer
from sdft_ray.config import RunConfig
from sdft_ray.placement import Placement, reserve
from sdft_ray.roles import ColocatedRoleGroup, LearnerGroup, RoleGroup, spawn
from sdft_ray.schedule import Batch
from sdft_ray.step_metrics import combine_learner_metrics, ratio_metrics, rollout_stats
from sdft_ray.trajectory import PromptShard, Trajectories
from sdft_ray.weight_sync import WeightSync, make_weight_sync

MAIN_TEACHER = "teacher"


@dataclass(frozen=True)
class TeacherGroupSpec:
    """A teacher group beside the run's own (``teacher``): its name, weights and size. It scores
    with ``model_folder`` (default: the run's teacher model) and holds the EMA teacher, the live
    student or fixed weights (``kind``); its prompts are the trajectories' teacher prompts unless
    :meth:`RunGroups.score` is given others."""

    name: str
    kind: Literal["ema", "frozen", "live"] = "frozen"
    model_folder: str | None = None
    num_workers: int = 1


@ray.remote(num_cpus=0)
def with_teacher_prompts(traj: Trajectories, prompts: dict[int, np.ndarray]) -> Trajectories:
    """The same rows with other teacher prompts (``example index -> prompt ids``), e.g. another
    template or context for a second teacher group. Runs where the trajectories are."""
    return dataclasses.replace(traj, teacher_prompt_ids=[np.asarray(prompts[int(i)]) for i in traj.example_index])


class RunGroups:
    #: the actor classes the groups start (a test or a new variant may replace them)
    rollout_actor: type = RolloutWorker
    teacher_actor: type = TeacherScorer
    learner_actor: type = LearnerWorker
    colocated_actor: type = ColocatedWorker  # placement.mode colocated: a learner rank holding every role

    def __init__(self, cfg: RunConfig, model_folder: str | Path, total_steps: int, *,
                 teacher_folder: str | Path | None = None, generating: bool = True,
                 extra_teachers: Sequence[TeacherGroupSpec] = ()):
        self.cfg = cfg
        self.model_folder = str(model_folder)
        self.teacher_folder = str(teacher_folder or model_folder)
        self.total_steps = total_steps
        self.generating = generating  # False: supervised (SFT), learners only
        self.extra_teachers = list(extra_teachers)
        if any(spec.name == MAIN_TEACHER for spec in self.extra_teachers):
            raise ValueError(f"extra teacher groups cannot be named {MAIN_TEACHER!r}")
        self.colocated = cfg.placement.mode == "colocated" and generating
        if self.colocated and self.extra_teachers:
            raise ValueError("placement.mode 'colocated' hosts the run's own teacher only: extra teacher groups "
                             "need placement.mode 'disaggregated'")
        self.signal = teacher_signal_kind(cfg)
        # model.lora: the student's roles hold the base model plus adapters (an external teacher does not)
        self.lora = cfg.model.lora.model_dump() if cfg.model.lora is not None else None
        self.placement: Placement | None = None
        self.learners: LearnerGroup | None = None
        self.rollout: RoleGroup | None = None
        self.teachers: dict[str, RoleGroup] = {}  # name -> group; MAIN_TEACHER is the run's own
        self.weight_sync: WeightSync | None = None

    @property
    def teacher(self) -> RoleGroup | None:
        return self.teachers.get(MAIN_TEACHER)

    # ---- start and stop ----------------------------------------------------------------------
    def start(self) -> RunGroups:
        cfg, timeout = self.cfg, self.cfg.fault_tolerance.call_timeout_s
        extra_count = sum(spec.num_workers for spec in self.extra_teachers)
        # colocated: only the learner ranks' bundles; each rank also holds the rollout and teacher roles
        self.placement = place = reserve(cfg, self.generating and not self.colocated, extra_teachers=extra_count)
        cfg_dict, restarts = cfg.model_dump(mode="json"), cfg.fault_tolerance.max_actor_restarts
        learner_cls = self.colocated_actor if self.colocated else self.learner_actor
        options = {"teacher_folder": self.teacher_folder} if self.colocated else {}
        self.learners = LearnerGroup(learner_cls, spawn(
            learner_cls, place.learner.count, place.group, place.learner.first_bundle, place.learner.resources,
            lambda i: ((i, place.learner.count, cfg_dict, self.model_folder, self.total_steps), options)), timeout)
        setup = self.learners.send("setup", *self.learners.call("address"))
        if not self.generating:
            self.learners.wait("setup", setup)
            return self
        if self.colocated:
            self.learners.wait("setup", setup)
            self.rollout = ColocatedRoleGroup("rollout", self.learners.handles, timeout_s=timeout)
            self.teachers[MAIN_TEACHER] = ColocatedRoleGroup("teacher", self.learners.handles, timeout_s=timeout,
                                                             weights_kind=cfg.teacher.kind)
            self._attach_weight_sync()
            return self
        self.rollout = RoleGroup("rollout", spawn(
            self.rollout_actor, place.rollout.count, place.group, place.rollout.first_bundle, place.rollout.resources,
            lambda i: ((i, self.model_folder, cfg.rollout.engine), dict(
                batch_size=cfg.rollout.batch_size, engine_options=cfg.rollout.vllm, dtype=cfg.model.dtype,
                trust_remote_code=cfg.model.trust_remote_code, resources=place.rollout.resources.model_dump(),
                lora=self.lora)),
            max_restarts=restarts), max_restarts=restarts, timeout_s=timeout)
        first = place.teacher.first_bundle
        for spec in [TeacherGroupSpec(MAIN_TEACHER, cfg.teacher.kind, None, cfg.teacher.num_workers)] + self.extra_teachers:
            self.teachers[spec.name] = self._start_teacher(spec, first, cfg_dict)
            first += spec.num_workers
        self.learners.wait("setup", setup)
        self._attach_weight_sync()
        return self

    def _attach_weight_sync(self) -> None:
        self.weight_sync = make_weight_sync(self.cfg, self.learners)
        for group in (self.rollout, *self.teachers.values()):
            group.ready()
            self.weight_sync.attach(group)

    def _start_teacher(self, spec: TeacherGroupSpec, first_bundle: int, cfg_dict: dict) -> RoleGroup:
        cfg, res = self.cfg, self.placement.teacher.resources
        restarts = cfg.fault_tolerance.max_actor_restarts
        folder = spec.model_folder or self.teacher_folder
        handles = spawn(self.teacher_actor, spec.num_workers, self.placement.group, first_bundle, res,
                        lambda i: ((i, folder, cfg.model.dtype, self.signal, cfg.loss.top_k, cfg.teacher.micro_batch_size),
                                   dict(transfer_dtype=cfg.teacher.transfer_dtype,
                                        trust_remote_code=cfg.model.trust_remote_code, resources=res.model_dump(),
                                        run_config=cfg_dict, engine=cfg.teacher.engine,
                                        engine_options=cfg.teacher.vllm,
                                        lora=self.lora if folder == self.model_folder else None)),
                        max_restarts=restarts)
        return RoleGroup(spec.name, handles, max_restarts=restarts, timeout_s=cfg.fault_tolerance.call_timeout_s,
                         weights_kind=spec.kind)

    def shutdown(self) -> None:
        for group in (self.rollout, *self.teachers.values(), self.learners):
            if group is not None:
                group.kill()
        if self.placement is not None:
            remove_placement_group(self.placement.group)
        self.rollout, self.teachers, self.learners, self.placement = None, {}, None, None

    def __enter__(self) -> RunGroups:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- weights -----------------------------------------------------------------------------
    def push(self, group: RoleGroup, version: int) -> None:
        """The learner's weights for ``group`` as ``version``: the EMA teacher's for EMA teacher
        groups, the student's otherwise."""
        self.weight_sync.push(group, "teacher" if group.weights_kind == "ema" else "student", version)

    def sync(self, step: int) -> int:
        """After training step ``step``: the student to the rollout group every ``rollout.sync_every``
        steps, teacher weights to every teacher group that follows the learner every
        ``teacher.sync_every`` steps. Returns the bytes of weights published (0 in process)."""
        pushed = []
        if self.rollout is not None and step % self.cfg.rollout.sync_every == 0:
            pushed.append(self.rollout)
        if step % self.cfg.teacher.sync_every == 0:
            pushed += [group for group in self.teachers.values() if group.weights_kind != "frozen"]
        for group in pushed:
            self.push(group, step)
        return sum(group.weights.num_bytes for group in pushed if group.weights is not None)

    # ---- one batch ---------------------------------------------------------------------------
    def generate(self, shard: PromptShard, sampler_state: dict | None = None) -> Batch:
        """Start sampling ``shard`` (split over the rollout workers) and scoring it with the run's
        teacher group; returns the batch of references."""
        batch = Batch(shard.step, shard.split(len(self.rollout)), sampler_state or {})
        for worker in range(len(batch.shards)):
            batch.rollout_refs.append(self._generate(batch, worker))
            batch.score_refs.append([self._score(batch, worker, part) for part in range(len(self.learners))])
        return batch

    def demonstrations(self, shard: PromptShard, responses: list[np.ndarray], version: int,
                       sampler_state: dict | None = None) -> Batch:
        """A supervised batch (SFT): the given responses, one part per learner, nothing sampled."""
        traj = Trajectories.of_demonstrations(shard, responses, version)
        parts = [ray.put(p) for p in traj.split(len(self.learners))]
        return Batch(shard.step, [shard], sampler_state or {}, rollout_refs=[[ray.put(traj.receipt(-1, 0.0)), *parts]])

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

    def _score(self, batch: Batch, worker: int, part: int, teacher: str = MAIN_TEACHER,
               prompts: ray.ObjectRef | None = None) -> list[ray.ObjectRef]:
        group = self.teachers[teacher]
        traj = batch.rollout_refs[worker][1 + part]
        if prompts is not None:
            traj = with_teacher_prompts.remote(traj, prompts)
        return group.work((worker * len(self.learners) + part) % len(group), "score", traj, num_returns=2)

    def score(self, batch: Batch, teacher: str, prompts: ray.ObjectRef | None = None) -> None:
        """Also score a batch's rows with another teacher group (``prompts``: an object ref to
        ``{example index: teacher prompt ids}`` to score them under other prompts, e.g. another
        template or context); :meth:`collect` waits for them, ``batch.scores(teacher)`` holds them."""
        refs = [[self._score(batch, w, p, teacher, prompts) for p in range(len(self.learners))]
                for w in range(len(batch.rollout_refs))]
        batch.extra_scores[teacher] = (refs, prompts)

    def collect(self, batch: Batch) -> dict[str, Any]:
        """Wait for a batch's receipts (every teacher group's that scored it), recovering lost
        actors and re-issuing their work."""
        if batch.stats is not None:
            return batch.stats
        t0 = time.perf_counter()
        if self.rollout is None:  # demonstrations: nothing to wait for
            receipts = ray.get([refs[0] for refs in batch.rollout_refs], timeout=self.cfg.fault_tolerance.call_timeout_s)
        else:
            receipts = [self.rollout.result(w, batch.rollout_refs[w], lambda w=w: self._regenerate(batch, w))[0]
                        for w in range(len(batch.rollout_refs))]
        t_rollout = time.perf_counter() - t0
        score_receipts = []
        teachers = [(MAIN_TEACHER, batch.score_refs, None)] + [(n, r, p) for n, (r, p) in batch.extra_scores.items()]
        for name, refs, prompts in teachers:
            for worker, parts in enumerate(refs):
                for part in range(len(parts)):
                    group = self.teachers[name]
                    receipt, parts[part] = group.result(
                        (worker * len(self.learners) + part) % len(group), parts[part],
                        lambda w=worker, p=part, n=name, q=prompts: self._score(batch, w, p, n, q))
                    score_receipts.append(receipt)
        batch.stats = rollout_stats(receipts, score_receipts, t_rollout, time.perf_counter() - t0 - t_rollout)
        return batch.stats

    def _learner_args(self, batch: Batch, scores: list | None, *args) -> list[tuple]:
        """Learner ``rank`` gets part ``rank`` of every rollout worker's output (refs only)."""
        scores = batch.scores() if scores is None and batch.score_refs else scores or []
        return [(*args, batch.trajectory_refs(rank), [parts[rank] for parts in scores])
                for rank in range(len(self.learners))]

    def train(self, batch: Batch, scores: list | None = None) -> dict[str, Any]:
        """One optimizer step on every learner rank; ``scores`` (``[worker][part]`` refs to
        TeacherScores, e.g. mixed from two teachers' ``batch.scores(name)``) replace the run's
        teacher's. Returns the step's learner metrics (sums over ranks divided once)."""
        return combine_learner_metrics(self.learners.call_each("train_step", self._learner_args(batch, scores, batch.step)))

    def evaluate(self, batch: Batch, metric: str = "loss", scores: list | None = None) -> float:
        """``loss`` (or ``divergence``) of the current student on a collected batch, without updating."""
        return ratio_metrics(self.learners.call_each("evaluate", self._learner_args(batch, scores)))[metric]
