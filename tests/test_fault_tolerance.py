"""Lost rollout/teacher actors are restarted and their work re-issued; learner failures resume."""

from __future__ import annotations

from collections import Counter

import pytest
import ray

from conftest import tiny_config, write_facts
from sdft_ray.controller import Controller
from sdft_ray.runner import prepare, train

pytestmark = pytest.mark.slow


def test_killed_rollout_and_teacher_actors_lose_no_example(ray_local, tiny_model_dir, tmp_path):
    data = write_facts(tmp_path / "facts.jsonl", n=8)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run",
                      rollout={"num_workers": 2}, teacher={"num_workers": 1},
                      schedule={"prompts_per_step": 4, "max_steps": 6},  # 3 epochs of 8 examples
                      fault_tolerance={"max_actor_restarts": 3, "call_timeout_s": 120})
    prepared = prepare(cfg)
    ctl = Controller(cfg, prepared.model_folder, prepared.examples, cfg.output.dir)
    ctl.start()
    kills = []
    real_launch = ctl.launch

    def launch_then_kill(step):
        batch = real_launch(step)
        if step == 3:  # both actors die while step 3's generation and scoring are in flight
            ray.kill(ctl.rollout[1], no_restart=False)
            ray.kill(ctl.teacher[0], no_restart=False)
            kills.append(step)
        return batch

    ctl.launch = launch_then_kill
    try:
        summary = ctl.run()
    finally:
        ctl.shutdown()
    assert kills == [3]
    history = summary["history"]
    assert len(history) == 6
    assert history[-1]["restarts/rollout"] >= 1 and history[-1]["restarts/teacher"] >= 1
    assert all(h["sequences"] == 4 for h in history)
    for epoch in range(3):
        used = Counter(i for h in history[2 * epoch: 2 * epoch + 2] for i in h["examples"])
        assert used == Counter(range(8)), f"epoch {epoch}: {used}"
    # After the restarts the workers were re-synced: the step after the kill trained on-policy.
    assert all(h["staleness"] == 0 for h in history)


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
