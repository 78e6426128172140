"""placement.mode colocated: one actor per learner rank holds the rollout, teacher and learner
roles. The same config gives the same run as the disaggregated mode, and a checkpoint written in
it resumes exactly (also in the other mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from sdft_ray.errors import ConfigError

pytestmark = pytest.mark.slow

SYNC = {"max_staleness": 0, "prompts_per_step": 4, "seed": 5}


def _config(model_dir, data, out, mode: str, **sections):
    sections.setdefault("teacher", {})
    sections["teacher"] = {"kind": "ema", "ema_rate": 0.2, **sections["teacher"]}
    placement = {r: {"num_cpus": 0.5, "torch_threads": 1} for r in ("rollout", "teacher", "learner")}
    return tiny_config(model_dir, data, out, placement={**placement, "mode": mode},
                       learner={"lr": 1e-2}, schedule={**SYNC, "max_steps": sections.pop("steps", 3)}, **sections)


def _run(cfg, **run_kwargs):
    from sdft_ray.runner import prepare

    ctl = prepare(cfg).controller()
    ctl.start()
    try:
        return ctl.run(**run_kwargs)["history"], ctl
    finally:
        ctl.shutdown()


KEYS = ("loss", "grad_norm", "rollout/tokens", "rollout/policy_version_min", "teacher/version_min")


@pytest.mark.parametrize("sections", [
    pytest.param({}, id="ema-full-weights"),
    pytest.param({"model": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}, id="ema-lora"),
    pytest.param({"teacher": {"kind": "frozen"}, "loss": {"estimator": "topk", "top_k": 5}}, id="frozen-topk"),
    # the quickstart's loss: the teacher also scores each response with another example's demonstration
    pytest.param({"loss": {"position_weights": "demonstration_shift", "shift_floor": 0.01}}, id="ema-shift-weights"),
])
def test_colocated_run_equals_disaggregated_run(ray_local, tiny_model_dir, tiny_data, tmp_path, sections):
    """Synchronous schedule, fixed seeds: the same sampled tokens, teacher signal and updates, so
    the same losses and gradient norms step by step (to 1e-5), whichever process holds the roles."""
    import copy

    apart, _ = _run(_config(tiny_model_dir, tiny_data, tmp_path / "apart", "disaggregated", **copy.deepcopy(sections)))
    together, ctl = _run(_config(tiny_model_dir, tiny_data, tmp_path / "together", "colocated",
                                 **copy.deepcopy(sections)))
    assert len(together) == len(apart) == 3
    for a, b in zip(apart, together):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])
    assert [h["rollout/policy_version_min"] for h in together] == [0, 1, 2]
    # the EMA teacher moved (rate 0.2): a loss that ignored it could not match on steps 2-3
    assert all(np.isfinite(h["loss"]) for h in together)
    # bytes per weight sync: nothing crosses a process colocated; apart, the student goes to the
    # rollout actor and (EMA) the teacher weights to the teacher actor, fp32, every step
    expected = _published_bytes(tiny_model_dir, sections) * (1 if sections.get("teacher", {}).get("kind") else 2)
    assert [h["sync/bytes"] for h in apart] == [expected] * 3
    assert [h["sync/bytes"] for h in together] == [0] * 3


def _published_bytes(model_dir, sections) -> int:
    """fp32 bytes of what the learner publishes, counted with transformers / peft: every distinct
    parameter (tied ones once), or with LoRA the adapters alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = sections.get("model", {}).get("lora")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                 target_modules=lora["target_modules"]))
        return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * sum(p.numel() for p in model.parameters())


def test_colocated_reserves_learner_bundles_only_and_holds_one_model(ray_local, tiny_model_dir, tiny_data, tmp_path):
    """One bundle per learner rank; no rollout or teacher actors; the fp32 EMA teacher's module
    parameters are the EMA's own tensors (no second copy)."""
    import ray

    from sdft_ray.runner import prepare

    cfg = _config(tiny_model_dir, tiny_data, tmp_path / "run", "colocated", steps=1)
    ctl = prepare(cfg).controller()
    ctl.start()
    try:
        bundles = ray.util.placement_group_table(ctl.groups.placement.group)["bundles"]
        assert len(bundles) == cfg.learner.num_workers == 1
        assert ctl.rollout[0].handle is ctl.learners[0] and ctl.teacher[0].handle is ctl.learners[0]
        ctl.run()
        report = ray.get(ctl.learners[0].memory_report.remote())
        assert report["teacher_weights"] == 0.0  # the teacher module borrows the EMA's storage
        assert report["ema"] == pytest.approx(report["weights"], rel=1e-6)
    finally:
        ctl.shutdown()


