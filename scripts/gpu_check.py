"""GPU check: the numerics and memory of the GPU path on one CUDA device, in a few minutes.

    bash scripts/gpu_check.sh            # or: PYTHONPATH=. python3 scripts/gpu_check.py [--device cpu]

Needs only torch, numpy and transformers (no Ray, DeepSpeed, vLLM, pydantic: they are blocked
on import here, so the CPU run in CI proves it), the repository on ``PYTHONPATH``, no network.
Each check prints PASS, FAIL or SKIP with its numbers; the exit status is 1 if any FAILed.

1. ``loss``: every distillation loss (forward KL, reverse KL, JSD; full vocabulary, top-k with
   and without the tail bucket, sampled token; ``sequence_mean`` and ``token_mean``; one with the
   importance-weight correction) on the device, from fp32 and from bf16 logits, against a
   float64 CPU reference written out here (values and gradients);
2. ``reduction``: :func:`sdft_ray.distributed.all_reduce_sum` on a 1-rank NCCL group (gloo on
   CPU); on CUDA also why the old ``all_reduce(total.to(device))`` read an unreduced tensor;
3. ``forward``: :func:`sdft_ray.forward.response_logits` of a small random Llama (left padding,
   ragged responses) on the device in fp32 and bf16 against fp32 on the CPU;
4. ``ema``: the streaming EMA update from bf16 parameters on the device into an fp32 EMA (on the
   device and on the host) against a float64 recurrence;
5. ``rollout``: the per-step log-probs and top-k of ``generate`` (``StepLogprobs``) against one
   full forward;
6. ``scoring memory`` (CUDA only): peak ``torch.cuda.max_memory_allocated`` of teacher scoring
   (top-k and sampled token) for a [16, 512] x 152,064-vocabulary batch, the old full fp32
   log-softmax against :mod:`sdft_ray.scoring`, as a ratio; both must agree on the numbers.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _blocked in ("ray", "deepspeed", "vllm", "pydantic"):  # the GPU image has none of these
    sys.modules.setdefault(_blocked, None)
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


def report(name: str, status: str, detail: str = "") -> None:
    RESULTS.append((name, status, detail))
    print(f"{status:4s}  {name}" + (f": {detail}" if detail else ""), flush=True)


def expect(name: str, ok: bool, detail: str) -> None:
    report(name, "PASS" if ok else "FAIL", detail)


# ---- 1. losses --------------------------------------------------------------------------------


def _ref_divergence(s: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """float64 KL / generalized JSD between log-prob vectors (last dim), written out plainly."""
    ps, pt = s.exp(), t.exp()
    if alpha == 0.0:
        return (pt * (t - s)).sum(-1)
    if alpha == 1.0:
        return (ps * (s - t)).sum(-1)
    log_m = ((1 - alpha) * ps + alpha * pt).log()
    return alpha * (pt * (t - log_m)).sum(-1) + (1 - alpha) * (ps * (s - log_m)).sum(-1)


def _ref_loss(logits64, ids, valid, skip, estimator, alpha, tail, aggregation, teacher, rollout, is_clip):
    s_logp = logits64.log_softmax(-1)
    s_tok = s_logp.gather(-1, ids[..., None]).squeeze(-1)
    mask = valid & (torch.arange(ids.shape[1])[None] >= skip)
    if estimator == "sampled":
        t_tok = teacher["token"]
        per = -(t_tok - s_tok).detach() * s_tok
    elif estimator == "full":
        per = _ref_divergence(s_logp, teacher["full"], alpha)
    else:
        s_k, t_k = s_logp.gather(-1, teacher["topk_ids"]), teacher["topk"]
        if tail:
            s_k = torch.cat([s_k, (1 - s_k.exp().sum(-1, keepdim=True)).log()], -1)
            t_k = torch.cat([t_k, (1 - t_k.exp().sum(-1, keepdim=True)).log()], -1)
        else:
            s_k, t_k = s_k - s_k.logsumexp(-1, keepdim=True), t_k - t_k.logsumexp(-1, keepdim=True)
        per = _ref_divergence(s_k, t_k, alpha)
    per = torch.where(mask, per, 0.0)
    counts = mask.sum(-1)
    if is_clip is not None:
        ratio = torch.where(mask, (s_tok.detach() - rollout).exp().clamp(max=is_clip), 0.0)
        weights = torch.where(counts > 0, ratio.sum(-1) / counts.clamp(min=1), 1.0)
        per = per * weights[:, None]
    if aggregation == "token_mean":
        return per.sum() / counts.sum()
    return (per.sum(-1) / counts.clamp(min=1)).sum() / (counts > 0).sum()


def check_losses(device: str) -> None:
    from sdft_ray.losses import LossSpec, TeacherSignal, distillation_loss

    g = torch.Generator().manual_seed(0)
    B, T, V, k, skip = 4, 24, 2048, 8, 1
    lengths = torch.tensor([24, 17, 5, 1])  # the last row has no loss token after skipping 1
    valid = torch.arange(T)[None] < lengths[:, None]
    ids = torch.randint(0, V, (B, T), generator=g)
    student = torch.randn(B, T, V, generator=g) * 3
    teacher_full = (torch.randn(B, T, V, generator=g) * 3).log_softmax(-1)
    topk = teacher_full.topk(k, dim=-1)
    teacher_tok = teacher_full.gather(-1, ids[..., None]).squeeze(-1)
    rollout = (student.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) + 0.3 * torch.randn(B, T, generator=g))
    ref_teacher = {"full": teacher_full.double(), "topk_ids": topk.indices, "topk": topk.values.double(),
                   "token": teacher_tok.double()}
    signals = {"full": TeacherSignal(full_logprobs=teacher_full.to(device)),
               "topk": TeacherSignal(topk_ids=topk.indices.to(device), topk_logprobs=topk.values.to(device)),
               "sampled": TeacherSignal(token_logprobs=teacher_tok.to(device))}
    cases = [("full", a, True, None) for a in (0.0, 0.5, 1.0)] + [("full", 0.0, True, 2.0)]
    cases += [("topk", a, tail, None) for tail in (True, False) for a in (0.0, 0.5, 1.0)]
    cases += [("sampled", 1.0, True, None)]
    tolerance = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-2)}  # (value rel, grad rel to max)
    for estimator, alpha, tail, is_clip in cases:
        label = f"loss {estimator}" + (f" tail={tail}" if estimator == "topk" else "") + f" alpha={alpha}" + (
            f" is_clip={is_clip}" if is_clip else "")
        worst, problems = {}, []
        for dtype in (torch.float32, torch.bfloat16):
            for aggregation in ("sequence_mean", "token_mean"):
                spec = LossSpec(alpha=alpha, estimator=estimator, tail_bucket=tail, skip_first_tokens=skip,
                                aggregation=aggregation, is_clip=is_clip)
                x = student.to(dtype).to(device=device, copy=True).requires_grad_()  # a fresh leaf
                loss, _ = distillation_loss(spec, x, ids.to(device), valid.to(device), signals[estimator],
                                            rollout.to(device))
                loss.backward()
                x64 = student.to(dtype).to(torch.float64, copy=True).requires_grad_()  # the same rounded input
                ref = _ref_loss(x64, ids, valid, skip, estimator, alpha, tail, aggregation, ref_teacher,
                                rollout.double(), is_clip)
                ref.backward()
                if x.grad is None or x.grad.device != x.device or x.grad.dtype != dtype:
                    problems.append(f"{dtype} {aggregation}: gradient missing or on the wrong device/dtype")
                    continue
                value, ref_value = float(loss.detach()), float(ref.detach())
                value_err = abs(value - ref_value) / max(abs(ref_value), 1e-6)
                grad_err = float((x.grad.double().cpu() - x64.grad).abs().max() / x64.grad.abs().max().clamp(min=1e-30))
                name = str(dtype).removeprefix("torch.")
                worst[name] = tuple(max(a, b) for a, b in zip(worst.get(name, (0.0, 0.0)), (value_err, grad_err)))
                value_tol, grad_tol = tolerance[dtype]
                if not (math.isfinite(value) and value_err <= value_tol and grad_err <= grad_tol):
                    problems.append(f"{name} {aggregation}: value rel err {value_err:.1e} (tol {value_tol:.0e}), "
                                    f"grad err {grad_err:.1e} (tol {grad_tol:.0e})")
        expect(f"{label} on {device}", not problems,
               "; ".join(problems) if problems else "both aggregations; " + "; ".join(
                   f"{name} logits: value rel err {v:.1e}, grad err {g:.1e}" for name, (v, g) in worst.items()))


# ---- 2. reduction -----------------------------------------------------------------------------


def check_reduction(device: str) -> None:
    import torch.distributed as dist

    from sdft_ray.distributed import all_reduce_sum

    cuda = device == "cuda"
    backend = "nccl" if cuda else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            got = all_reduce_sum([3.0, 4.5], device)
            expect(f"reduction all_reduce_sum on a 1-rank {backend} group", got == [3.0, 4.5], f"got {got}")
            if not cuda:
                report("reduction old pattern on CUDA", "SKIP", "needs CUDA (on the CPU .to() returns the tensor itself)")
                return
            # A 1-rank SUM changes nothing: a pre-multiplied sum (x2, NCCL only) makes the reduction
            # visible, so that reading back the reduced tensor or not gives different answers.
            try:
                premul = dist._make_nccl_premul_sum(2.0)
            except (AttributeError, RuntimeError, ValueError) as exc:  # a private API
                report("reduction old pattern vs helper on CUDA", "SKIP", f"no NCCL premul sum: {exc!r:.80}")
                return
            plain = dist.all_reduce
            dist.all_reduce = lambda tensor, op=None, group=None, async_op=False: plain(tensor, op=premul, group=group)
            try:
                helper = all_reduce_sum([3.0, 4.5], device)
                total = torch.tensor([3.0], dtype=torch.float64)
                dist.all_reduce(total.to(device))  # the old _normaliser on a GPU
                old = float(total.item())
            except RuntimeError as exc:  # the plain sum above worked: the premul op is what failed
                report("reduction old pattern vs helper on CUDA", "SKIP", f"NCCL premul sum failed: {exc!r:.120}")
                return
            finally:
                dist.all_reduce = plain
            expect("reduction helper reads back the reduced tensor, the old pattern does not",
                   helper == [6.0, 9.0] and old == 3.0,
                   f"all_reduce as premul x2: all_reduce_sum([3, 4.5]) = {helper} (want [6.0, 9.0]); "
                   f"old all_reduce(total.to('cuda')); total.item() = {old} (unreduced)")
        finally:
            dist.destroy_process_group()


# ---- 3. forward and 4. EMA ----------------------------------------------------------------------


def _small_llama(vocab: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=1,
                         initializer_range=0.02)
    return LlamaForCausalLM(config).eval()


def check_forward(device: str) -> None:
    from sdft_ray.forward import response_logits

    g = np.random.default_rng(0)
    prompts = [g.integers(2, 4096, n) for n in (5, 12, 9, 3)]
    responses = [g.integers(2, 4096, n) for n in (10, 4, 16, 1)]
    model = _small_llama()
    with torch.no_grad():
        ref, _, mask = response_logits(model, prompts, responses, 0)
        ref = ref.double().log_softmax(-1)[mask]
        for dtype, max_tol, mean_tol in [(torch.float32, 1e-3, 1e-4), (torch.bfloat16, 0.05, 0.01)]:
            if device == "cpu" and dtype == torch.float32:
                report("forward fp32 on the device vs fp32 cpu", "SKIP", "the device is the CPU")
                continue
            moved = copy.deepcopy(model).to(device=device, dtype=dtype)
            logits, ids, mask_dev = response_logits(moved, prompts, responses, 0)
            ok_devices = logits.device.type == ids.device.type == mask_dev.device.type == device
            diff = (logits.double().log_softmax(-1)[mask_dev].cpu() - ref).abs()
            expect(f"forward {str(dtype)[6:]} on {device} vs fp32 cpu",
                   ok_devices and logits.dtype == dtype and float(diff.max()) <= max_tol and float(diff.mean()) <= mean_tol,
                   f"log-prob abs err max {float(diff.max()):.1e} (tol {max_tol:.0e}), mean {float(diff.mean()):.1e} "
                   f"(tol {mean_tol:.0e}), outputs on {logits.device}/{ids.device}/{mask_dev.device}")
            del moved


def check_ema(device: str) -> None:
    from sdft_ray.ema import EmaWeights

    g = torch.Generator().manual_seed(0)
    shapes = {"embed": (512, 64), "w1": (64, 256), "w2": (256, 64), "norm": (64,)}
    steps = [{n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()} for _ in range(6)]
    rate = 0.1
    for ema_device in dict.fromkeys([device, "cpu"]):
        ema = EmaWeights({n: t.to(device) for n, t in steps[0].items()}, device=ema_device)
        ref = {n: t.double() for n, t in steps[0].items()}
        for params in steps[1:]:
            ema.update(((n, t.to(device)) for n, t in params.items()), rate, names=list(shapes))
            ref = {n: (1 - rate) * ref[n] + rate * params[n].double() for n in shapes}
        err = max(float((ema[n].double().cpu() - ref[n]).abs().max()) for n in shapes)
        placed = all(t.device.type == ema_device and t.dtype == torch.float32 for _, t in ema.named_tensors())
        expect(f"ema bf16 params on {device} -> fp32 EMA on {ema_device}", placed and err <= 1e-5,
               f"5 updates, max abs err vs float64 {err:.1e} (tol 1e-05)")


# ---- 5. rollout log-probs ------------------------------------------------------------------------


def check_rollout(device: str) -> None:
    from transformers import LogitsProcessorList

    from sdft_ray.engines.hf import StepLogprobs

    model = _small_llama().to(device)
    model.generation_config.repetition_penalty = 1.3  # a processor before ours: must not change the numbers
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], device=device)
    mask = (ids != 0).long()
    torch.manual_seed(0)
    with torch.no_grad(), StepLogprobs(model, top_k=4) as recorder:
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.8,
                             top_k=0, logits_processor=LogitsProcessorList([recorder]), pad_token_id=0, eos_token_id=1)
        stats = recorder.finish(seq, seq.shape[1] - ids.shape[1])
    attention = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1)
    with torch.no_grad():  # one plain forward over prompt + generated tokens
        full = model(input_ids=seq, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
    ref = full.logits[:, ids.shape[1] - 1:-1].double().log_softmax(-1).cpu()
    new = seq[:, ids.shape[1]:].cpu()
    tok_err = float((stats.token.double() - ref.gather(-1, new[..., None]).squeeze(-1)).abs().max())
    top = ref.topk(4, dim=-1)
    top_err = float((stats.topk.double() - top.values).abs().max())
    same_ids = bool((stats.topk_ids == top.indices).all())
    expect(f"rollout per-step log-probs on {device}", tok_err <= 1e-3 and top_err <= 1e-3 and same_ids,
           f"{new.shape[1]} steps: token log-prob err {tok_err:.1e}, top-k err {top_err:.1e} (tol 1e-03), "
           f"top-k ids {'equal' if same_ids else 'DIFFER'}")


# ---- 6. scoring memory ---------------------------------------------------------------------------


def check_scoring_memory(device: str, batch: int, length: int) -> None:
    if device != "cuda":
        report("scoring memory", "SKIP", "needs CUDA (torch.cuda.max_memory_allocated); on CPU see scripts/bench_memory.py")
        return
    from memory_baselines import QWEN_VOCAB, naive_scores, scoring_batch, tiny_llama

    from sdft_ray.scoring import score_trajectories

    model = tiny_llama(QWEN_VOCAB, 64, torch.bfloat16, "cuda")
    traj = scoring_batch(QWEN_VOCAB, batch, length)
    for signal in ("topk_teacher", "sampled"):
        peaks, out = {}, {}
        for name in ("before", "after"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if name == "before":
                out[name] = naive_scores(model, traj, signal, 20, micro_batch_size=batch)
            else:
                scores = score_trajectories(model, traj, 0, signal, 20, batch, torch.float32, 0)
                out[name] = (scores.token_logprobs, scores.topk_logprobs)
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
            peaks[name + "_s"] = time.perf_counter() - start
        diff = max(float(np.abs(np.stack(a) - np.stack(b)).max())
                   for a, b in zip(out["before"], out["after"]) if a is not None)
        ratio = peaks["before"] / max(peaks["after"], 1e-9)
        expect(f"scoring memory {signal} [{batch}, {length}] x {QWEN_VOCAB} bf16", ratio >= 3.0 and diff <= 1e-3,
               f"peak before {peaks['before']:.2f} GiB ({peaks['before_s']:.2f} s), after {peaks['after']:.2f} GiB "
               f"({peaks['after_s']:.2f} s): ratio {ratio:.2f}x (need >= 3); max |before - after| {diff:.1e}")


CHECKS = {
    "loss": lambda device, args: check_losses(device),
    "reduction": lambda device, args: check_reduction(device),
    "forward": lambda device, args: check_forward(device),
    "ema": lambda device, args: check_ema(device),
    "rollout": lambda device, args: check_rollout(device),
    "memory": lambda device, args: check_scoring_memory(device, args.batch, args.length),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16, help="scoring memory check: responses")
    ap.add_argument("--length", type=int, default=512, help="scoring memory check: tokens per response")
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    args = ap.parse_args(argv)
    only = args.only.split(",")
    if unknown := [c for c in only if c not in CHECKS]:
        ap.error(f"--only: unknown checks {unknown}; choose from {list(CHECKS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(0)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"gpu_check: device {device} ({name}), torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    for key in only:
        try:
            CHECKS[key](device, args)
        except Exception:  # noqa: BLE001 - a crash is a FAIL of that check, the others still run
            report(key, "FAIL", traceback.format_exc(limit=4).strip().replace("\n", " | "))
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    counts = {s: sum(r[1] == s for r in RESULTS) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
