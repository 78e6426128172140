"""The single controller: its loop reads like the algorithm.

    for each step:
        shards   = next prompts, split over rollout workers
        trajs    = rollout.generate(shard)            -> ObjectRefs (one per learner shard)
        scores   = teacher.score(traj)                 -> ObjectRefs
        metrics  = learners.train_step(trajs, scores)  (DeepSpeed data parallel; EMA update)
        every N steps: publish student -> rollout workers, teacher weights -> teacher group

The controller passes ``ObjectRef``s between roles and reads back only receipts and
metrics (small dataclasses), never trajectories or teacher scores. With
``schedule.max_staleness = k > 0`` up to ``k`` future batches are generated and scored
while the learners train (bounded off-policy); ``k = 0`` is the synchronous algorithm.
Lost or hung rollout/teacher actors are restarted, re-synced and their work re-issued.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group

from actors.group import ActorGroup
from actors.learner import LearnerWorker, teacher_signal_kind
from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer
from sdft_ray.checkpoint import CheckpointManager, read_state
from sdft_ray.config import RunConfig
from sdft_ray.data import EpochSampler
from sdft_ray.metrics import MetricsLogger, Progress
from sdft_ray.prompts import TokenizedExample
from sdft_ray.run_checks import TRUNCATION_WINDOW, TruncationWatch
from sdft_ray.trajectory import PromptShard, RolloutReceipt, Trajectories
from sdft_ray.variants import get_variant
from sdft_ray.weights import WeightHandle

log = logging.getLogger("sdft_ray")
ACTOR_FAILURES = (RayActorError, GetTimeoutError, RayTaskError)


class LearnerFailure(RuntimeError):
    """A learner rank failed: the step is abandoned; the run may resume from a checkpoint."""


class ActorRestartLimit(RuntimeError):
    pass


def total_steps(cfg: RunConfig, num_examples: int) -> int:
    if cfg.schedule.max_steps is not None:
        return cfg.schedule.max_steps
    return max(1, math.ceil(cfg.schedule.epochs * num_examples / cfg.schedule.prompts_per_step))


@dataclass
class Batch:
    """A launched step's work: references only, plus what is needed to re-issue it."""

    step: int
    shards: list[PromptShard]
    sampler_state: dict[str, Any]  # data position after this batch (for checkpoints)
    rollout_refs: list[list[ray.ObjectRef]] = field(default_factory=list)  # [worker] -> [receipt, part_0..]
    score_refs: list[list[ray.ObjectRef]] = field(default_factory=list)  # [worker] -> [(receipt, scores) per part]


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
        self.step = 0
        self.student_version = 0
        self.teacher_version = 0
        self.rollout_weights: WeightHandle | None = None  # what every rollout worker should hold
        self.teacher_weights: WeightHandle | None = None
        self.restarts = {"rollout": 0, "teacher": 0}
        self._stale_groups: set[str] = set()  # weight sync groups to rebuild (a member restarted)
        self._group_tokens: dict[str, list[str]] = {}  # role -> each member's membership token
        self._recovered: set[tuple[str, int]] = set()  # (role, index) restarted since its group was built
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.output.keep_last, cfg.output.best_mode)
        self.pg = None
        self.rollout = self.teacher = self.learners = None
        self.signal = teacher_signal_kind(cfg)

    # ---- actors ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg, pc = self.cfg, self.cfg.placement
        generating = self.variant.uses_rollout
        roles = [("rollout", cfg.rollout.num_workers if generating else 0, pc.rollout),
                 ("teacher", cfg.teacher.num_workers if generating else 0, pc.teacher),
                 ("learner", cfg.learner.num_workers, pc.learner)]
        bundles = []
        for role, count, res in roles:
            bundle = {"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}
            bundle.update(pc.node_resources.get(role, {}))
            bundles += [dict(bundle) for _ in range(count)]
        self.pg = placement_group(bundles, strategy=pc.strategy)
        try:
            ray.get(self.pg.ready(), timeout=cfg.fault_tolerance.call_timeout_s)
        except GetTimeoutError:
            raise RuntimeError(
                f"placement group {bundles} could not be scheduled on cluster resources "
                f"{ray.cluster_resources()}: lower placement.*.num_cpus/num_gpus or add nodes") from None
        restarts = cfg.fault_tolerance.max_actor_restarts
        common = dict(dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        cfg_dict = cfg.model_dump(mode="json")
        first_learner = roles[0][1] + roles[1][1]
        self.learners = ActorGroup(
            "learner", LearnerWorker, cfg.learner.num_workers, self.pg, first_learner, pc.learner,
            lambda i: ((i, cfg.learner.num_workers, cfg_dict, self.model_folder, self.total_steps), {}))
        addr, port = ray.get(self.learners[0].address.remote(), timeout=cfg.fault_tolerance.call_timeout_s)
        setup = self.learners.call("setup", addr, port)
        if not generating:
            self._get(setup)
            return
        self.rollout = ActorGroup(
            "rollout", RolloutWorker, cfg.rollout.num_workers, self.pg, 0, pc.rollout,
            lambda i: ((i, self.model_folder, cfg.rollout.engine), dict(
                batch_size=cfg.rollout.batch_size, engine_options=cfg.rollout.vllm,
                resources=pc.rollout.model_dump(), **common)),
            max_restarts=restarts)
        self.teacher = ActorGroup(
            "teacher", TeacherScorer, cfg.teacher.num_workers, self.pg, cfg.rollout.num_workers, pc.teacher,
            lambda i: ((i, self.teacher_folder, cfg.model.dtype, self.signal, cfg.loss.top_k,
                        cfg.teacher.micro_batch_size), dict(
                transfer_dtype=cfg.teacher.transfer_dtype, trust_remote_code=cfg.model.trust_remote_code,
                resources=pc.teacher.model_dump(), run_config=cfg_dict, engine=cfg.teacher.engine,
                engine_options=cfg.teacher.vllm)),
            max_restarts=restarts)
        self._get(setup + self.rollout.call("ready") + self.teacher.call("ready"))
        if self.collective:
            for role in ("rollout", "teacher"):
                self.join_sync_group(role)

    def shutdown(self) -> None:
        for group in (self.rollout, self.teacher, self.learners):
            if group is not None:
                group.kill()
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.rollout = self.teacher = self.learners = self.pg = None

    def _get(self, refs):
        """ray.get with the configured time-out; every controller read goes through here."""
        return ray.get(refs, timeout=self.cfg.fault_tolerance.call_timeout_s)

    # ---- weight sync -------------------------------------------------------------------------
    @property
    def collective(self) -> bool:
        return self.cfg.weight_sync.transport == "collective"

    def join_sync_group(self, role: str) -> None:
        """(Re)build the sync group of ``role``: learner rank 0 + every actor of the role."""
        group = self.rollout if role == "rollout" else self.teacher
        addr, port = self._get(self.learners[0].address.remote())
        args = (addr, port)
        # Collectives give up after half the call time-out, so that a broadcast stuck on a lost
        # member fails (and is finished another way) before the controller's own wait does.
        opts = (len(group) + 1, self.cfg.weight_sync.backend, self.cfg.fault_tolerance.call_timeout_s / 2)
        infos = self._get([self.learners[0].join_sync_group.remote(role, *args, 0, *opts)]
                          + [group[i].join_sync_group.remote(role, *args, i + 1, *opts) for i in range(len(group))])
        self._group_tokens[role] = [info["token"] for info in infos[1:]]
        self._stale_groups.discard(role)
        self._recovered = {(r, i) for r, i in self._recovered if r != role}

    def _ensure_sync_group(self, role: str) -> None:
        """Before a broadcast: every member must still hold the membership it joined with. An actor
        that Ray restarted since (even while idle) has none; a broadcast would then wait for it
        until the time-out, so recover it and rebuild the group first."""
        group = self.rollout if role == "rollout" else self.teacher
        refs = [group[i].sync_group_token.remote(role) for i in range(len(group))]
        joined = self._group_tokens.get(role, [None] * len(group))
        for i, ref in enumerate(refs):
            try:
                token = self._get(ref)
            except (RayActorError, GetTimeoutError) as exc:
                self._recover(role, i, exc)
                token = None
            else:
                # Restarted while idle (not seen by collect): count it and hand it the weights.
                if token != joined[i] and (role, i) not in self._recovered:
                    self._recover(role, i, RuntimeError("restarted: lost its weight sync group membership"))
            if token != joined[i]:
                self._stale_groups.add(role)
        if role in self._stale_groups:
            self.join_sync_group(role)

    def _publish(self, kind: str, version: int, group: str | None = None) -> WeightHandle:
        handles = self._get(self.learners.call("publish", kind, version, group))
        return handles[0]

    def _push(self, role: str, kind: str, version: int) -> None:
        """Publish ``kind`` weights as ``version`` and load them into every actor of ``role``
        (``self.<role>_weights`` names them). An actor lost during the update is restarted and
        given them again; under ``collective``, a broadcast broken by a lost member is finished
        through the object store for the members that did not get it, and the group is rebuilt."""
        group = self.rollout if role == "rollout" else self.teacher
        if self.collective:
            self._ensure_sync_group(role)
        handle = self._publish(kind, version, role if self.collective else None)
        setattr(self, f"{role}_weights", handle)  # what _recover hands a restarted actor
        sending = self.learners[0].send_weights.remote(role) if self.collective else None
        updates = group.call("update_weights", handle)
        broken = False
        for i, ref in enumerate(updates):
            try:
                self._get(ref)
            except (RayActorError, GetTimeoutError) as exc:  # lost or hung: restart, re-send
                self._recover(role, i, exc)
                broken = True
            except RayTaskError as exc:  # alive, but its end of the broadcast failed
                if not self.collective:
                    raise
                log.warning("%s actor %d missed the weight broadcast (%s); sending through the object store",
                            role, i, str(exc).strip().splitlines()[-1][:300])
                self._get(group[i].update_weights.remote(self._get(self.learners[0].republish.remote(role))))
                broken = True
        if sending is not None:
            try:
                self._get(sending)
            except RayTaskError:
                if not broken:
                    raise  # the sender failed on its own: a learner problem, not a lost receiver
        if broken and self.collective:
            self._stale_groups.add(role)

    def sync_rollout(self) -> None:
        if self.rollout is None:
            return
        self._push("rollout", "student", self.student_version)

    def sync_teacher(self, version: int | None = None) -> None:
        if self.teacher is None:
            return
        kind = "teacher" if self.cfg.teacher.kind == "ema" else "student"
        self.teacher_version = self.student_version if version is None else version
        self._push("teacher", kind, self.teacher_version)

    # ---- one batch ---------------------------------------------------------------------------
    def _sampling(self) -> dict:
        rc = self.cfg.rollout
        topk = self.cfg.loss.top_k if self.signal == "topk_student" else 0
        return dict(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p, topk_logprobs=topk)

    def make_shard(self, step: int, picks: list[tuple[int, int]]) -> PromptShard:
        rows = [self.examples[i] for _, i in picks]
        return PromptShard(
            step=step, seed=self.cfg.schedule.seed * 1_000_003 + step,
            example_index=np.array([i for _, i in picks], dtype=np.int64),
            epoch=np.array([e for e, _ in picks], dtype=np.int64),
            prompt_ids=[np.asarray(r.prompt_ids, dtype=np.int64) for r in rows],
            teacher_prompt_ids=[np.asarray(r.teacher_prompt_ids, dtype=np.int64) for r in rows],
            contexts=[self.contexts[r.index] for r in rows] if self.contexts is not None else None,
        )

    def launch(self, step: int) -> Batch:
        """Take the next prompts from the data stream and start generating and scoring them."""
        picks = self.sampler.next_batch(self.cfg.schedule.prompts_per_step)
        return self.launch_picks(step, picks, self.sampler.state_dict())

    def launch_picks(self, step: int, picks: list[tuple[int, int]], sampler_state: dict | None = None) -> Batch:
        """Start rollout + scoring for given (epoch, example) pairs (also used for fixed probe batches)."""
        if not self.variant.uses_rollout:
            return self._demonstration_batch(step, picks, sampler_state)
        shards = self.make_shard(step, picks).split(self.cfg.rollout.num_workers)
        batch = Batch(step=step, shards=shards, sampler_state=sampler_state or {})
        for w in range(len(shards)):
            batch.rollout_refs.append(self._launch_rollout(batch, w))
            batch.score_refs.append(self._launch_scores(batch, w))
        return batch

    def _demonstration_batch(self, step: int, picks, sampler_state) -> Batch:
        """SFT: the demonstrations are the responses; put one part per learner into the object store."""
        shard = self.make_shard(step, picks)
        responses = [np.asarray(self.targets[self.examples[i].index], dtype=np.int64) for _, i in picks]
        traj = Trajectories(
            step=step, policy_version=self.student_version, example_index=shard.example_index, epoch=shard.epoch,
            sample_index=np.zeros(len(picks), dtype=np.int64), prompt_ids=shard.prompt_ids,
            teacher_prompt_ids=shard.teacher_prompt_ids, response_ids=responses,
            rollout_logprobs=[np.zeros(len(r), dtype=np.float32) for r in responses],
            finished=np.ones(len(picks), dtype=bool))
        tokens = sum(len(r) for r in responses)
        receipt = RolloutReceipt(worker=-1, step=step, policy_version=self.student_version, sequences=len(traj),
                                 response_tokens=tokens, mean_response_len=tokens / max(len(traj), 1),
                                 finished_fraction=1.0, seconds=0.0, example_index=[int(i) for _, i in picks])
        parts = [ray.put(p) for p in traj.split(self.cfg.learner.num_workers)]
        return Batch(step=step, shards=[shard], sampler_state=sampler_state or {},
                     rollout_refs=[[ray.put(receipt), *parts]], score_refs=[])

    def _launch_rollout(self, batch: Batch, worker: int) -> list[ray.ObjectRef]:
        parts = self.cfg.learner.num_workers
        return list(self.rollout[worker].generate.options(num_returns=1 + parts).remote(
            batch.shards[worker], parts, self._sampling(), self.cfg.rollout.num_samples))

    def _teacher_for(self, worker: int, part: int) -> int:
        return (worker * self.cfg.learner.num_workers + part) % self.cfg.teacher.num_workers

    def _launch_scores(self, batch: Batch, worker: int, parts: list[int] | None = None) -> list:
        parts = range(self.cfg.learner.num_workers) if parts is None else parts
        out = []
        for part in parts:
            scorer = self.teacher[self._teacher_for(worker, part)]
            out.append(list(scorer.score.options(num_returns=2).remote(batch.rollout_refs[worker][1 + part])))
        return out

    def _recover(self, role: str, index: int, error: Exception) -> None:
        """Bring a rollout/teacher actor back (Ray restarts it), re-push the weights it should hold."""
        self.restarts[role] += 1
        if self.restarts[role] > self.cfg.fault_tolerance.max_actor_restarts:
            raise ActorRestartLimit(f"{role} actor {index} failed {self.restarts[role]} times; last error: {error}")
        group = self.rollout if role == "rollout" else self.teacher
        log.warning("%s actor %d failed (%s); restarting and re-issuing its work", role, index, type(error).__name__)
        if isinstance(error, GetTimeoutError):  # hung: kill so that Ray restarts it
            ray.kill(group[index], no_restart=False)
        deadline = time.monotonic() + self.cfg.fault_tolerance.call_timeout_s
        while True:
            try:
                ray.get(group[index].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self._recovered.add((role, index))
        weights = self.rollout_weights if role == "rollout" else self.teacher_weights
        if weights is not None and weights.transport == "collective":
            # The restarted actor left its sync group: rebuild the group before the next sync,
            # and hand this one actor the group's current weights through the object store.
            self._stale_groups.add(role)
            weights = self._get(self.learners[0].republish.remote(role))
        if weights is not None:
            ray.get(group[index].update_weights.remote(weights), timeout=self.cfg.fault_tolerance.call_timeout_s)

    def collect(self, batch: Batch) -> dict[str, Any]:
        """Wait for a batch's receipts, re-issuing lost work; returns rollout/teacher stats."""
        t0 = time.perf_counter()
        receipts = []
        for w in range(len(batch.shards)):
            while True:
                try:
                    receipts.append(self._get(batch.rollout_refs[w][0]))
                    break
                except ACTOR_FAILURES as exc:
                    self._recover("rollout", w, exc)
                    batch.rollout_refs[w] = self._launch_rollout(batch, w)
                    batch.score_refs[w] = self._launch_scores(batch, w)
        t_rollout = time.perf_counter() - t0
        score_receipts = []
        for w in range(len(batch.score_refs)):
            for part in range(self.cfg.learner.num_workers):
                while True:
                    try:
                        score_receipts.append(self._get(batch.score_refs[w][part][0]))
                        break
                    except ACTOR_FAILURES as exc:
                        self._recover("teacher", self._teacher_for(w, part), exc)
                        batch.score_refs[w][part] = self._launch_scores(batch, w, [part])[0]
        tokens = sum(r.response_tokens for r in receipts)
        seqs = sum(r.sequences for r in receipts)
        return {
            "rollout/response_len": tokens / max(seqs, 1),
            "rollout/finished_fraction": sum(r.finished_fraction * r.sequences for r in receipts) / max(seqs, 1),
            "rollout/tokens": tokens,
            "rollout/policy_version_min": min(r.policy_version for r in receipts),
            "teacher/version_min": min((r.teacher_version for r in score_receipts), default=-1),
            "time/rollout_wait": t_rollout,
            "time/teacher_wait": time.perf_counter() - t0 - t_rollout,
            "time/rollout_busy": max(r.seconds for r in receipts),
            "time/teacher_busy": sum((r.seconds for r in score_receipts), 0.0),
            "examples": sorted(i for r in receipts for i in r.example_index),
        }

    def _learner_calls(self, method: str, batch: Batch, *args) -> list[ray.ObjectRef]:
        """Learner ``rank`` gets part ``rank`` of every rollout worker's output (refs only)."""
        calls = []
        for rank in range(self.cfg.learner.num_workers):
            trajs = [batch.rollout_refs[w][1 + rank] for w in range(len(batch.rollout_refs))]
            scores = [batch.score_refs[w][rank][1] for w in range(len(batch.score_refs))]
            calls.append(getattr(self.learners[rank], method).remote(*args, trajs, scores))
        return calls

    def evaluate(self, batch: Batch, metric: str = "loss") -> float:
        """``loss`` (or ``divergence``) of the current student on a collected batch, without updating."""
        results = self._get(self._learner_calls("evaluate", batch))
        return sum(r[metric] * r["count"] for r in results) / max(sum(r["count"] for r in results), 1.0)

    def train_on(self, batch: Batch) -> dict[str, Any]:
        calls = self._learner_calls("train_step", batch, batch.step)
        try:
            per_rank = self._get(calls)
        except ACTOR_FAILURES as exc:
            raise LearnerFailure(f"learner failed at step {batch.step}: {exc}") from exc
        return aggregate_learner_metrics(per_rank)

    # ---- the loop ----------------------------------------------------------------------------
    def restore(self, checkpoint: Path) -> dict[str, Any]:
        state = read_state(checkpoint)
        self._get(self.learners.call("load_checkpoint", str(checkpoint)))
        self.step = state["step"]
        self.student_version = state["student_version"]
        self.sampler.load_state_dict(state["sampler"])
        self.restarts = state.get("restarts", self.restarts)
        snapshots = state.get("snapshots", {})
        if "rollout" in snapshots:  # the rollout workers held older weights than the learner's
            self.rollout_weights = self._snapshot_handle(checkpoint, "rollout", snapshots["rollout"])
            self._get(self.rollout.call("update_weights", self.rollout_weights))
        elif state.get("rollout_version", 0) > 0:  # version 0 = the model folder, as freshly started
            self.sync_rollout()
        if "teacher" in snapshots:
            self.teacher_version = snapshots["teacher"]["version"]
            self.teacher_weights = self._snapshot_handle(checkpoint, "teacher", snapshots["teacher"])
            self._get(self.teacher.call("update_weights", self.teacher_weights))
        elif self.cfg.teacher.kind != "frozen" and state["teacher_version"] > 0:
            self.sync_teacher(state["teacher_version"])
        return state

    @staticmethod
    def _snapshot_handle(checkpoint: Path, name: str, meta: dict) -> WeightHandle:
        return WeightHandle(meta["version"], meta["kind"], "file", (str(checkpoint / f"weights_{name}.safetensors"),))

    def save(self, sampler_state: dict[str, Any], metrics: dict[str, Any] | None = None) -> Path:
        tmp = self.checkpoints.begin(self.step)
        client = {"step": self.step}
        snapshots = {}
        if self.rollout_weights is not None and self.rollout_weights.version != self.student_version:
            snapshots["rollout"] = self.rollout_weights
        if self.teacher_weights is not None and self.teacher_version != self.student_version:
            snapshots["teacher"] = self.teacher_weights
        self._get(self.learners.call("save_checkpoint", str(tmp), client, snapshots))
        state = {"step": self.step, "student_version": self.student_version, "teacher_version": self.teacher_version,
                 "rollout_version": self.rollout_weights.version if self.rollout_weights else 0,
                 "sampler": sampler_state, "restarts": self.restarts, "total_steps": self.total_steps,
                 "snapshots": {k: {"version": h.version, "kind": h.kind} for k, h in snapshots.items()},
                 "config": self.cfg.model_dump(mode="json")}
        if self.cfg.output.keep_best and metrics and self.cfg.output.keep_best in metrics:
            state["best_metric"] = self.cfg.output.keep_best
            state["best_value"] = float(metrics[self.cfg.output.keep_best])
        return self.checkpoints.commit(tmp, self.step, state)

    def run(self, resume: Path | None = None, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or ``stop_after`` more steps); returns a summary."""
        cfg = self.cfg
        self.checkpoints.clean_partial()
        if resume is not None:
            self.restore(resume)
        metrics_log = MetricsLogger(self.run_dir, cfg.output.tensorboard,
                                    resume_step=self.step if resume is not None else None)
        progress = Progress(self.total_steps, cfg.output.progress, start=self.step)
        pending: deque[Batch] = deque()
        next_launch = self.step + 1
        last_step = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        history: list[dict[str, Any]] = []
        truncation = TruncationWatch(cfg.rollout.max_new_tokens, window=min(TRUNCATION_WINDOW, self.total_steps))
        run_start = time.perf_counter()
        try:
            while self.step < last_step:
                while next_launch <= last_step and len(pending) <= cfg.schedule.max_staleness:
                    pending.append(self.launch(next_launch))
                    next_launch += 1
                queued = len(pending) - 1  # batches generated/scored ahead of this one
                batch = pending.popleft()
                step_start = time.perf_counter()
                stats = self.collect(batch)
                t_learn = time.perf_counter()
                learned = self.train_on(batch)
                self.step = batch.step
                self.student_version = self.step
                t_sync = time.perf_counter()
                if self.step % cfg.rollout.sync_every == 0:
                    self.sync_rollout()
                if cfg.teacher.kind != "frozen" and self.step % cfg.teacher.sync_every == 0:
                    self.sync_teacher()
                t_end = time.perf_counter()
                staleness = (self.step - 1) - learned["policy_version_min"]
                bound = cfg.schedule.max_staleness + cfg.rollout.sync_every - 1
                if staleness > bound:
                    raise AssertionError(f"step {self.step}: trajectory staleness {staleness} exceeds the bound {bound}")
                record = {
                    **{k: v for k, v in learned.items() if k != "policy_version_min"},
                    **stats,
                    "staleness": staleness,
                    "queue/batches_ahead": queued,
                    "student_version": self.student_version,
                    "teacher_version": self.teacher_version,
                    "epoch": batch.sampler_state["position"] / max(len(self.examples), 1),
                    "time/learner": t_sync - t_learn,
                    "time/sync": t_end - t_sync,
                    "time/step": t_end - step_start,
                    "throughput/tokens_per_s": stats["rollout/tokens"] / max(t_end - step_start, 1e-9),
                    "restarts/rollout": self.restarts["rollout"],
                    "restarts/teacher": self.restarts["teacher"],
                }
                if warning := truncation.observe(self.step, record["rollout/finished_fraction"]):
                    log.warning(warning)
                if cfg.output.checkpoint_every and self.step % cfg.output.checkpoint_every == 0 or (
                        cfg.output.save_final and self.step == self.total_steps):
                    t_ckpt = time.perf_counter()
                    record["checkpoint"] = str(self.save(batch.sampler_state, record))
                    record["time/checkpoint"] = time.perf_counter() - t_ckpt
                metrics_log.log(self.step, record)
                history.append(record)
                progress.update(self.step, f"loss {record['loss']:.4f}")
        finally:
            progress.close()
            metrics_log.close()
        seconds = time.perf_counter() - run_start
        utilisation = utilisation_summary(history, seconds)
        if history and cfg.output.progress:
            print_utilisation(utilisation)
        return {"steps": self.step, "seconds": seconds, "history": history, "utilisation": utilisation,
                "latest_checkpoint": str(self.checkpoints.latest() or "")}


def utilisation_summary(history: list[dict[str, Any]], wall_seconds: float) -> dict[str, dict[str, float]]:
    """Busy seconds per role over the run, and the share of wall-clock time each role was busy."""
    out = {}
    for role, key in (("rollout", "time/rollout_busy"), ("teacher", "time/teacher_busy"),
                      ("learner", "time/learner_busy"), ("weight sync", "time/sync"), ("checkpoint", "time/checkpoint")):
        busy = sum(h.get(key, 0.0) for h in history)
        out[role] = {"busy_s": busy, "utilisation": busy / wall_seconds if wall_seconds else 0.0,
                     "idle_s": max(0.0, wall_seconds - busy)}
    return out


def print_utilisation(summary: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="time per role (busy = working on this run's batches)")
    for column in ("role", "busy s", "idle s", "busy share of wall clock"):
        table.add_column(column)
    for role, row in summary.items():
        table.add_row(role, f"{row['busy_s']:.1f}", f"{row['idle_s']:.1f}", f"{100 * row['utilisation']:.0f}%")
    Console(stderr=True).print(table)


def aggregate_learner_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the ranks' per-sequence sums into global means."""
    seqs = sum(m["sequences"] for m in per_rank)
    out: dict[str, Any] = {}
    for key in per_rank[0]:
        if key.endswith("_sum"):
            name = key[: -len("_sum")]
            total = sum(m.get(key, 0.0) for m in per_rank)
            out[name] = total if name == "masked_tokens" else total / max(seqs, 1)
    out["sequences"] = seqs
    out["response_tokens"] = sum(m["response_tokens"] for m in per_rank)
    out["grad_norm"] = per_rank[0]["grad_norm"]
    out["lr"] = per_rank[0]["lr"]
    out["policy_version_min"] = min(m["policy_version_min"] for m in per_rank)
    out["time/learner_busy"] = max(m["seconds"] for m in per_rank)
    if "ema_seconds" in per_rank[0]:
        out["time/ema"] = per_rank[0]["ema_seconds"]
    return out