def test_colocated_stop_resume_is_exact_and_switches_mode(ray_local, tiny_model_dir, tiny_data, tmp_path):
    """Colocated run stopped after step 2 with a teacher that follows every 2nd step (its older
    weights go into the checkpoint), resumed colocated and, from the same checkpoint,
    disaggregated: both end where the uninterrupted colocated run ends."""
    from sdft_ray.checkpoint import CheckpointManager, read_state

    def cfg(name, mode):
        return _config(tiny_model_dir, tiny_data, tmp_path / name, mode, steps=4,
                       teacher={"sync_every": 2, "ema_rate": 0.3},
                       output={"checkpoint_every": 1, "keep_last": 10})

    full, _ = _run(cfg("full", "colocated"))
    _run(cfg("cut", "colocated"), stop_after=3)
    ckpt = CheckpointManager(tmp_path / "cut" / "checkpoints").latest()
    state = read_state(ckpt)
    assert state["step"] == 3 and state["snapshots"]["teacher"]["version"] == 2  # the teacher lags one step
    for name, mode in (("cut", "colocated"), ("switched", "disaggregated")):
        resumed, _ = _run(cfg(name, mode), resume=ckpt)
        assert [h["student_version"] for h in resumed] == [4]
        assert resumed[0]["loss"] == pytest.approx(full[3]["loss"], rel=1e-5, abs=1e-7), mode
        assert resumed[0]["grad_norm"] == pytest.approx(full[3]["grad_norm"], rel=1e-5, abs=1e-7), mode


@pytest.mark.parametrize("sections, field", [
    ({"teacher": {"engine": "vllm"}}, "teacher.engine"),
    ({"rollout": {"engine": "vllm", "vllm": {"max_model_len": 2048}},
      "placement": {"mode": "colocated", "learner": {"num_gpus": 1}}}, "rollout.vllm.sleep_level"),
    ({"rollout": {"engine": "vllm", "vllm": {"max_model_len": 2048, "sleep_level": 1}},
      "placement": {"mode": "colocated", "learner": {"num_gpus": 1}}}, "rollout.vllm.gpu_memory_utilization"),
    ({"rollout": {"engine": "vllm", "num_workers": 2, "vllm": {"max_model_len": 2048}}, "learner": {"num_workers": 2},
      "teacher": {"num_workers": 2}}, "learner.num_workers"),
    ({"rollout": {"engine": "vllm", "vllm": {"max_model_len": 2048, "in_process": False}}},
      "rollout.vllm.in_process"),
    ({"rollout": {"sync_every": 2}}, "rollout.sync_every"),
    ({"learner": {"zero_stage": 3}}, "learner.zero_stage"),
    ({"rollout": {"num_workers": 2}}, "rollout.num_workers"),
])
def test_colocated_refuses_what_one_process_cannot_do(tiny_model_dir, tiny_data, tmp_path, sections, field):
    sections.setdefault("placement", {"mode": "colocated"})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(tiny_model_dir, tiny_data, tmp_path, **sections)


def test_colocated_vllm_rollout_on_gpus_validates_with_sleep_mode(tiny_model_dir, tiny_data, tmp_path):
    """The GPU set-up the check asks for is accepted: vLLM shares the learner's device and sleeps."""
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path, rollout={"engine": "vllm", "vllm": {
        "max_model_len": 2048, "sleep_level": 1, "gpu_memory_utilization": 0.3}},
        placement={"mode": "colocated", "learner": {"num_gpus": 1}})
    assert cfg.placement.mode == "colocated" and cfg.rollout.vllm["sleep_level"] == 1


def test_generation_on_a_live_module_keeps_its_mode_and_the_rng(tiny_model_dir):
    """HFEngine.on_module samples with the module it is given (its current weights), leaves it in
    training mode and leaves the process's RNG stream where it was."""
    from sdft_ray.engines import SamplingSpec
    from sdft_ray.engines.hf import HFEngine
    from sdft_ray.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(tiny_model_dir), "float32").train()
    engine = HFEngine.on_module(model, load_tokenizer(str(tiny_model_dir)), batch_size=2)
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    spec = SamplingSpec(max_new_tokens=4, seed=3)
    first = engine.generate([[5, 6, 7], [8, 9]], spec)
    assert torch.equal(torch.rand(3), expected_next)
    assert model.training
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.0)  # a different module now: the engine must use it as it is
    zeroed = engine.generate([[5, 6, 7], [8, 9]], spec)
    reference = HFEngine(str(tiny_model_dir), batch_size=2).generate([[5, 6, 7], [8, 9]], spec)
    assert [g.token_ids.tolist() for g in first] == [g.token_ids.tolist() for g in reference]
    assert any(not np.allclose(a.logprobs, b.logprobs) for a, b in zip(zeroed, first))


def test_engine_start_up_does_not_reseed_the_learner():
    """vLLM seeds random, NumPy and torch when it starts; in the learner's process that would
    change the learner's next draws. keep_random_state leaves all three streams as they were."""
    import random

    from actors.colocated import keep_random_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    with keep_random_state(torch.device("cpu")):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)  # what an engine's start-up does
        random.random(), np.random.rand(), torch.rand(4)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
