"""Forgetting measurements (sdft_ray/evaluation/forgetting.py) on the tiny random model.

KL(base || model) and the NLL of the base answer are checked against a float64 loop that feeds
one unpadded sequence at a time (no batching, no padding, no chunking)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from sdft_ray.evaluation.forgetting import (BaseAnswer, ForgettingProbe, answer_divergence, base_answers,
                                            divergence_summary, length_drift)
from sdft_ray.evaluation.tasks import EvalTask


def _reference(model, base, prompt, answer):
    """Per-token KL(base || model) and NLL in float64, one prefix at a time."""
    model, base = copy.deepcopy(model).double(), copy.deepcopy(base).double()
    kls, nlls = [], []
    for t in range(len(answer)):
        ids = torch.tensor([list(prompt) + list(answer[:t])])
        with torch.no_grad():
            lb = base(input_ids=ids).logits[0, -1].log_softmax(-1)
            lm = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        kls.append(float((lb.exp() * (lb - lm)).sum()))
        nlls.append(float(-lm[answer[t]]))
    return float(np.mean(kls)), float(np.mean(nlls))


@pytest.fixture(scope="module")
def models(tiny_model_dir, single_thread):
    from sdft_ray.models import load_causal_lm, load_tokenizer

    base = load_causal_lm(tiny_model_dir, "float32").eval()
    other = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return base, other, load_tokenizer(tiny_model_dir)


def _answers(tok):
    def chat(q):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        return tuple(tok(text, add_special_tokens=False)["input_ids"])

    a1 = tuple(tok("The capital of Zorbia is Quelmarsh.", add_special_tokens=False)["input_ids"]) + (tok.eos_token_id,)
    a2 = tuple(tok("Two", add_special_tokens=False)["input_ids"])
    return [BaseAnswer(0, "geo", chat("What is the capital of Zorbia?"), a1, True),
            BaseAnswer(1, "math", chat("What is one plus one?"), a2, False)]


def test_kl_and_nll_match_float64_loop(models):
    base, other, tok = models
    answers = _answers(tok)
    rows = answer_divergence(other, base, answers, tok.pad_token_id, batch_size=2, position_chunk=3)
    assert [r.index for r in rows] == [0, 1] and [r.tokens for r in rows] == [len(a.answer_ids) for a in answers]
    for row, a in zip(rows, answers):
        kl, nll = _reference(other, base, a.prompt_ids, a.answer_ids)
        assert kl > 1e-3
        assert row.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert row.nll == pytest.approx(nll, rel=1e-4, abs=1e-6)
    # batch size and chunking do not change the numbers
    single = answer_divergence(other, base, answers, tok.pad_token_id, batch_size=1, position_chunk=64)
    assert [r.kl for r in single] == pytest.approx([r.kl for r in rows], rel=1e-5)


def test_kl_of_base_with_itself_is_zero(models):
    base, _, tok = models
    answers = _answers(tok)
    rows = answer_divergence(base, base, answers, tok.pad_token_id)
    assert all(abs(r.kl) < 1e-6 for r in rows)
    assert all(r.nll == pytest.approx(_reference(base, base, a.prompt_ids, a.answer_ids)[1], rel=1e-4)
               for r, a in zip(rows, answers))
    summary = divergence_summary(rows)
    assert summary["n"] == 2 and abs(summary["kl"]) < 1e-6 and summary["answer_tokens"] == sum(r.tokens for r in rows)


def _prompt_task(tmp_path):
    path = tmp_path / "prior.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": "x", "kind": k}) + "\n"
                            for q, k in [("What is the capital of Zorbia?", "geo"), ("Who founded Tirrik?", "hist"),
                                         ("What is two plus two?", "math")]), encoding="utf-8")
    return EvalTask("prior", str(path), kind_column="kind")


def test_base_answers_are_cached_and_reused(tiny_model_dir, tmp_path, monkeypatch, single_thread):
    from sdft_ray.evaluation.runner import task_prompts
    from sdft_ray.models import load_tokenizer, stop_token_ids

    task, cache = _prompt_task(tmp_path), tmp_path / "answers.jsonl"
    answers = base_answers(tiny_model_dir, task, cache, max_new_tokens=6, batch_size=2)
    tok = load_tokenizer(tiny_model_dir)
    _, prompts = task_prompts(task, tok)
    assert [a.prompt_ids for a in answers] == [tuple(p) for p in prompts]
    assert [a.kind for a in answers] == ["geo", "hist", "math"]
    stops = set(stop_token_ids(tok))
    for a in answers:
        assert 1 <= len(a.answer_ids) <= 6 and a.finished == (a.answer_ids[-1] in stops)
    stamp, text = os.stat(cache).st_mtime_ns, cache.read_text()

    import sdft_ray.engines

    def refuse(*args, **kwargs):
        raise AssertionError("the cached answers must be reused, not regenerated")

    monkeypatch.setattr(sdft_ray.engines, "make_engine", refuse)
    assert base_answers(tiny_model_dir, task, cache, max_new_tokens=6, batch_size=2) == answers
    assert os.stat(cache).st_mtime_ns == stamp and cache.read_text() == text
    with pytest.raises(AssertionError, match="reused"):  # another length limit is another cache
        base_answers(tiny_model_dir, task, cache, max_new_tokens=7)


def test_probe_scores_a_checkpoint_folder(tiny_model_dir, tmp_path, models):
    _, other, _ = models
    probe = ForgettingProbe(tiny_model_dir, _prompt_task(tmp_path), tmp_path / "a.jsonl", max_new_tokens=5)
    same = probe.divergence(tiny_model_dir)
    assert len(same) == 3 and all(abs(r.kl) < 1e-6 for r in same)
    other.save_pretrained(tmp_path / "other")
    moved = probe.divergence(tmp_path / "other")
    assert all(r.kl > 0 for r in moved) and probe.digest == ForgettingProbe(
        tiny_model_dir, _prompt_task(tmp_path), tmp_path / "a.jsonl", max_new_tokens=5).digest


def test_length_drift_per_task_and_kind():
    base = [{"task": "prior", "kind": "all", "mean_response_tokens": 10.0},
            {"task": "prior", "kind": "geo", "mean_response_tokens": 8.0}]
    model = [{"task": "prior", "kind": "all", "mean_response_tokens": 25.5},
             {"task": "prior", "kind": "geo", "mean_response_tokens": 6.0},
             {"task": "facts", "kind": "all", "mean_response_tokens": 3.0}]
    assert [(r["kind"], r["length_drift"]) for r in length_drift(model, base)] == [("all", 15.5), ("geo", -2.0)]
