"""What ``runner.prepare`` refuses before any actor starts (issue 12's missing validations)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from conftest import tiny_config, write_facts
from conftest_tokenizer import make_test_tokenizer
from sdft_ray.models import build_random_model
from sdft_ray.runner import prepare


def test_prompt_plus_response_must_fit_the_models_context(tmp_path):
    folder = build_random_model(tmp_path / "short", make_test_tokenizer())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    data = write_facts(tmp_path / "facts.jsonl")  # teacher prompts of 101 tokens (the paper template)
    with pytest.raises(ValueError, match=r"rollout.max_new_tokens = 40 plus the longest prompt \(101 tokens.* "
                                         r"context of 128"):
        prepare(tiny_config(folder, data, tmp_path / "run", rollout={"max_new_tokens": 40}))
    assert prepare(tiny_config(folder, data, tmp_path / "run", rollout={"max_new_tokens": 27})).examples


def test_external_teacher_must_have_the_students_output_size(tmp_path):
    """Same tokenizer, but a teacher whose output layer is larger (padded vocabulary) would score
    other ids: refused naming teacher.model_path."""
    tok = make_test_tokenizer()
    student = build_random_model(tmp_path / "student", tok)
    teacher = build_random_model(tmp_path / "teacher", tok, seed=1)
    config = AutoConfig.from_pretrained(teacher)
    config.vocab_size += 64
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(config).save_pretrained(teacher)
    cfg = tiny_config(student, write_facts(tmp_path / "facts.jsonl"), tmp_path / "run",
                      algorithm={"variant": "opd"}, teacher={"kind": "frozen", "model_path": str(teacher)})
    with pytest.raises(ValueError, match=rf"teacher.model_path: the teacher has {len(tok)} tokenizer tokens and "
                                         rf"{len(tok) + 64} output logits"):
        prepare(cfg)
