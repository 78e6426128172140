"""Teacher scoring (``sdft_ray.scoring``): chunked log-probs equal a plain float64 log-softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdft_ray.models import load_causal_lm
from sdft_ray.scoring import logprob_stats, position_chunks, score_trajectories
from sdft_ray.trajectory import Trajectories

pytestmark = pytest.mark.usefixtures("single_thread")

K = 4
PROMPT_LENGTHS = [6, 3, 9, 4, 5]
RESPONSE_LENGTHS = [7, 1, 0, 11, 4]  # padding, an empty response, a one-token one


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "float32").eval()


def _trajectories(vocab: int, seed: int = 0) -> Trajectories:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).numpy()  # noqa: E731
    responses = [ids(n) for n in RESPONSE_LENGTHS]
    n = len(responses)
    return Trajectories(
        step=1, policy_version=0, example_index=np.arange(n), epoch=np.zeros(n, np.int64),
        sample_index=np.zeros(n, np.int64), prompt_ids=[ids(p) for p in PROMPT_LENGTHS],
        teacher_prompt_ids=[ids(p + 2) for p in PROMPT_LENGTHS], response_ids=responses,
        rollout_logprobs=[np.zeros(len(r), np.float32) for r in responses], finished=np.ones(n, bool),
        rollout_topk_ids=[torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in r]).numpy()
                          if len(r) else np.zeros((0, K), np.int64) for r in responses],
    )


def _reference(model, traj: Trajectories) -> list[torch.Tensor]:
    """Per row, one unpadded forward over teacher prompt + response: float64 log-softmax ``[T, V]``."""
    out = []
    for prompt, response in zip(traj.teacher_prompt_ids, traj.response_ids):
        seq = torch.as_tensor(np.concatenate([prompt, response]))[None]
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0, len(prompt) - 1:-1].double()
        out.append(logits.log_softmax(-1))
    return out


@pytest.mark.parametrize("signal", ["full", "topk_teacher", "topk_student", "sampled"])
@pytest.mark.parametrize("chunk_positions", [1, 3, 1000])
def test_scores_match_a_float64_log_softmax(model, signal, chunk_positions):
    vocab = model.config.vocab_size
    traj = _trajectories(vocab)
    ref = _reference(model, traj)
    # micro-batches of 2 rows; chunk_elements gives `chunk_positions` positions per chunk
    scores = score_trajectories(model, traj, pad_id=0, signal=signal, top_k=K, micro_batch_size=2,
                                transfer_dtype=torch.float32, version=7,
                                chunk_elements=2 * vocab * chunk_positions)
    assert scores.teacher_version == 7 and len(scores) == len(traj)
    for r, (lp, response) in enumerate(zip(ref, traj.response_ids)):
        token = lp.gather(-1, torch.as_tensor(response)[:, None]).squeeze(-1)
        assert scores.token_logprobs[r].dtype == np.float32
        np.testing.assert_allclose(scores.token_logprobs[r], token.numpy(), atol=2e-5)
        if signal == "full":
            assert scores.kind == "full" and scores.full_logprobs[r].shape == (len(response), vocab)
            np.testing.assert_allclose(scores.as_float(scores.full_logprobs[r]), lp.numpy(), atol=2e-5)
        elif signal == "topk_teacher":
            top = lp.topk(K, dim=-1)
            np.testing.assert_array_equal(scores.topk_ids[r], top.indices.numpy())
            np.testing.assert_allclose(scores.topk_logprobs[r], top.values.numpy(), atol=2e-5)
        elif signal == "topk_student":
            ids = torch.as_tensor(traj.rollout_topk_ids[r])
            np.testing.assert_array_equal(scores.topk_ids[r], ids.numpy())
            np.testing.assert_allclose(scores.topk_logprobs[r], lp.gather(-1, ids).numpy(), atol=2e-5)
        else:
            assert scores.kind == "sampled" and scores.topk_ids is None and scores.full_logprobs is None


def test_full_signal_in_bfloat16_transfer(model):
    traj = _trajectories(model.config.vocab_size, seed=1)
    ref = _reference(model, traj)
    scores = score_trajectories(model, traj, pad_id=0, signal="full", top_k=K, micro_batch_size=8,
                                transfer_dtype=torch.bfloat16, version=0, chunk_elements=1)
    for r, lp in enumerate(ref):
        assert scores.full_logprobs[r].dtype == np.int16  # raw bf16 bit patterns
        np.testing.assert_allclose(scores.as_float(scores.full_logprobs[r]), lp.numpy(), rtol=2**-7, atol=1e-3)


class _LargestFloat32(TorchDispatchMode):
    """The largest fp32 tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("signal", ["topk_teacher", "topk_student", "sampled", "full"])
def test_no_batch_sized_float32_log_softmax(tiny_model_dir, signal):
    """With a bf16 teacher, no fp32 tensor of the micro-batch's ``B x T x V`` size is ever built:
    fp32 work is done one chunk of positions at a time (the full payload goes out in bf16)."""
    model = load_causal_lm(str(tiny_model_dir), "bfloat16").eval()
    vocab = model.config.vocab_size
    traj = _trajectories(vocab, seed=2)
    batch, width = len(traj), max(RESPONSE_LENGTHS)
    chunk = 2  # positions per chunk
    with _LargestFloat32() as seen:
        score_trajectories(model, traj, pad_id=0, signal=signal, top_k=K, micro_batch_size=batch,
                           transfer_dtype=torch.bfloat16, version=0, chunk_elements=batch * vocab * chunk)
    assert vocab * 2 * chunk <= seen.largest <= batch * chunk * vocab < batch * width * vocab / 4


