"""Save and restore everything a run holds, so that a resume continues exactly.

A checkpoint after step ``s`` holds (see :mod:`sdft_ray.checkpoint` for the atomic layout):

* the learners' DeepSpeed state (weights, optimizer, scheduler, RNG) and the fp32 EMA teacher;
* the weights each role group held when they differ from the learner's (rollout weights synced
  every N > 1 steps, a teacher synced less often than the EMA moves): ``weights_<role>.safetensors``;
* the data position after the last *launched* batch, the step, the versions and the restarts;
* the batches in flight (``schedule.max_staleness = k > 0``): their trajectories and teacher
  scores, generated with weights older than the learner's, in ``inflight/``. A resume trains on
  exactly those instead of regenerating them with newer weights.

A resume refuses a config that changed in anything but the keys of :data:`RESUMABLE_CHANGES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdft_ray.checkpoint import read_state
from sdft_ray.config import RunConfig
from sdft_ray.errors import ConfigError
from sdft_ray.schedule import Batch
from sdft_ray.weights import WeightHandle

if TYPE_CHECKING:  # pragma: no cover
    from sdft_ray.controller import Controller
    from sdft_ray.roles import RoleGroup

#: config keys (dotted prefixes) that may differ between a checkpoint and the run resuming it
RESUMABLE_CHANGES = ("fault_tolerance", "output.progress", "output.log_every", "output.loggers", "output.run_name",
                     "output.project", "output.tags", "output.keep_last", "output.checkpoint_every",
                     "output.keep_best", "output.best_mode", "output.save_final", "output.dir", "output.show_answers",
                     "placement.strategy", "placement.node_resources", "placement.mode")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_config_keys(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Dotted keys whose value differs between a checkpoint's config and ``cfg`` (resumable ones excepted)."""
    old, new = _flatten(saved), _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    return [k for k in changed if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)]


def check_resume_config(checkpoint: Path, cfg: RunConfig, allow_changes: bool = False) -> None:
    saved = read_state(checkpoint).get("config")
    if saved is None or allow_changes:
        return
    changed = changed_config_keys(saved, cfg)
    if changed:
        old, new = _flatten(saved), _flatten(cfg.model_dump(mode="json"))
        detail = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in changed[:8])
        raise ConfigError(f"--resume {checkpoint}: the config changed since the checkpoint was written ({detail}). "
                          "Resume with the checkpoint's config (its state.json) or pass --allow-config-change "
                          "to continue with the new values (the run is then no longer exact)", field=changed[0])


def _snapshot(group: RoleGroup | None, learner_version: int) -> WeightHandle | None:
    """The group's weights, if they are not the learner's current ones."""
    if group is None or group.weights is None or group.version == learner_version:
        return None
    return group.weights


def save(ctl: Controller, in_flight: list[Batch], metrics: dict[str, Any] | None = None) -> Path:
    """Checkpoint the run after ``ctl.step``; ``in_flight`` batches are collected and kept."""
    for batch in in_flight:
        ctl.collect(batch)
    tmp = ctl.checkpoints.begin(ctl.step)
    groups = {"rollout": ctl.rollout, "teacher": ctl.teacher}
    snapshots = {role: h for role, g in groups.items() if (h := _snapshot(g, ctl.step)) is not None}
    ctl.learners.call("save_checkpoint", str(tmp), {"step": ctl.step}, snapshots)
    if in_flight:
        ctl.learners.call("save_batches", str(tmp), [
            {"step": b.step, "trajs": [refs[1:] for refs in b.rollout_refs],
             "scores": [[part[1] for part in parts] for parts in b.score_refs]} for b in in_flight])
    sampler = in_flight[-1].sampler_state if in_flight else ctl.sampler.state_dict()
    state = {"step": ctl.step, "sampler": sampler, "total_steps": ctl.total_steps,
             "restarts": {role: g.restarts for role, g in groups.items() if g is not None},
             "versions": {role: g.version for role, g in groups.items() if g is not None},
             "snapshots": {role: {"version": h.version, "kind": h.kind} for role, h in snapshots.items()},
             "in_flight": [{"step": b.step, "sampler_state": b.sampler_state, "stats": b.stats} for b in in_flight],
             "config": ctl.cfg.model_dump(mode="json")}
    keep_best = ctl.cfg.output.keep_best
    if keep_best and metrics and keep_best in metrics:
        state["best_metric"], state["best_value"] = keep_best, float(metrics[keep_best])
    return ctl.checkpoints.commit(tmp, ctl.step, json.loads(json.dumps(state, default=float)))


def restore(ctl: Controller, checkpoint: Path) -> list[Batch]:
    """Load a checkpoint into a started controller; returns the batches that were in flight."""
    state = read_state(checkpoint)
    ctl.learners.call("load_checkpoint", str(checkpoint))
    ctl.step = state["step"]
    ctl.sampler.load_state_dict(state["sampler"])
    snapshots = state.get("snapshots", {})
    for role in ("rollout", "teacher"):
        group: RoleGroup | None = getattr(ctl, role)
        if group is None:
            continue
        group.restarts = state.get("restarts", {}).get(role, 0)
        version = state.get("versions", {}).get(role, 0)
        if role in snapshots:  # the group held older weights than the learner's: exactly those
            meta = snapshots[role]
            group.push(WeightHandle(meta["version"], meta["kind"], "file",
                                    (str(checkpoint / f"weights_{role}.safetensors"),)))
        elif version > 0:  # the learner's current weights (version 0 = the model folder, as started)
            ctl.groups.push(group, version)
    if not state.get("in_flight"):
        return []
    payloads = {p["step"]: p for p in ctl.learners.call("load_batches", str(checkpoint))}
    batches = []
    for meta in state["in_flight"]:
        payload = payloads[meta["step"]]
        batches.append(Batch(step=meta["step"], shards=[], sampler_state=meta["sampler_state"], stats=meta["stats"],
                             rollout_refs=[[None, *parts] for parts in payload["trajs"]],
                             score_refs=[[[None, s] for s in parts] for parts in payload["scores"]]))
    return batches
