"""model.lora: adapters on a frozen base, an EMA of the adapters as the teacher, adapter-only sync,
PEFT adapter folders on disk, export merged or alone. Oracles: the base model's own logits, the
merge by hand (W + alpha/r * B @ A), peft's own loader and the EMA's definition."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from sdft_ray.config import LoraSettings
from sdft_ray.errors import ConfigError
from sdft_ray.lora import add_adapters, adapter_tensors, is_adapter, is_adapter_folder, save_adapter
from sdft_ray.models import load_causal_lm

SETTINGS = LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
SCALE = SETTINGS.alpha / SETTINGS.r


def _ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 60, (2, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained_adapters(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """Give every adapter tensor random values (as training would), return them by name."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in model.named_parameters():
        if is_adapter(name):
            param.data.copy_(0.2 * torch.randn(param.shape, generator=gen))
            out[name] = param.detach().clone()
    return out


def _hand_merged(base_state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + alpha/r * B @ A for every adapted linear layer; every other tensor as in the base."""
    merged = {k: v.clone() for k, v in base_state.items()}
    for name, a in adapters.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b = adapters[name.replace(".lora_A.", ".lora_B.")]
        merged[module + ".weight"] += SCALE * (b @ a)
    return merged


def test_fresh_adapters_keep_the_base_function_and_only_they_train(tiny_model_dir):
    base = load_causal_lm(tiny_model_dir)
    model = add_adapters(load_causal_lm(tiny_model_dir), SETTINGS)
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(base, ids))  # lora_B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = base.config.num_hidden_layers
    assert len(trainable) == layers * 2 * 2 and all(is_adapter(n) for n in trainable)  # q, v x A, B per layer
    # every process injects the same names, whatever lora_A values it drew
    other = add_adapters(load_causal_lm(tiny_model_dir), SETTINGS)
    assert [n for n, _ in other.named_parameters()] == [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="matched no module"):
        add_adapters(load_causal_lm(tiny_model_dir), LoraSettings(target_modules=["no_such_proj"]))


def test_adapter_folder_is_peft_format_and_loads_merged(tiny_model_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    model = add_adapters(load_causal_lm(tiny_model_dir), SETTINGS)
    adapters = _trained_adapters(model)
    folder = save_adapter(tmp_path / "adapter", adapter_tensors(model.named_parameters()), SETTINGS, tiny_model_dir)
    assert is_adapter_folder(folder) and json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    ids = _ids()
    expected = _logits(model, ids)
    # peft's own loader reads the folder as the same model
    with_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
    assert torch.allclose(_logits(with_peft, ids), expected, atol=1e-5)
    # load_causal_lm merges: the weights are the base's plus alpha/r * B @ A, by hand
    merged = load_causal_lm(folder)
    hand = _hand_merged(load_causal_lm(tiny_model_dir).state_dict(), adapters)
    state = merged.state_dict()
    assert set(state) == set(hand)
    for name, tensor in state.items():
        assert torch.allclose(tensor, hand[name], atol=1e-6), name
    assert torch.allclose(_logits(merged, ids), expected, atol=1e-5)


def test_engine_generates_with_the_adapters_it_was_sent(tiny_model_dir, tmp_path, single_thread):
    from sdft_ray.engines import SamplingSpec
    from sdft_ray.engines.hf import HFEngine

    source = add_adapters(load_causal_lm(tiny_model_dir), SETTINGS)
    adapters = _trained_adapters(source)
    folder = save_adapter(tmp_path / "adapter", adapters.items(), SETTINGS, tiny_model_dir)
    engine = HFEngine(str(tiny_model_dir), lora=SETTINGS.model_dump(), batch_size=4)
    assert engine.load_weights(adapters.items()) == len(adapters)  # adapter tensors only
    merged = HFEngine(str(folder), batch_size=4)  # the oracle: base + adapters merged by peft
    prompts = [list(range(5, 12)), list(range(20, 24))]
    spec = SamplingSpec(max_new_tokens=6, greedy=True)
    got, want = engine.generate(prompts, spec), merged.generate(prompts, spec)
    for g, w in zip(got, want):
        assert g.token_ids.tolist() == w.token_ids.tolist()
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


def test_adapters_of_smollm2_135m_are_a_small_fraction_of_the_model():
    """Issue 13's LoRA targets at SmolLM2-135M's shapes (r=16 on q, k, v, o): a weight sync moves
    >= 50x fewer elements than full weights, the EMA adapter is <= 5 % of a full EMA copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    full = sum(p.numel() for p in model.parameters())
    add_adapters(model, LoraSettings(r=16))
    adapter = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    # by hand, per layer: q and o 2 x 16 x 576 each; k and v 16 x 576 + 192 x 16 each (3 kv heads of 64)
    assert adapter == 30 * (2 * (2 * 16 * 576) + 2 * (16 * 576 + 192 * 16))
    assert full / adapter >= 50 and adapter / full <= 0.05


def test_lora_with_vllm_is_refused_naming_the_field(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="model.lora"):
        tiny_config(tiny_model_dir, tiny_data, tmp_path, model={"lora": {"r": 4}},
                    rollout={"engine": "vllm"})
    with pytest.raises(ConfigError, match="target_modules"):
        tiny_config(tiny_model_dir, tiny_data, tmp_path, model={"lora": {"target_modules": []}})


# ---- the roles, end to end ---------------------------------------------------------------------


def _lora_config(model_dir, data, out, **sections):
    sections["teacher"] = {"ema_rate": 0.5, **sections.get("teacher", {})}  # a rate whose EMA moves visibly
    sections["learner"] = {"lr": 5e-2, **sections.get("learner", {})}
    return tiny_config(model_dir, data, out, model={"lora": SETTINGS.model_dump()}, **sections)


def _checkpoint_adapters(folder: Path) -> dict[str, torch.Tensor]:
    """The student adapter of a checkpoint in the in-place names (``...lora_A.default.weight``)."""
    from safetensors.torch import load_file

    raw = load_file(str(folder / "student" / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
            for k, v in raw.items()}


@pytest.mark.slow
def test_roles_train_and_use_only_the_adapters(ray_local, tiny_model_dir, tiny_data, tmp_path):
    from safetensors.torch import load_file

    from sdft_ray.data import EpochSampler
    from sdft_ray.groups import RunGroups
    from sdft_ray.runner import prepare
    from sdft_ray.trajectory import PromptShard

    cfg = _lora_config(tiny_model_dir, tiny_data, tmp_path / "run")
    run = prepare(cfg)
    sampler = EpochSampler(len(run.examples), cfg.schedule.seed)
    saved, batches = {}, {}
    with RunGroups(cfg, run.model_folder, 3) as groups:
        for step in (1, 2, 3):
            batch = groups.generate(PromptShard.of_examples(step, step, sampler.next_batch(4), run.examples))
            groups.collect(batch)
            batches[step] = batch
            if step == 3:
                break
            groups.train(batch)
            groups.sync(step)
            saved[step] = tmp_path / f"after-{step}"
            groups.learners.call("save_checkpoint", str(saved[step]), {"step": step})
        traj = ray_local.get(batches[3].trajectory_refs(0))[0]
        scores = ray_local.get(batches[3].scores()[0][0])
    assert groups.weight_sync is not None
    base = load_causal_lm(tiny_model_dir).state_dict()
    # only the adapters changed: the merged student is the base plus B @ A, nothing else moved
    s1, s2 = _checkpoint_adapters(saved[1]), _checkpoint_adapters(saved[2])
    assert all(is_adapter(n) for n in s2) and any(v.abs().max() > 0 for n, v in s2.items() if ".lora_B." in n)
    merged = load_causal_lm(saved[2] / "student").state_dict()
    hand = _hand_merged(base, s2)
    for name in base:
        assert torch.allclose(merged[name], hand[name], atol=1e-6), name
    # the EMA adapter follows its definition: e2 = (1 - rate) e1 + rate s2 (rate 0.5)
    e1 = load_file(str(saved[1] / "teacher_ema.safetensors"))
    e2 = load_file(str(saved[2] / "teacher_ema.safetensors"))
    assert set(e2) == set(s2)  # an EMA of the adapters only
    for name in e2:
        assert torch.allclose(e2[name], 0.5 * e1[name] + 0.5 * s2[name], atol=1e-6), name
    # step 3's rollout sampled with the step-2 student adapters, and its teacher scored with the step-2 EMA
    assert traj.policy_version == 2 and scores.teacher_version == 2
    student = load_causal_lm(saved[2] / "student")
    teacher = add_adapters(load_causal_lm(tiny_model_dir), SETTINGS)
    teacher.load_state_dict(e2, strict=False)
    for row in range(len(traj.response_ids)):
        response = torch.tensor(traj.response_ids[row])
        for model, prompt, got in ((student, traj.prompt_ids[row], traj.rollout_logprobs[row]),
                                   (teacher, traj.teacher_prompt_ids[row], scores.token_logprobs[row])):
            ids = torch.cat([torch.tensor(prompt), response])[None]
            logp = torch.log_softmax(_logits(model, ids)[0, len(prompt) - 1:-1].double(), -1)
            want = logp.gather(-1, response[:, None])[:, 0]
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want.numpy(), atol=1e-4)
    # a weight push carries the adapters alone
    assert set(s1) == set(s2) and sum(v.numel() for v in s2.values()) < sum(v.numel() for v in base.values()) / 10


@pytest.mark.slow
def test_lora_checkpoint_resumes_exactly_and_exports(ray_local, tiny_model_dir, tiny_data, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from sdft_ray.cli import main
    from sdft_ray.runner import train

    out = {"checkpoint_every": 1, "keep_last": 3, "loggers": ["jsonl"], "progress": "off"}
    whole = _lora_config(tiny_model_dir, tiny_data, tmp_path / "whole", output={**out, "dir": str(tmp_path / "whole")})
    train(whole)
    split = _lora_config(tiny_model_dir, tiny_data, tmp_path / "split", output={**out, "dir": str(tmp_path / "split")})
    train(split, stop_after=1)
    train(split, resume="latest")
    a = _checkpoint_adapters(tmp_path / "whole" / "checkpoints" / "step-00000002")
    b = _checkpoint_adapters(tmp_path / "split" / "checkpoints" / "step-00000002")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    # the checkpoint holds adapters and their optimizer state, not the frozen base
    ds_folder = tmp_path / "whole" / "checkpoints" / "step-00000002" / "deepspeed"
    ds_bytes = sum(f.stat().st_size for f in ds_folder.rglob("*") if f.is_file())
    assert ds_bytes < sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    # export: merged (plain transformers) and the adapter alone (peft), the same function
    assert main(["export", str(tmp_path / "whole"), str(tmp_path / "merged")]) == 0
    assert main(["export", str(tmp_path / "whole"), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert main(["export", str(tmp_path / "whole"), str(tmp_path / "teacher"), "--weights", "teacher"]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter"))
    ids = _ids()
    assert torch.allclose(_logits(merged, ids), _logits(adapter, ids), atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(load_causal_lm(tiny_model_dir), ids), atol=1e-3)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    assert not torch.allclose(_logits(teacher, ids), _logits(merged, ids), atol=1e-6)  # the EMA lags the student


@pytest.mark.slow
def test_lora_under_zero3_on_two_ranks_takes_the_single_rank_steps(ray_local, tiny_model_dir, tiny_data, tmp_path):
    """Adapters on two ZeRO-3 ranks (split shards, gathered for sync and checkpoint) end where one
    ZeRO-0 rank on the whole batch ends."""
    from sdft_ray.runner import train

    finals = {}
    for name, learner in (("one", {"num_workers": 1, "zero_stage": 0, "micro_batch_size": 4}),
                          ("two", {"num_workers": 2, "zero_stage": 3, "micro_batch_size": 2})):
        cfg = _lora_config(tiny_model_dir, tiny_data, tmp_path / name, rollout={"num_workers": 2},
                           learner=learner)
        finals[name] = _checkpoint_adapters(Path(train(cfg)["latest_checkpoint"]))
    assert set(finals["one"]) == set(finals["two"])
    for key, value in finals["one"].items():
        assert torch.allclose(finals["two"][key], value, rtol=1e-4, atol=1e-6), key
