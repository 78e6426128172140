"""Exact resume after killing the training process, and checkpoints that survive an interrupted write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdft_ray.checkpoint import CheckpointManager, read_state
from sdft_ray.metrics import read_metrics
from sdft_ray.runner import REPO_ROOT


def write_run_config(path: Path, model_dir: Path, data: Path, out: Path, steps: int, max_staleness: int = 0,
                     mode: str = "disaggregated") -> Path:
    tree = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data)},
        "rollout": {"num_workers": 1, "max_new_tokens": 8, "batch_size": 8, "sync_every": 1},
        # Teacher synced every 2 steps: a resume must restore the teacher weights as they were.
        "teacher": {"num_workers": 1, "micro_batch_size": 8, "kind": "ema", "ema_rate": 0.1, "sync_every": 2},
        "learner": {"num_workers": 1, "lr": 1e-2, "micro_batch_size": 4},
        "schedule": {"prompts_per_step": 4, "max_steps": steps, "seed": 3, "max_staleness": max_staleness},
        "placement": {"mode": mode, **{r: {"num_cpus": 0.5, "torch_threads": 1} for r in ("rollout", "teacher", "learner")}},
        "output": {"dir": str(out), "checkpoint_every": 1, "keep_last": 10, "loggers": ["jsonl"], "progress": "off"},
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdft_ray.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""}


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    return load_file(str(latest / "student" / "model.safetensors"))


def assert_same_run(full_dir: Path, cut_dir: Path, steps: int) -> None:
    full, cut = losses_by_step(full_dir), losses_by_step(cut_dir)
    assert sorted(cut) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert cut[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7), (step, cut, full)
    a, b = final_weights(full_dir), final_weights(cut_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_kill_and_resume_matches_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path, mode):
    """SIGKILL the training process tree after step 3 of 10 with two batches in flight
    (``max_staleness: 2``): ``--resume latest`` trains on exactly the batches the uninterrupted run
    generated ahead (kept in the checkpoint), so every loss and the final weights are the same -
    with the roles in actors of their own and with one actor holding them all (``colocated``).
    (10 steps: a colocated tiny-model step takes well under a second, and with 5 the run could
    finish between the poll and the kill.)"""
    steps, kill_after, staleness = 10, 3, 2
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_cfg = write_run_config(tmp_path / "full.yaml", tiny_model_dir, tiny_data, full_dir, steps, staleness, mode)
    cut_cfg = write_run_config(tmp_path / "cut.yaml", tiny_model_dir, tiny_data, cut_dir, steps, staleness, mode)
    subprocess.run(cli("train", str(full_cfg)), check=True, env=env(), cwd=REPO_ROOT, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = subprocess.Popen(cli("train", str(cut_cfg)), env=env(), cwd=REPO_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    metrics = cut_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(read_metrics(metrics)) >= kill_after:
            break
        assert proc.poll() is None, "training exited before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the actors it started
    proc.wait()
    killed_at = CheckpointManager(cut_dir / "checkpoints").latest()
    state = read_state(killed_at)
    assert kill_after <= state["step"] < steps
    assert [b["step"] for b in state["in_flight"]] == list(range(state["step"] + 1, min(state["step"] + staleness, steps) + 1))

    subprocess.run(cli("train", str(cut_cfg), "--resume", "latest"), check=True, env=env(), cwd=REPO_ROOT,
                   timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert_same_run(full_dir, cut_dir, steps)


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_stop_and_resume_in_process_is_exact(ray_local, tiny_model_dir, tiny_data, tmp_path, staleness):
    """The same, without a new process: stop after step 2 (in-flight work dropped with the actors),
    resume from the checkpoint in a new controller."""
    from sdft_ray.config import load_config
    from sdft_ray.runner import prepare

    steps = 4

    def run(out: Path, stop_after=None, resume=None):
        cfg = load_config(write_run_config(tmp_path / f"{out.name}.yaml", tiny_model_dir, tiny_data, out, steps,
                                           staleness))
        ctl = prepare(cfg).controller()
        ctl.start()
        try:
            ctl.run(resume=resume, stop_after=stop_after)
        finally:
            ctl.shutdown()

    run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=2)
    checkpoint = CheckpointManager(tmp_path / "cut" / "checkpoints").latest()
    assert read_state(checkpoint)["step"] == 2 and len(read_state(checkpoint)["in_flight"]) == staleness
    run(tmp_path / "cut", resume=checkpoint)
    assert_same_run(tmp_path / "full", tmp_path / "cut", steps)


def test_resume_refuses_a_changed_config(tmp_path):
    from sdft_ray.checkpointing import changed_config_keys, check_resume_config
    from sdft_ray.config import config_from_dict
    from sdft_ray.errors import ConfigError

    base = {"learner": {"lr": 1e-3}, "output": {"dir": str(tmp_path / "run")}}
    cfg = config_from_dict(base)
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints")
    ckpt = mgr.commit(mgr.begin(1), 1, {"step": 1, "config": cfg.model_dump(mode="json")})
    check_resume_config(ckpt, cfg)  # unchanged: fine
    moved = config_from_dict({**base, "fault_tolerance": {"call_timeout_s": 5}, "output": {"dir": "elsewhere"}})
    assert changed_config_keys(read_state(ckpt)["config"], moved) == []  # operational keys may change
    changed = config_from_dict({**base, "learner": {"lr": 2e-3}, "loss": {"alpha": 1.0}})
    with pytest.raises(ConfigError, match=r"learner.lr: 0.001 -> 0.002.*loss.alpha: 0.0 -> 1.0") as err:
        check_resume_config(ckpt, changed)
    assert err.value.field == "learner.lr" and "--allow-config-change" in str(err.value)
    check_resume_config(ckpt, changed, allow_changes=True)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path):
    """A process killed half-way through writing checkpoint 2 leaves checkpoint 1 intact and loadable."""
    root = tmp_path / "checkpoints"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pathlib import Path
        from safetensors.torch import save_file
        from sdft_ray.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(root)!r}, keep_last=2)
        for step in (1, 2):
            tmp = mgr.begin(step)
            (tmp / "student").mkdir()
            save_file({{"w": torch.full((256, 256), float(step))}}, str(tmp / "student" / "model.safetensors"))
            if step == 2:  # die after the weights, before the state file and the rename
                os.kill(os.getpid(), signal.SIGKILL)
            mgr.commit(tmp, step, {{"step": step}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO_ROOT)
    assert proc.returncode == -signal.SIGKILL
    mgr = CheckpointManager(root)
    latest = mgr.latest()
    assert latest is not None and latest.name == "step-00000001"
    assert read_state(latest)["step"] == 1
    assert load_file(str(latest / "student" / "model.safetensors"))["w"].eq(1.0).all()
    assert [p.name for p in mgr.complete()] == ["step-00000001"]
    removed = mgr.clean_partial()
    assert len(removed) == 1 and removed[0].name.startswith(".tmp-step-00000002")


def test_commit_is_atomic_when_state_write_fails(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path / "c", keep_last=3)
    mgr.commit(mgr.begin(1), 1, {"step": 1})
    import sdft_ray.checkpoint as ck

    def boom(path, text):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "atomic_write_text", boom)
    with pytest.raises(OSError):
        mgr.commit(mgr.begin(2), 2, {"step": 2})
    monkeypatch.undo()
    assert mgr.latest().name == "step-00000001"
    assert (tmp_path / "c" / "latest").read_text().strip() == "step-00000001"


def test_rotation_keeps_last_n(tmp_path):
    mgr = CheckpointManager(tmp_path / "c", keep_last=2)
    for step in range(1, 5):
        mgr.commit(mgr.begin(step), step, {"step": step})
    assert [p.name for p in mgr.complete()] == ["step-00000003", "step-00000004"]
    assert mgr.latest().name == "step-00000004"


def test_resume_refuses_foreign_or_changed_checkpoints(tmp_path):
    from sdft_ray.checkpoint import resolve_resume

    mgr = CheckpointManager(tmp_path / "run" / "checkpoints")
    tmp = mgr.begin(1)
    (tmp / "weights.bin").write_bytes(b"original")
    path = mgr.commit(tmp, 1, {"step": 1})
    assert resolve_resume("latest", mgr.root) == path
    assert resolve_resume(str(path), mgr.root) == path
    with pytest.raises(PermissionError, match="trust-checkpoint"):
        resolve_resume(str(path), tmp_path / "other" / "checkpoints")
    assert resolve_resume(str(path), tmp_path / "other", trust=True) == path
    (path / "weights.bin").write_bytes(b"replaced")
    with pytest.raises(ValueError, match="files changed"):
        resolve_resume("latest", mgr.root)


def test_rotation_also_keeps_the_best(tmp_path):
    mgr = CheckpointManager(tmp_path / "c", keep_last=2, best_mode="min")
    for step, loss in enumerate([0.9, 0.2, 0.5, 0.6, 0.7], start=1):
        mgr.commit(mgr.begin(step), step, {"step": step, "best_value": loss})
    assert [p.name for p in mgr.complete()] == ["step-00000002", "step-00000004", "step-00000005"]
    assert mgr.best().name == "step-00000002"
    maximising = CheckpointManager(tmp_path / "c", keep_last=1, best_mode="max")
    assert maximising.best().name == "step-00000005"
