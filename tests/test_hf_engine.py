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
