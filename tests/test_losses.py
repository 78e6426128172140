"""Tests for sdft_ray.losses against a literal float64 loop reference implemented here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from sdft_ray import losses as L
from sdft_ray.losses import LossSpec, TeacherSignal, distillation_loss

B, T, V, K = 3, 7, 11, 4
ALPHAS = (0.0, 0.3, 0.5, 0.9, 1.0)
LENGTHS = ([7, 4, 0], [5, 0, 2], [2, 7, 3])  # one fully masked sequence in the first two
CLIP = 1.2


pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- reference (float64)
def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    m = z.max().detach()
    return z - m - torch.log(torch.exp(z - m).sum())


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p||q) for 1-D log-prob vectors (all finite)."""
    return (torch.exp(p) * (p - q)).sum()


def ref_div(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0.0:
        return ref_kl(t, s)
    if alpha == 1.0:
        return ref_kl(s, t)
    m = torch.log((1 - alpha) * torch.exp(s) + alpha * torch.exp(t))
    return alpha * ref_kl(t, m) + (1 - alpha) * ref_kl(s, m)


@dataclass
class Batch:
    logits: torch.Tensor          # [B,T,V] float64
    teacher_logp: torch.Tensor    # [B,T,V] float64 normalized
    ids: torch.Tensor             # [B,T] sampled tokens
    mask: torch.Tensor            # [B,T] bool
    topk_ids: torch.Tensor        # [B,T,K]
    rollout: torch.Tensor         # [B,T] behaviour log-probs


def make_batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    probs = torch.softmax(logits, -1).reshape(-1, V)
    ids = torch.multinomial(probs, 1, generator=g).reshape(B, T)
    mask = torch.arange(T) < torch.tensor(LENGTHS[seed % len(LENGTHS)])[:, None]
    source = logits if seed % 2 else teacher_logp  # student's or teacher's top-k
    topk_ids = source.topk(K, dim=-1).indices
    student_tok = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    rollout = student_tok + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return Batch(logits, teacher_logp, ids, mask, topk_ids, rollout)


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


@dataclass
class RefTokens:
    per_tok: torch.Tensor                 # [B,T] per-token loss, graph to the logits
    div: dict[tuple[int, int], float]     # per-token divergence metric
    reward: dict[tuple[int, int], float]  # implicit reward where the teacher token logp is known
    s_tok: dict[tuple[int, int], float]   # student log-prob of the sampled token


def ref_tokens(bt: Batch, logits: torch.Tensor, alpha: float, estimator: str, tail: bool) -> RefTokens:
    """Literal loop over positions; ``logits`` is float64 and may require grad."""
    per_tok: dict[tuple[int, int], torch.Tensor] = {}
    div: dict[tuple[int, int], float] = {}
    reward: dict[tuple[int, int], float] = {}
    s_tok: dict[tuple[int, int], float] = {}
    for b in range(B):
        for t in range(T):
            s = ref_log_softmax(logits[b, t])
            te = bt.teacher_logp[b, t]
            y = int(bt.ids[b, t])
            s_tok[b, t] = _f(s[y])
            if estimator == "full":
                d = ref_div(s, te, alpha)
                div[b, t] = _f(d)
                reward[b, t] = _f(te[y] - s[y])
            elif estimator == "topk":
                ids = [int(i) for i in bt.topk_ids[b, t]]
                sk = torch.stack([s[i] for i in ids])
                tk = torch.stack([te[i] for i in ids])
                if tail:
                    sk = torch.cat([sk, torch.log(1 - torch.exp(sk).sum())[None]])
                    tk = torch.cat([tk, torch.log(1 - torch.exp(tk).sum())[None]])
                else:
                    sk = sk - torch.log(torch.exp(sk).sum())
                    tk = tk - torch.log(torch.exp(tk).sum())
                d = ref_div(sk, tk, alpha)
                div[b, t] = _f(d)
                if y in ids:
                    reward[b, t] = _f(te[y] - s[y])
            else:
                adv = _f(te[y]) - _f(s[y])
                d = -adv * s[y]
                div[b, t] = -adv
                reward[b, t] = adv
            per_tok[b, t] = d
    stacked = torch.stack([torch.stack([per_tok[b, t] for t in range(T)]) for b in range(B)])
    return RefTokens(stacked, div, reward, s_tok)


def ref_aggregate(bt: Batch, rt: RefTokens, per_tok: torch.Tensor, skip: int, aggregation: str,
                  use_is: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Literal loops: skip mask, importance weights, aggregation and metrics."""
    s_tok, div, reward = rt.s_tok, rt.div, rt.reward
    valid = [[bool(bt.mask[b, t]) and t >= skip for t in range(T)] for b in range(B)]
    weights = [1.0] * B
    if use_is:
        for b in range(B):
            r = [min(math.exp(s_tok[b, t] - float(bt.rollout[b, t])), CLIP)
                 for t in range(T) if valid[b][t]]
            weights[b] = sum(r) / len(r) if r else 1.0
    cells = [(b, t) for b in range(B) for t in range(T) if valid[b][t]]
    loss = torch.zeros((), dtype=torch.float64)
    if aggregation == "token_mean":
        for b, t in cells:
            loss = loss + weights[b] * per_tok[b, t] / len(cells)
    else:
        seqs = [b for b in range(B) if any(valid[b])]
        for b in seqs:
            ts = [t for t in range(T) if valid[b][t]]
            loss = loss + weights[b] * sum(per_tok[b, t] for t in ts) / len(ts) / len(seqs)
    rw = [reward[c] for c in cells if c in reward]
    metrics = {"loss": _f(loss), "loss_tokens": float(len(cells)), "divergence_sum": sum(div[c] for c in cells),
               "reward_sum": sum(rw), "reward_tokens": float(len(rw))}
    if use_is:
        seqs = [b for b in range(B) if any(valid[b])]
        metrics["is_weight_sum"] = sum(weights[b] for b in seqs)
        metrics["is_weight_sequences"] = float(len(seqs))
    return loss, metrics


def teacher_signal(bt: Batch, estimator: str, dtype: torch.dtype) -> TeacherSignal:
    if estimator == "full":
        return TeacherSignal(full_logprobs=bt.teacher_logp.to(dtype))
    if estimator == "topk":
        return TeacherSignal(topk_ids=bt.topk_ids,
                             topk_logprobs=bt.teacher_logp.gather(-1, bt.topk_ids).to(dtype))
    return TeacherSignal(token_logprobs=bt.teacher_logp.gather(-1, bt.ids[..., None])[..., 0].to(dtype))


CONFIGS = ([(a, "full", True) for a in ALPHAS] + [(a, "topk", True) for a in ALPHAS]
           + [(a, "topk", False) for a in ALPHAS] + [(1.0, "sampled", True)])


@pytest.mark.parametrize("alpha,estimator,tail", CONFIGS)
def test_distillation_loss_matches_reference(alpha: float, estimator: str, tail: bool) -> None:
    for seed in (0, 1, 2):
        bt = make_batch(seed)
        for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
            x = bt.logits.to(dtype)
            ref_in = x.double().requires_grad_(True)
            rt = ref_tokens(bt, ref_in, alpha, estimator, tail)
            # d per_tok[b,t] depends on logits[b,t] only, so one backward gives every row's gradient
            (jac,) = torch.autograd.grad(rt.per_tok.sum(), ref_in)
            for skip in (0, 1, 3):
                for aggregation in L.AGGREGATIONS:
                    for use_is in (False, True):
                        spec = LossSpec(alpha=alpha, estimator=estimator, tail_bucket=tail,
                                        skip_first_tokens=skip, aggregation=aggregation,
                                        is_clip=CLIP if use_is else None)
                        student = x.clone().requires_grad_(True)
                        loss, metrics = distillation_loss(
                            spec, student, bt.ids, bt.mask, teacher_signal(bt, estimator, dtype),
                            rollout_logprobs=bt.rollout.to(dtype))
                        (grad,) = torch.autograd.grad(loss, student)
                        leaf = rt.per_tok.detach().requires_grad_(True)
                        rloss, rmetrics = ref_aggregate(bt, rt, leaf, skip, aggregation, use_is)
                        coef = (torch.autograd.grad(rloss, leaf)[0] if rloss.requires_grad
                                else torch.zeros_like(leaf))
                        rgrad = coef[..., None] * jac  # chain rule: dloss/dd_bt * dd_bt/dlogits_bt
                        ctx = f"seed={seed} {dtype} skip={skip} {aggregation} is={use_is}"
                        assert loss.dtype == dtype and loss.dim() == 0, ctx
                        torch.testing.assert_close(loss.double(), rloss, atol=tol, rtol=tol, msg=ctx)
                        torch.testing.assert_close(grad.double(), rgrad, atol=tol, rtol=tol, msg=ctx)
                        assert metrics.keys() == rmetrics.keys(), ctx
                        for key, val in rmetrics.items():
                            assert metrics[key] == pytest.approx(val, abs=tol, rel=tol), (ctx, key)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_elementwise_functions_match_reference(alpha: float) -> None:
    bt = make_batch(5)
    tk_lp = bt.teacher_logp.gather(-1, bt.topk_ids)
    full = L.full_vocab_divergence(bt.logits, bt.teacher_logp, alpha)
    assert full.shape == (B, T)
    for tail in (True, False):
        topk = L.topk_divergence(bt.logits, bt.topk_ids, tk_lp, alpha, tail)
        assert topk.shape == (B, T)
        for b in range(B):
            for t in range(T):
                s = ref_log_softmax(bt.logits[b, t])
                assert float(full[b, t]) == pytest.approx(
                    float(ref_div(s, bt.teacher_logp[b, t], alpha)), abs=1e-12)
                sk, tk = s[bt.topk_ids[b, t]], tk_lp[b, t]
                if tail:
                    sk = torch.cat([sk, torch.log(1 - sk.exp().sum())[None]])
                    tk = torch.cat([tk, torch.log(1 - tk.exp().sum())[None]])
                else:
                    sk, tk = sk - sk.exp().sum().log(), tk - tk.exp().sum().log()
                assert float(topk[b, t]) == pytest.approx(float(ref_div(sk, tk, alpha)), abs=1e-12)


def test_divergence_nonnegative_and_zero_on_equal() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.log_softmax(torch.randn(50, V, generator=g, dtype=torch.float64) * 3, -1)
    t = torch.log_softmax(torch.randn(50, V, generator=g, dtype=torch.float64) * 3, -1)
    for alpha in ALPHAS:
        d = L.divergence_from_logprobs(s, t, alpha)
        assert d.shape == (50,) and (d > 0).all()
        same = L.divergence_from_logprobs(s, s.clone(), alpha)
        torch.testing.assert_close(same, torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_zero_probability_entries_are_safe(alpha: float) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, V, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    teacher[..., :4] = -math.inf  # teacher puts zero probability on the first four tokens
    teacher_lp = torch.log_softmax(teacher, -1)
    if alpha < 1.0:  # forward KL / JSD stay finite with a student of full support
        d = L.full_vocab_divergence(logits, teacher_lp, alpha)
        (grad,) = torch.autograd.grad(d.sum(), logits)
        assert torch.isfinite(d).all() and torch.isfinite(grad).all() and (d > 0).all()
        # the zero-probability entries are exactly skipped in KL(teacher||student)
        if alpha == 0.0:
            s = torch.log_softmax(logits.detach(), -1)
            p = teacher_lp.exp()
            manual = (p[..., 4:] * (teacher_lp[..., 4:] - s[..., 4:])).sum(-1)
            torch.testing.assert_close(d.detach(), manual)
    # both distributions zero on the same entries (student logits -inf): every alpha is finite
    student = logits.detach().clone()
    student[..., :4] = -math.inf
    student.requires_grad_(True)
    d = L.full_vocab_divergence(student, teacher_lp, alpha)
    (grad,) = torch.autograd.grad(d.sum(), student)
    assert torch.isfinite(d).all() and not torch.isnan(grad).any()
    assert torch.isfinite(grad[..., 4:]).all() and (grad[..., :4] == 0).all()
    # -inf in either argument of divergence_from_logprobs directly
    s_lp = torch.log_softmax(student.detach(), -1).requires_grad_(True)
    t_lp = teacher_lp.clone().requires_grad_(True)
    d = L.divergence_from_logprobs(s_lp, t_lp, alpha)
    gs, gt = torch.autograd.grad(d.sum(), (s_lp, t_lp))
    assert torch.isfinite(d).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_topk_with_full_vocab_equals_full(alpha: float) -> None:
    bt = make_batch(3)
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(0)).expand(B, T, V).contiguous()
    x = bt.logits.clone().requires_grad_(True)
    full = L.full_vocab_divergence(x, bt.teacher_logp, alpha)
    topk = L.topk_divergence(x, ids, bt.teacher_logp.gather(-1, ids), alpha, tail_bucket=False)
    torch.testing.assert_close(topk, full, atol=1e-10, rtol=1e-10)
    g_full, = torch.autograd.grad(full.sum(), x)
    g_topk, = torch.autograd.grad(topk.sum(), x)
    torch.testing.assert_close(g_topk, g_full, atol=1e-10, rtol=1e-10)
    # with a tail bucket the tail mass rounds to ~0: finite and close to full
    tail = L.topk_divergence(x, ids, bt.teacher_logp.gather(-1, ids), alpha, tail_bucket=True)
    assert torch.isfinite(tail).all()
    torch.testing.assert_close(tail, full, atol=1e-10, rtol=1e-8)


def test_tail_bucket_with_rounding_mass_above_one_is_finite() -> None:
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    ids = torch.tensor([[[0, 1, 2, 3]]])
    teacher = torch.full((1, 1, 4), math.log(0.25) + 1e-6)  # sums to slightly more than 1
    d = L.topk_divergence(logits, ids, teacher, 0.0, tail_bucket=True)
    (grad,) = torch.autograd.grad(d.sum(), logits)
    assert torch.isfinite(d).all() and torch.isfinite(grad).all() and abs(float(d.detach())) < 1e-4


def test_sampled_token_gradient_is_reinforce_reverse_kl() -> None:
    bt = make_batch(4)
    x = bt.logits.clone().requires_grad_(True)
    s_tok = L.token_logprobs(x, bt.ids)
    t_tok = bt.teacher_logp.gather(-1, bt.ids[..., None])[..., 0]
    (grad,) = torch.autograd.grad(L.sampled_token_loss(s_tok, t_tok).sum(), x)
    probs = torch.softmax(bt.logits, -1)
    onehot = torch.nn.functional.one_hot(bt.ids, V).double()
    adv = (t_tok - s_tok).detach()
    torch.testing.assert_close(grad, -adv[..., None] * (onehot - probs))  # -A * grad log pi(y)
    torch.testing.assert_close(L.implicit_reward(s_tok, t_tok), adv)
    assert not L.implicit_reward(s_tok, t_tok).requires_grad
    # E_{y ~ pi}[grad of surrogate] == grad of the exact reverse KL
    expected = torch.zeros_like(x)
    for y in range(V):
        x_y = bt.logits.clone().requires_grad_(True)
        ys = torch.full((B, T), y)
        s_y = L.token_logprobs(x_y, ys)
        loss_y = (probs[..., y] * L.sampled_token_loss(s_y, bt.teacher_logp[..., y])).sum()
        expected += torch.autograd.grad(loss_y, x_y)[0]
    x_r = bt.logits.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(L.full_vocab_divergence(x_r, bt.teacher_logp, 1.0).sum(), x_r)
    torch.testing.assert_close(expected, exact, atol=1e-10, rtol=1e-8)


def test_token_logprobs_and_low_precision_logits() -> None:
    bt = make_batch(0)
    ref = torch.log_softmax(bt.logits, -1).gather(-1, bt.ids[..., None])[..., 0]
    torch.testing.assert_close(L.token_logprobs(bt.logits, bt.ids), ref, atol=1e-12, rtol=0)
    bf = bt.logits.to(torch.bfloat16)
    out = L.token_logprobs(bf, bt.ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), torch.log_softmax(bf.double(), -1)
                               .gather(-1, bt.ids[..., None])[..., 0], atol=1e-5, rtol=0)
    loss, metrics = distillation_loss(LossSpec(), bf.requires_grad_(True), bt.ids, bt.mask,
                                      TeacherSignal(full_logprobs=bt.teacher_logp.to(torch.bfloat16)))
    assert loss.dtype == torch.float32 and math.isfinite(metrics["loss"])
    loss.backward()
    assert bf.grad is not None and bf.grad.dtype == torch.bfloat16


def test_response_loss_mask() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert L.response_loss_mask(mask, 0).tolist() == mask.bool().tolist()
    assert L.response_loss_mask(mask, 1).int().tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0] * 5]
    assert L.response_loss_mask(mask, 3).int().tolist() == [[0, 0, 0, 1, 0], [0] * 5, [0] * 5]
    assert not L.response_loss_mask(mask.bool(), 5).any()
    assert not L.response_loss_mask(mask.bool(), 99).any()
    with pytest.raises(ValueError):
        L.response_loss_mask(mask, -1)


def test_aggregate_modes_and_weights() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")], [7.0, 8.0, 9.0]],
                     requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    w = torch.tensor([2.0, 0.5, 3.0])
    assert _f(L.aggregate(x, mask, "sequence_mean")) == pytest.approx((2.0 + 4.0) / 2)
    assert _f(L.aggregate(x, mask, "token_mean")) == pytest.approx(10.0 / 4)
    assert _f(L.aggregate(x, mask, "sequence_mean", w)) == pytest.approx((2 * 2.0 + 0.5 * 4.0) / 2)
    out = L.aggregate(x, mask, "token_mean", w)
    assert _f(out) == pytest.approx((2 * 6.0 + 0.5 * 4.0) / 4)
    (grad,) = torch.autograd.grad(out, x)
    assert grad.tolist() == [[0.5, 0.5, 0.5], [0.125, 0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        L.aggregate(x, mask, "mean")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregate_without_valid_tokens_is_zero_with_grad(mode: str) -> None:
    x = torch.randn(3, 5, requires_grad=True)
    out = L.aggregate(x, torch.zeros(3, 5, dtype=torch.bool), mode)  # type: ignore[arg-type]
    assert _f(out) == 0.0 and out.grad_fn is not None
    out.backward()
    assert x.grad is not None and (x.grad == 0).all()
    # through the full loss: everything skipped
    bt = make_batch(0)
    logits = bt.logits.clone().requires_grad_(True)
    spec = LossSpec(skip_first_tokens=T, aggregation=mode, is_clip=2.0)  # type: ignore[arg-type]
    loss, metrics = distillation_loss(spec, logits, bt.ids, bt.mask,
                                      TeacherSignal(full_logprobs=bt.teacher_logp), bt.rollout)
    loss.backward()
    assert _f(loss) == 0.0 and logits.grad is not None and (logits.grad == 0).all()
    assert metrics["loss_tokens"] == 0.0 and metrics["is_weight_sequences"] == 0.0
    assert metrics["reward_tokens"] == 0.0 and metrics["reward_sum"] == 0.0


def test_importance_weights() -> None:
    train = torch.tensor([[0.0, -1.0, -2.0], [-1.0, 0.0, 5.0], [0.0, 0.0, 0.0]], requires_grad=True)
    rollout = torch.tensor([[0.0, -1.5, -1.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    w = L.importance_weights(train, rollout, mask, clip=1.5)
    assert not w.requires_grad and w.shape == (3,)
    expected = [(1.0 + min(math.exp(0.5), 1.5) + math.exp(-1.0)) / 3, 1.0, 1.0]
    torch.testing.assert_close(w, torch.tensor(expected))
    assert float(L.importance_weights(train, rollout, mask, clip=1.1)[0]) == pytest.approx(
        (1.0 + 1.1 + math.exp(-1.0)) / 3)


def test_topk_implicit_reward_only_over_hits() -> None:
    bt = make_batch(1)
    ids = bt.topk_ids.clone()
    ids[..., 0] = bt.ids  # the response token is always among the ids ...
    ids[0, :, 0] = (bt.ids[0] + 1) % V  # ... except in sequence 0
    ids[0] = torch.where(ids[0] == bt.ids[0][:, None], (bt.ids[0][:, None] + 2) % V, ids[0])
    signal = TeacherSignal(topk_ids=ids, topk_logprobs=bt.teacher_logp.gather(-1, ids))
    _, metrics = distillation_loss(LossSpec(estimator="topk", skip_first_tokens=0), bt.logits,
                                   bt.ids, bt.mask, signal)
    s = torch.log_softmax(bt.logits, -1).gather(-1, bt.ids[..., None])[..., 0]
    t = bt.teacher_logp.gather(-1, bt.ids[..., None])[..., 0]
    hits = bt.mask.clone()
    hits[0] = False
    assert metrics["reward_sum"] / metrics["reward_tokens"] == pytest.approx(float((t - s)[hits].mean()), abs=1e-10)
    assert metrics["reward_tokens"] == float(hits.sum())
    only_seq0 = torch.zeros_like(bt.mask)
    only_seq0[0] = bt.mask[0]
    _, metrics = distillation_loss(LossSpec(estimator="topk", skip_first_tokens=0), bt.logits,
                                   bt.ids, only_seq0, signal)
    assert metrics["reward_tokens"] == 0.0 and metrics["loss_tokens"] == float(only_seq0.sum())


def test_validation_errors() -> None:
    bt = make_batch(0)
    full = TeacherSignal(full_logprobs=bt.teacher_logp)
    topk = TeacherSignal(topk_ids=bt.topk_ids, topk_logprobs=bt.teacher_logp.gather(-1, bt.topk_ids))
    tok = TeacherSignal(token_logprobs=bt.teacher_logp[..., 0])
    assert (full.kind, topk.kind, tok.kind) == ("full", "topk", "sampled")
    for spec, signal in ((LossSpec(), topk), (LossSpec(estimator="topk"), full),
                         (LossSpec(estimator="sampled", alpha=1.0), full), (LossSpec(), tok)):
        with pytest.raises(ValueError, match="loss.estimator"):
            distillation_loss(spec, bt.logits, bt.ids, bt.mask, signal)
    for alpha in (0.0, 0.5, 0.99):
        with pytest.raises(ValueError, match=r"loss\.alpha"):
            LossSpec(estimator="sampled", alpha=alpha)
    for kwargs in ({"alpha": 1.5}, {"estimator": "dense"}, {"aggregation": "sum"},
                   {"skip_first_tokens": -1}, {"is_clip": 0.0}):
        with pytest.raises(ValueError):
            LossSpec(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        TeacherSignal(full_logprobs=bt.teacher_logp, token_logprobs=bt.teacher_logp[..., 0])
    with pytest.raises(ValueError, match="exactly one"):
        TeacherSignal()
    with pytest.raises(ValueError, match="together"):
        TeacherSignal(topk_ids=bt.topk_ids)
    with pytest.raises(ValueError, match=r"teacher\.full_logprobs.*\(3, 7, 10\)"):
        distillation_loss(LossSpec(), bt.logits, bt.ids, bt.mask,
                          TeacherSignal(full_logprobs=bt.teacher_logp[..., :10]))
    with pytest.raises(ValueError, match=r"response_ids.*\(3, 6\)"):
        distillation_loss(LossSpec(), bt.logits, bt.ids[:, :6], bt.mask, full)
    with pytest.raises(ValueError, match=r"response_mask"):
        distillation_loss(LossSpec(), bt.logits, bt.ids, bt.mask[:2], full)
    with pytest.raises(ValueError, match=r"teacher\.topk_logprobs"):
        bad = TeacherSignal(topk_ids=bt.topk_ids, topk_logprobs=bt.teacher_logp[..., :3])
        distillation_loss(LossSpec(estimator="topk"), bt.logits, bt.ids, bt.mask, bad)
    with pytest.raises(ValueError, match=r"rollout_logprobs"):
        distillation_loss(LossSpec(is_clip=2.0), bt.logits, bt.ids, bt.mask, full)
    with pytest.raises(ValueError, match=r"rollout_logprobs.*\(3, 5\)"):
        distillation_loss(LossSpec(is_clip=2.0), bt.logits, bt.ids, bt.mask, full, bt.rollout[:, :5])
    with pytest.raises(ValueError, match="alpha"):
        L.divergence_from_logprobs(bt.teacher_logp, bt.teacher_logp, -0.1)


def test_valid_names_exported() -> None:
    assert L.VALID_NAMES == {"estimator": ("full", "topk", "sampled"),
                             "aggregation": ("sequence_mean", "token_mean")}


def test_fused_forward_kl_equals_the_generic_path() -> None:
    """forward_kl_from_logits (hand-written backward) = divergence_from_logprobs(alpha=0) in value
    and gradient, teacher zeros included; gradcheck in float64."""
    g = torch.Generator().manual_seed(5)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        logits = (3 * torch.randn(3, 4, V, generator=g, dtype=torch.float64)).to(dtype)
        teacher = torch.randn(3, 4, V, generator=g, dtype=torch.float64)
        teacher[0, :, :5] = -math.inf
        teacher_lp = torch.log_softmax(teacher, -1).to(dtype)
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        fused = L.forward_kl_from_logits(a, teacher_lp)
        generic = L.divergence_from_logprobs(b.log_softmax(-1), teacher_lp, 0.0)
        w = torch.rand(3, 4, generator=g, dtype=torch.float64).to(dtype)  # an arbitrary upstream gradient
        (ga,) = torch.autograd.grad((fused * w).sum(), a)
        (gb,) = torch.autograd.grad((generic * w).sum(), b)
        torch.testing.assert_close(fused, generic, atol=tol, rtol=tol)
        torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)
    x = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(2, 3, 7, generator=g, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda z: L._ForwardKLFromLogits.apply(z, t), (x,))


# ---- position weights by the demonstration shift ---------------------------------------------------

@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_position_weighted_aggregate_matches_a_loop(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    w = torch.rand(3, 5, generator=g, dtype=torch.float64)
    w[2] = 0.0  # a sequence the demonstration never moves: contributes 0, still counts as a sequence
    w[0, 4] = 100.0  # a masked position: never counts, whatever its weight
    if mode == "token_mean":
        num = sum(float(w[b, t] * x[b, t]) for b in range(3) for t in range(5) if mask[b, t])
        den = sum(float(w[b, t]) for b in range(3) for t in range(5) if mask[b, t])
        expected = num / den
    else:
        means = []
        for b in range(3):
            den = sum(float(w[b, t]) for t in range(5) if mask[b, t])
            means.append(sum(float(w[b, t] * x[b, t]) for t in range(5) if mask[b, t]) / den if den else 0.0)
        expected = sum(means) / 3
    assert float(L.aggregate(x, mask, mode, position_weights=w)) == pytest.approx(expected, rel=1e-12)
    ones = torch.ones_like(w)
    assert float(L.aggregate(x, mask, mode, position_weights=ones)) == pytest.approx(float(L.aggregate(x, mask, mode)))


def test_demonstration_shift_weighting_moves_the_gradient_to_where_the_demonstration_matters() -> None:
    """Hand-made: position 0 is framing (teacher far from the student, but any demonstration causes
    it: shift 0), position 2 holds the answer (shift 5 nats). Uniform weights put most of the
    gradient on the framing; demonstration-shift weights put (nearly) all of it on the answer."""
    vocab = 6
    logits = torch.zeros(1, 3, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.full((1, 3, vocab), -20.0, dtype=torch.float64)
    teacher[0, 0, 1] = 0.0  # framing: the teacher wants token 1 where the student is uniform
    teacher[0, 1] = math.log(1 / vocab)  # agreement
    teacher[0, 2, 4] = 0.0  # the answer: token 4
    teacher = teacher.log_softmax(-1)
    shift = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)
    ids, mask = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool)
    grads = {}
    for weighting in ("uniform", "demonstration_shift"):
        spec = LossSpec(skip_first_tokens=0, position_weights=weighting, shift_floor=0.01)
        signal = TeacherSignal(full_logprobs=teacher, demonstration_shift=shift)
        loss, metrics = distillation_loss(spec, logits, ids, mask, signal)
        (grads[weighting],) = torch.autograd.grad(loss, logits)
        assert metrics["shift_sum"] == pytest.approx(5.0)
    framing, answer = grads["uniform"][0, 0].norm(), grads["uniform"][0, 2].norm()
    assert framing == pytest.approx(answer)  # equal pulls under uniform weights (same divergence)
    weighted = grads["demonstration_shift"]
    assert weighted[0, 0].norm() < 0.01 * weighted[0, 2].norm()
    # the answer position's pull toward token 4, weight 5.01 / 5.03 of the sequence's loss
    assert float(-weighted[0, 2, 4]) == pytest.approx((5.01 / 5.03) * (1 - 1 / vocab), rel=1e-3)


def test_shift_weighting_needs_the_teachers_shift() -> None:
    bt = make_batch(0)
    with pytest.raises(ValueError, match="sent no demonstration shift"):
        distillation_loss(LossSpec(position_weights="demonstration_shift"), bt.logits, bt.ids, bt.mask,
                          TeacherSignal(full_logprobs=bt.teacher_logp))
    with pytest.raises(ValueError, match="position_weights"):
        LossSpec(position_weights="answer_only")