def test_position_chunks_cover_every_position_within_budget():
    for batch, width, vocab, budget in [(16, 512, 152064, 32 * 2**20), (3, 10, 7, 50), (2, 5, 100, 1)]:
        chunks = position_chunks(batch, width, vocab, budget)
        assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(width))
        assert all(c.stop - c.start == 1 or batch * (c.stop - c.start) * vocab <= budget for c in chunks)


def test_logprob_stats_on_bfloat16_logits_match_float64():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 4, 50, generator=g) * 4).to(torch.bfloat16)
    ids = torch.randint(0, 50, (3, 4), generator=g)
    ref = logits.double().log_softmax(-1)
    stats = logprob_stats(logits, ids, top_k=5, at_ids=ids[..., None].repeat(1, 1, 2))
    torch.testing.assert_close(stats.token.double(), ref.gather(-1, ids[..., None]).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.topk.double(), ref.topk(5, dim=-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.at_ids.double(), ref.gather(-1, ids[..., None]).repeat(1, 1, 2), atol=1e-5, rtol=0)
    assert stats.token.dtype == torch.float32 and stats.normalised is None


def test_topk_student_needs_rollout_ids(model):
    traj = _trajectories(model.config.vocab_size)
    traj.rollout_topk_ids = None
    with pytest.raises(ValueError, match="topk_source"):
        score_trajectories(model, traj, 0, "topk_student", K, 2, torch.float32, 0)
    with pytest.raises(ValueError, match="signal"):
        score_trajectories(model, traj, 0, "bogus", K, 2, torch.float32, 0)


@pytest.mark.parametrize("chunk_positions", [1, 1000])
def test_demonstration_shift_is_the_kl_between_the_two_teacher_prompts(model, chunk_positions):
    """Per position: KL(teacher on its own prompt || teacher on the contrast prompt), against two
    unpadded float64 forwards per row."""
    import dataclasses

    vocab = model.config.vocab_size
    traj = _trajectories(vocab)
    contrast = _trajectories(vocab, seed=1).teacher_prompt_ids  # other prompts, same responses
    traj = dataclasses.replace(traj, contrast_prompt_ids=contrast)
    scores = score_trajectories(model, traj, pad_id=0, signal="sampled", top_k=K, micro_batch_size=2,
                                transfer_dtype=torch.float32, version=0,
                                chunk_elements=chunk_positions * 2 * vocab, demonstration_shift=True)
    true = _reference(model, traj)
    other = _reference(model, dataclasses.replace(traj, teacher_prompt_ids=contrast))
    for r, (p, q) in enumerate(zip(true, other)):
        expected = (p.exp() * (p - q)).sum(-1)
        assert scores.demonstration_shift[r].shape == (len(traj.response_ids[r]),)
        np.testing.assert_allclose(scores.demonstration_shift[r], expected.numpy(), rtol=1e-4, atol=1e-5)
    same = score_trajectories(model, dataclasses.replace(traj, contrast_prompt_ids=traj.teacher_prompt_ids), 0,
                              "sampled", K, 2, torch.float32, 0, demonstration_shift=True)
    assert all(np.abs(s).max(initial=0.0) < 1e-5 for s in same.demonstration_shift)  # same prompt: no shift
    with pytest.raises(ValueError, match="contrast prompts"):
        score_trajectories(model, _trajectories(vocab), 0, "sampled", K, 2, torch.float32, 0, demonstration_shift=True)


def test_mixing_two_teachers_is_the_mixture_of_their_distributions():
    from sdft_ray.scoring import mix_scores
    from sdft_ray.trajectory import TeacherScores

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(3, 5, generator=g, dtype=torch.float64).log_softmax(-1) for _ in range(2)]
    other = [torch.randn(3, 5, generator=g, dtype=torch.float64).log_softmax(-1) for _ in range(2)]
    make = lambda lp, v: TeacherScores(teacher_version=v, kind="full", full_logprobs=[x.float().numpy() for x in lp],  # noqa: E731
                                       token_logprobs=[x[:, 0].float().numpy() for x in lp])
    mixed = mix_scores(make(rows, 4), make(other, 2), 0.25)
    for r in range(2):
        expected = (0.25 * rows[r].exp() + 0.75 * other[r].exp()).log()  # by hand, in probabilities
        np.testing.assert_allclose(mixed.full_logprobs[r], expected.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mixed.token_logprobs[r], expected[:, 0].numpy(), rtol=1e-5, atol=1e-6)
        assert np.allclose(np.exp(mixed.full_logprobs[r]).sum(-1), 1.0, atol=1e-5)  # still a distribution
    assert mixed.teacher_version == 2
    np.testing.assert_allclose(mix_scores(make(rows, 0), make(other, 0), 1.0).full_logprobs[0], rows[0].numpy(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mixing needs"):
        mix_scores(make(rows, 0), TeacherScores(0, "topk", topk_ids=[], topk_logprobs=[], token_logprobs=[]), 0.5)
