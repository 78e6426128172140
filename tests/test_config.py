"""The config schema: YAML + --set overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdft_ray.config import load_config, parse_override
from sdft_ray.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.schedule.prompts_per_step >= 1


def test_overrides_are_typed_yaml(tmp_path):
    cfg = load_config(None, ["loss.alpha=0.5", "learner.zero_stage=3", "rollout.vllm={max_model_len: 512}",
                             "prompts.system_prompt=Be brief.", "schedule.max_steps=7"])
    assert cfg.loss.alpha == 0.5 and cfg.learner.zero_stage == 3
    assert cfg.rollout.vllm == {"max_model_len": 512}
    assert cfg.prompts.system_prompt == "Be brief." and cfg.schedule.max_steps == 7
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize("override, field", [
    ("loss.alpah=0.5", "loss.alpah"),                 # misspelt key
    ("loss.alpha=1.5", "loss.alpha"),                 # out of range
    ("learner.zero_stage=4", "learner.zero_stage"),   # not a stage
    ("rollout.num_workers=zero", "rollout.num_workers"),
    ("loss.estimator=sampled", "loss.estimator"),     # needs alpha 1
])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field.split(".")[-1] in str(err.value)


def test_nccl_broadcast_refuses_colocated_gpus():
    with pytest.raises(ConfigError, match="placement.rollout.num_gpus < 1 shares GPUs"):
        load_config(None, ["weight_sync.transport=collective", "weight_sync.backend=nccl",
                           "placement.rollout.num_gpus=0.5"])
    assert load_config(None, ["weight_sync.transport=collective", "placement.rollout.num_gpus=1"]).weight_sync.backend == "auto"


def test_vllm_tensor_parallel_needs_a_bundle_of_that_many_gpus():
    tp = ["rollout.engine=vllm", "rollout.vllm={tensor_parallel_size: 2, in_process: false}"]
    with pytest.raises(ConfigError, match="needs placement.rollout.num_gpus = 2"):
        load_config(None, tp + ["placement.rollout.num_gpus=1"])
    with pytest.raises(ConfigError, match="needs rollout.vllm.in_process: false"):
        load_config(None, ["rollout.engine=vllm", "rollout.vllm={tensor_parallel_size: 2}",
                           "placement.rollout.num_gpus=2"])
    assert load_config(None, tp + ["placement.rollout.num_gpus=2"]).rollout.vllm["tensor_parallel_size"] == 2


def test_batch_divisibility_is_checked_before_any_actor():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["schedule.prompts_per_step=6", "rollout.num_workers=4"])


def test_yaml_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alpha: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config(None, ["novalue"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["loss.alpha=0.25", "teacher.kind=frozen"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


# ---- fuzz: generated malformed configs give a ConfigError or a valid config, nothing else ----
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdft_ray.config import RunConfig, config_from_dict  # noqa: E402

_SECTIONS = {name: list(field.annotation.model_fields) for name, field in RunConfig.model_fields.items()}
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
_section = st.sampled_from(sorted(_SECTIONS)).flatmap(
    lambda s: st.tuples(st.just(s), st.dictionaries(st.sampled_from(_SECTIONS[s] + ["bogus"]), _values, max_size=4)))


@settings(max_examples=200, deadline=None)
@given(st.lists(_section, max_size=4) | st.builds(lambda v: [("model", v)], _values))
def test_fuzzed_configs_fail_cleanly(sections):
    tree = {}
    for name, body in sections:
        tree[name] = body
    try:
        cfg = config_from_dict(tree, "fuzz")
    except ConfigError as exc:
        assert "invalid config (fuzz)" in str(exc)
    else:
        assert isinstance(cfg, RunConfig)


# ---- validations of issue 12: what used to fail mid-run, or silently -------------------------------

def test_skip_first_tokens_cannot_mask_every_response_token():
    with pytest.raises(ConfigError, match=r"loss.skip_first_tokens = 8 masks every response token"):
        load_config(None, ["loss.skip_first_tokens=8", "rollout.max_new_tokens=8"])
    assert load_config(None, ["loss.skip_first_tokens=8", "rollout.max_new_tokens=8",
                              "algorithm.variant=sft"]).loss.skip_first_tokens == 8  # SFT masks nothing


def test_top_k_above_vllm_max_logprobs_is_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"loss.top_k = 100 exceeds rollout.vllm.max_logprobs = 64"):
        load_config(None, ["rollout.engine=vllm", "loss.estimator=topk", "loss.top_k=100"])
    with pytest.raises(ConfigError, match=r"loss.top_k = 30 exceeds teacher.vllm.max_logprobs = 20"):
        load_config(None, ["teacher.engine=vllm", "teacher.vllm={max_logprobs: 20}", "loss.estimator=topk",
                           "loss.topk_source=teacher", "loss.top_k=30"])
    ok = load_config(None, ["rollout.engine=vllm", "rollout.vllm={max_logprobs: 128}", "loss.estimator=topk",
                            "loss.top_k=100"])
    assert ok.loss.top_k == 100


def test_vllm_max_model_len_must_hold_prompt_and_response():
    with pytest.raises(ConfigError, match=r"teacher.vllm.max_model_len = 1000 is below prompts.max_teacher_prompt_tokens"):
        load_config(None, ["teacher.engine=vllm", "loss.estimator=topk", "loss.topk_source=teacher",
                           "teacher.vllm={max_model_len: 1000}", "rollout.max_new_tokens=64"])  # 1024 + 64


def test_transfer_dtype_only_applies_to_the_full_signal():
    with pytest.raises(ConfigError, match=r"teacher.transfer_dtype = bfloat16 applies to the full-vocabulary"):
        load_config(None, ["teacher.transfer_dtype=bfloat16", "loss.estimator=topk"])
    assert load_config(None, ["teacher.transfer_dtype=bfloat16"]).teacher.transfer_dtype == "bfloat16"


def test_gpu_configs_use_the_teacher_top_k_they_describe():
    """Regression: configs/gpu_8x1.yaml said "teacher top-k" but used the default student top-k
    and set a transfer dtype that had no effect."""
    for name in ("gpu_8x1.yaml", "gpu_2node.yaml"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / name)
        assert cfg.loss.estimator == "topk" and cfg.loss.topk_source == "teacher", name


def test_teacher_template_by_name_round_trips_through_a_dump(tmp_path):
    from sdft_ray.prompts import TEACHER_TEMPLATES

    assert load_config(None).prompts.teacher_template == "paper"  # the paper's template by default
    for name in TEACHER_TEMPLATES:
        cfg = load_config(None, [f"prompts.teacher_template={name}"])
        dumped = tmp_path / f"{name}.yaml"
        dumped.write_text(cfg.to_yaml())
        assert f"teacher_template: {name}" in cfg.to_yaml()  # the dump shows the name, not the text
        assert load_config(dumped).prompts.teacher_template == name
    literal = "Question {prompt} - reference {demonstration}"
    assert load_config(None, [f"prompts.teacher_template='{literal}'"]).prompts.teacher_template == literal


@pytest.mark.parametrize("value", ["papr", "'{prompt} without a demonstration'"])
def test_unknown_template_name_is_an_error_naming_the_field_and_the_names(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"prompts.teacher_template={value}"])
    assert "prompts.teacher_template" in str(err.value) and "paper_no_thinking" in str(err.value)
    assert err.value.field == "prompts.teacher_template"


@pytest.mark.parametrize("override", ["probe.gate=maybe", "probe.num_examples=1", "probe.numexamples=4"])
def test_probe_section_errors_name_the_field(override):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value)
