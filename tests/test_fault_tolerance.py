"""Lost rollout/teacher actors are restarted (counted once each), re-synced and their work re-issued,
whether they die busy or idle, for both weight transports; an actor's own error stops the run;
learner failures resume from the last checkpoint."""

from __future__ import annotations

import sys
import time
from collections import Counter

import pytest
import ray
import ray.cloudpickle as ray_cloudpickle

from actors.rollout import RolloutWorker
from conftest import tiny_config, write_facts
from sdft_ray.controller import Controller
from sdft_ray.errors import ActorApplicationError
from sdft_ray.groups import RunGroups
from sdft_ray.runner import prepare, train

pytestmark = pytest.mark.slow
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


def started(cfg) -> Controller:
    prepared = prepare(cfg)
    ctl = Controller(cfg, prepared.model_folder, prepared.examples, cfg.output.dir)
    ctl.start()
    return ctl


def kill_and_wait_for_restart(handles) -> None:
    """Kill actors and wait until Ray has brought each back (a new incarnation answers ready())."""
    before = [ray.get(h.ready.remote(), timeout=60)["incarnation"] for h in handles]
    for handle in handles:
        ray.kill(handle, no_restart=False)
    for handle, old in zip(handles, before):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if ray.get(handle.ready.remote(), timeout=60)["incarnation"] != old:
                    break
            except ray.exceptions.RayActorError:
                time.sleep(0.2)
        else:
            raise AssertionError("actor not restarted")


@pytest.mark.parametrize("transport", ["object_store", "collective"])
@pytest.mark.parametrize("when", ["busy", "idle"])
def test_killed_rollout_and_teacher_actors_lose_no_example(ray_local, tiny_model_dir, tmp_path, when, transport):
    """One rollout worker and the teacher die at step 3, either with that step's generation and
    scoring in flight (busy: the teacher has two scoring calls queued) or between steps 2 and 3
    (idle: nobody is waiting on them, so only the weight version and incarnation checks can tell).
    Each counts exactly one restart, and step 3 is generated and scored with the weights of
    version 2 - not the base model's that a restarted actor starts with."""
    data = write_facts(tmp_path / "facts.jsonl", n=8)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run",
                      rollout={"num_workers": 2}, teacher={"num_workers": 1, "kind": "ema", "ema_rate": 0.1},
                      schedule={"prompts_per_step": 4, "max_steps": 6},  # 3 epochs of 8 examples
                      weight_sync={"transport": transport},
                      fault_tolerance={"max_actor_restarts": 3, "call_timeout_s": 120})
    ctl = started(cfg)
    kills = []
    if when == "busy":
        real_launch = ctl.launch

        def launch_then_kill(step):
            batch = real_launch(step)
            if step == 3:
                ray.kill(ctl.rollout[1], no_restart=False)
                ray.kill(ctl.teacher[0], no_restart=False)
                kills.append(step)
            return batch

        ctl.launch = launch_then_kill
    else:
        real_sync = ctl.sync_weights

        def sync_then_kill():
            real_sync()
            if ctl.step == 2:
                ctl.rollout.drain(), ctl.teacher.drain()  # version 2 delivered: they are idle now
                kill_and_wait_for_restart([ctl.rollout[1], ctl.teacher[0]])
                kills.append(ctl.step + 1)

        ctl.sync_weights = sync_then_kill
    try:
        history = ctl.run()["history"]
        held = [ray.get(ctl.rollout[i].ready.remote())["version"] for i in range(2)]
    finally:
        ctl.shutdown()
    assert kills == [3]
    assert [h["restarts/rollout"] for h in history] == [0, 0, 1, 1, 1, 1]
    assert [h["restarts/teacher"] for h in history] == [0, 0, 1, 1, 1, 1]
    assert [h["rollout/policy_version_min"] for h in history] == [0, 1, 2, 3, 4, 5]
    assert [h["teacher/version_min"] for h in history] == [0, 1, 2, 3, 4, 5]
    assert all(h["sequences"] == 4 and h["staleness"] == 0 for h in history)
    assert held == [6, 6]
    for epoch in range(3):
        used = Counter(i for h in history[2 * epoch: 2 * epoch + 2] for i in h["examples"])
        assert used == Counter(range(8)), f"epoch {epoch}: {used}"


class BrokenRollout(RolloutWorker):
    """A rollout worker whose own code fails at step 2 (a bug, bad input): not a lost actor."""

    def generate(self, shard, *args, **kwargs):
        if shard.step == 2:
            raise ValueError("tokenizer exploded on row 3")
        return super().generate(shard, *args, **kwargs)


def test_an_actor_error_stops_the_run_with_its_traceback(ray_local, tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(RunGroups, "rollout_actor", BrokenRollout)
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", schedule={"max_steps": 3},
                      fault_tolerance={"max_actor_restarts": 3, "call_timeout_s": 120})
    ctl = started(cfg)
    try:
        with pytest.raises(ActorApplicationError, match="tokenizer exploded on row 3"):
            ctl.run()
        assert ctl.rollout.restarts == 0
        info = ray.get(ctl.rollout[0].ready.remote())
        assert info["weight_updates"] == 1  # the push after step 1 only: no re-sync, no retry
    finally:
        ctl.shutdown()


def test_learner_failure_resumes_from_last_checkpoint(ray_local, tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run",
                      schedule={"prompts_per_step": 4, "max_steps": 4},
                      output={"checkpoint_every": 2},
                      fault_tolerance={"max_run_restarts": 1, "call_timeout_s": 120})
    killed = []
    real_train_on = Controller.train_on

    def train_on(self, batch):
        if batch.step == 3 and not killed:
            killed.append(batch.step)
            ray.kill(self.learners[0], no_restart=True)
        return real_train_on(self, batch)

    monkeypatch.setattr(Controller, "train_on", train_on)
    summary = train(cfg)
    assert killed == [3]
    assert summary["steps"] == 4
    # The second attempt resumed from the step-2 checkpoint and ran steps 3 and 4.
    assert [h["student_version"] for h in summary["history"]] == [3, 4]
