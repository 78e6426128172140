"""The transformers rollout engine: several samples per prompt share one prompt prefill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdft_ray.engines import SamplingSpec
from sdft_ray.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    return HFEngine(str(tiny_model_dir), batch_size=8), HFEngine(str(tiny_model_dir), batch_size=8, share_prompts=False)


def _prompts(samples: int) -> list[list[int]]:
    base = [[5, 9, 13, 17, 21, 40, 41], [7, 8], [30, 31, 32, 33]]  # different lengths: left padding
    return [p for p in base for _ in range(samples)]


@pytest.mark.parametrize("greedy", [True, False])
def test_shared_prompt_prefill_gives_the_same_generations(engines, greedy):
    shared, plain = engines
    spec = SamplingSpec(max_new_tokens=6, greedy=greedy, temperature=1.0, top_p=1.0, seed=3, topk_logprobs=4)
    prompts = _prompts(samples=3)
    assert shared._shared_prompt_cache(prompts, max(map(len, prompts))) is not None  # the shared path runs
    a, b = shared.generate(prompts, spec), plain.generate(prompts, spec)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        assert x.finished == y.finished


def test_distinct_prompts_take_the_plain_path(engines):
    shared, _ = engines
    prompts = _prompts(samples=1)
    assert shared._shared_prompt_cache(prompts, max(map(len, prompts))) is None


def test_shared_prompt_logprobs_match_a_full_forward(engines, tiny_model_dir):
    """The sampled tokens' log-probs equal those of one forward pass over prompt + response."""
    shared, _ = engines
    prompts = _prompts(samples=2)
    gens = shared.generate(prompts, SamplingSpec(max_new_tokens=5, temperature=1.0, top_p=1.0, seed=1))
    for prompt, gen in zip(prompts, gens):
        seq = torch.tensor([prompt + gen.token_ids.tolist()])
        with torch.no_grad():
            logp = shared.model(input_ids=seq).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        expected = logp.gather(-1, torch.as_tensor(gen.token_ids)[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(gen.logprobs, expected, atol=1e-4)


def _reference_logprobs(model, prompt, tokens) -> torch.Tensor:
    """float64 log-softmax of one plain forward over prompt + response, at the response positions."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, len(prompt) - 1:-1]
    return logits.double().log_softmax(-1)


@pytest.mark.parametrize("repetition_penalty", [None, 1.5])
def test_step_logprobs_and_topk_are_raw_and_match_a_full_forward(engines, repetition_penalty):
    """Per-step log-probs and top-k equal a float64 log-softmax of a full forward at temperature 1,
    whatever the sampling temperature / top-p, and whatever logits processors the model's
    generation config adds before ours (a repetition penalty changes the sampled distribution,
    not the reported raw log-probs)."""
    _, plain = engines
    config = plain.model.generation_config
    saved = config.repetition_penalty
    config.repetition_penalty = repetition_penalty
    try:
        prompts = _prompts(samples=2)
        spec = SamplingSpec(max_new_tokens=6, temperature=0.7, top_p=0.9, seed=5, topk_logprobs=5)
        gens = plain.generate(prompts, spec)
    finally:
        config.repetition_penalty = saved
    for prompt, gen in zip(prompts, gens):
        ref = _reference_logprobs(plain.model, prompt, gen.token_ids.tolist())
        tok = ref.gather(-1, torch.as_tensor(gen.token_ids)[:, None]).squeeze(-1)
        np.testing.assert_allclose(gen.logprobs, tok.numpy(), atol=1e-5)
        top = ref.topk(5, dim=-1)
        np.testing.assert_array_equal(gen.topk_ids, top.indices.numpy())
        np.testing.assert_allclose(gen.topk_logprobs, top.values.numpy(), atol=1e-5)
        assert gen.topk_ids.shape == gen.topk_logprobs.shape == (len(gen.token_ids), 5)


def test_generate_keeps_no_per_step_logits(engines, monkeypatch):
    """``generate`` is not asked for ``output_logits``/``output_scores`` (a ``[B, T, V]`` tuple)."""
    shared, _ = engines
    seen = {}
    original = shared.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(shared.model, "generate", spy)
    gens = shared.generate(_prompts(samples=1), SamplingSpec(max_new_tokens=4, seed=0, topk_logprobs=3))
    assert len(gens) == 3 and all(g.topk_ids.shape == (len(g.token_ids), 3) for g in gens)
    assert not seen.get("output_logits") and not seen.get("output_scores")
    assert not seen.get("return_dict_in_generate")
