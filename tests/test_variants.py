"""The shipped variants train a tiny model on the shared roles: SDFT is covered elsewhere;
here SDPO (feedback), on-policy distillation from a separate teacher, and the SFT baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_config
from conftest_tokenizer import make_test_tokenizer
from sdft_ray.errors import DataError
from sdft_ray.models import build_random_model
from sdft_ray.runner import prepare
from sdft_ray.trajectory import Trajectories
from sdft_ray.variants import SDPO, Variant, get_variant


def facts_with_answers(path, n=8):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"What is the capital of Land{i}?", "answer": f"City{i}"}) + "\n")
    return path


def run(cfg):
    prepared = prepare(cfg)
    ctl = prepared.controller()
    ctl.start()
    try:
        return ctl.run()["history"], ctl
    finally:
        ctl.shutdown()


def test_sdpo_teacher_context_carries_feedback_and_solution(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run",
                      algorithm={"variant": "sdpo", "feedback_fn": "sdft_ray.variants.sdpo:answer_feedback"})
    variant = get_variant(cfg)
    assert isinstance(variant, SDPO)
    tok = make_test_tokenizer()
    wrong = np.asarray(tok("I do not know", add_special_tokens=False)["input_ids"])
    right = np.asarray(tok("It is City3", add_special_tokens=False)["input_ids"])
    contexts = [{"prompt": "Capital of Land3?", "answer": "City3", "demonstration": None},
                {"prompt": "Capital of Land3?", "answer": "City3", "demonstration": "City3 is the capital."}]
    traj = Trajectories(step=1, policy_version=0, example_index=np.array([3, 3]), epoch=np.zeros(2, int),
                        sample_index=np.zeros(2, int), prompt_ids=[wrong, wrong], teacher_prompt_ids=[wrong, wrong],
                        response_ids=[wrong, right], rollout_logprobs=[np.zeros(len(wrong)), np.zeros(len(right))],
                        finished=np.ones(2, bool), contexts=contexts)
    first, second = (tok.decode(p) for p in variant.teacher_prompts(traj, tok))
    assert "Capital of Land3?" in first and "unsuccessful earlier attempt" in first and "not correct" in first
    assert "correct solution" not in first
    # A passing attempt gets no feedback; the row's demonstration is shown as the solution.
    assert "unsuccessful" not in second and "City3 is the capital." in second
    assert first.startswith("<|im_start|>user") and first.endswith("<|im_start|>assistant\n")


def _sdpo_traj(tok, prompt, response: str):
    ids = np.asarray(tok(response, add_special_tokens=False)["input_ids"])
    return Trajectories(step=1, policy_version=0, example_index=np.array([0]), epoch=np.zeros(1, int),
                        sample_index=np.zeros(1, int), prompt_ids=[ids], teacher_prompt_ids=[ids],
                        response_ids=[ids], rollout_logprobs=[np.zeros(len(ids))], finished=np.ones(1, bool),
                        contexts=[{"prompt": prompt, "answer": "City3", "demonstration": None, "row": 7,
                                   "where": "qa.jsonl:7"}])


def test_sdpo_teacher_prompt_keeps_one_system_turn_and_the_length_limit(tiny_model_dir, tmp_path):
    """Regression: SDPO built its teacher chat by hand - a second system turn when the chat had one,
    and no prompts.max_teacher_prompt_tokens limit."""
    tok = make_test_tokenizer()
    chat = [("system", "You answer in one word."), ("user", "Capital of Land3?")]
    sdpo = {"variant": "sdpo", "feedback_fn": "sdft_ray.variants.sdpo:answer_feedback"}
    cfg = tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", algorithm=sdpo,
                      prompts={"system_prompt": "Be helpful."})
    (prompt,) = get_variant(cfg).teacher_prompts(_sdpo_traj(tok, chat, "no idea"), tok)
    text = tok.decode(prompt)
    assert text.count("<|im_start|>system") == 1 and "You answer in one word." in text
    assert "Be helpful." not in text  # the chat's own system turn wins, as for the student
    assert text.index("Capital of Land3?") < text.index("unsuccessful earlier attempt")

    long_answer = " ".join(["wrong"] * 400)
    limits = {"max_prompt_tokens": 64, "max_teacher_prompt_tokens": 96}
    cut = tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", algorithm=sdpo,
                      prompts={**limits, "overflow": "truncate_demonstration"})
    feedback = lambda ctx, text: "Your answer was: " + text  # noqa: E731 - feedback that quotes the attempt
    variant = get_variant(cut)
    variant._feedback = feedback
    (prompt,) = variant.teacher_prompts(_sdpo_traj(tok, "Capital of Land3?", long_answer), tok)
    assert len(prompt) <= 96 and "Capital of Land3?" in tok.decode(prompt)  # the query is never cut
    strict = get_variant(tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", algorithm=sdpo,
                                     prompts=limits))
    strict._feedback = feedback
    with pytest.raises(DataError, match=r"qa.jsonl.*row 7.*max_teacher_prompt_tokens=96"):
        strict.teacher_prompts(_sdpo_traj(tok, "Capital of Land3?", long_answer), tok)


@pytest.mark.slow
def test_sdpo_trains(ray_local, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, facts_with_answers(tmp_path / "qa.jsonl"), tmp_path / "run",
                      algorithm={"variant": "sdpo", "feedback_fn": "sdft_ray.variants.sdpo:answer_feedback"},
                      loss={"alpha": 0.5}, schedule={"max_steps": 2})
    history, _ = run(cfg)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) and h["divergence"] > 0 for h in history)


@pytest.mark.slow
def test_external_teacher_distillation_trains(ray_local, tiny_model_dir, tmp_path):
    teacher = build_random_model(tmp_path / "teacher", make_test_tokenizer(), hidden_size=48, layers=3, seed=7,
                                 initializer_range=0.3)
    cfg = tiny_config(tiny_model_dir, facts_with_answers(tmp_path / "qa.jsonl"), tmp_path / "run",
                      algorithm={"variant": "opd"}, teacher={"kind": "frozen", "model_path": str(teacher)},
                      learner={"lr": 1e-2}, schedule={"max_steps": 4})
    history, ctl = run(cfg)
    assert ctl.teacher_folder == str(teacher)
    # A different model: the divergence is large, and distillation shrinks it.
    assert history[0]["divergence"] > 0.1
    assert history[-1]["divergence"] < history[0]["divergence"]
    assert all(h["teacher_version"] == 0 for h in history)  # an external teacher is never overwritten


@pytest.mark.slow
def test_sft_baseline_trains_on_demonstrations(ray_local, tiny_model_dir, tiny_data, tmp_path):
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", algorithm={"variant": "sft"},
                      learner={"lr": 1e-2, "num_workers": 2, "micro_batch_size": 2},
                      schedule={"prompts_per_step": 8, "max_steps": 5}, data={"shuffle": False})
    history, ctl = run(cfg)
    assert ctl.rollout is None and ctl.teacher is None
    nll = [h["nll"] for h in history]
    assert all(h["grad_norm"] > 0 for h in history)  # ZeRO-0: the norm is taken before the step
    assert nll[-1] < 0.7 * nll[0], nll
    assert all(h["sequences"] == 8 for h in history)


def test_unknown_variant_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", algorithm={"variant": "nope"})
    with pytest.raises(ValueError, match="algorithm.variant"):
        get_variant(cfg)


class HintDistillation(Variant):  # the example of docs/variants.md
    name = "hint"

    def tokenize(self, builder, examples):
        import dataclasses

        return builder.build([dataclasses.replace(ex, demonstration=ex.extra["hint"]) for ex in examples])


def test_user_variant_by_module_path(tiny_model_dir, tmp_path):
    data = tmp_path / "hints.jsonl"
    data.write_text(json.dumps({"prompt": "Capital of Land1?", "demonstration": "City1.", "hint": "It starts with C."}) + "\n")
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "run", algorithm={"variant": "test_variants:HintDistillation"})
    prepared = prepare(cfg)
    teacher = make_test_tokenizer().decode(prepared.examples[0].teacher_prompt_ids)
    assert "It starts with C." in teacher and "City1." not in teacher


@pytest.mark.slow
def test_docs_two_teacher_loop(ray_local, tiny_model_dir, tiny_data, tmp_path):
    """The composition example of docs/variants.md, run as written: two teacher groups (the EMA
    teacher and a frozen one under another template) whose signals are mixed, without the controller."""
    import re
    from pathlib import Path

    docs = (Path(__file__).parent.parent / "docs" / "variants.md").read_text()
    block = re.search(r"## Composing your own loop.*?```python\n(.*?)```", docs, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/variants.md", "exec"), namespace)  # noqa: S102 - our own documentation
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", learner={"lr": 1e-2}, schedule={"max_steps": 3})
    losses = namespace["two_teacher_sdft"](cfg, steps=3)
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 0
    # the mixture differs from either teacher alone: with weight 1 the frozen hint teacher does not count
    only_ema = namespace["two_teacher_sdft"](cfg, steps=1, weight=1.0)
    assert only_ema[0] != pytest.approx(losses[0])
