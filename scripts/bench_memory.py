"""Peak memory of teacher scoring and of the EMA update, before and after the memory fixes.

    python scripts/bench_memory.py                 # [16, 512] x 152k vocabulary, bf16 teacher
    python scripts/bench_memory.py --batch 4 --length 128 --ema-scale 32   # a quick run

Every variant runs in a fresh subprocess (so one variant's freed memory cannot hide the next
one's peak) and reports its peak memory above what it held once its inputs were ready:

* CPU: ``ru_maxrss`` (high-water resident set) at the end minus ``ru_maxrss`` after set-up;
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` after a reset at that point.

Scoring (``scoring_*``): a random 1-layer Llama (hidden ``--hidden``) with Qwen2.5's 152,064-entry
vocabulary scores ``--batch`` responses of ``--length`` tokens as one micro-batch. ``before`` is
the old path (one ``[B, T, V]`` fp32 log-softmax, ``memory_baselines.naive_scores``), ``after``
is :func:`sdft_ray.scoring.score_trajectories`; ``logits`` only runs the model forward: the
floor both share (the model's own ``[B, T + 1, V]`` logits in its dtype). Before and after must
agree on the numbers: the script prints their largest difference.

EMA (``ema_*``): the parameters of Qwen2.5-7B with hidden/intermediate/kv widths divided by
``--ema-scale`` (vocabulary kept), held in bf16 as the model; the update reads them the way the
learner's ``full_parameters`` yields them (one fp32 host copy per tensor). ``before`` keeps them
all (the old ``EmaWeights.update``), ``after`` is the streaming ``EmaWeights.update``.

Prints one line per variant, then ``ratio <name>: <x>`` lines (before / after peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCORING = ["scoring_logits", "scoring_topk_before", "scoring_topk_after", "scoring_token_before", "scoring_token_after"]
EMA = ["ema_before", "ema_after"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=512, help="response tokens per row")
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="teacher model dtype")
    ap.add_argument("--ema-scale", type=int, default=8, help="divide the 7B widths by this for the EMA variants")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="run only these variants")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child process: run one variant
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _peak_tracker(device: str):
    """``start()`` at the end of set-up; ``peak_mb()`` = peak above that point."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

        def peak_mb() -> float:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

        def peak_mb() -> float:
            return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return peak_mb


def run_variant(args) -> dict:
    """In the child process: set up, measure one variant, return its numbers."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from memory_baselines import (
        ema_update_materialised, naive_scores, scaled_7b_shapes, scoring_batch, tiny_llama,
    )

    torch.set_num_threads(args.threads)
    name = args.variant
    out: dict = {"variant": name}
    if name.startswith("scoring"):
        from sdft_ray.forward import response_logits
        from sdft_ray.scoring import score_trajectories

        signal = "topk_teacher" if "topk" in name else "sampled"
        model = tiny_llama(args.vocab, args.hidden, getattr(torch, args.dtype), args.device)
        traj = scoring_batch(args.vocab, args.batch, args.length)
        peak_mb = _peak_tracker(args.device)
        start = time.perf_counter()
        if name == "scoring_logits":
            with torch.no_grad():
                logits, _, _ = response_logits(model, traj.teacher_prompt_ids, traj.response_ids, 0)
            out["logits_mb"] = logits.numel() * logits.element_size() / 2**20
            del logits
        elif name.endswith("before"):
            token, top = naive_scores(model, traj, signal, args.top_k, micro_batch_size=args.batch)
        else:
            scores = score_trajectories(model, traj, 0, signal, args.top_k, args.batch, torch.float32, 0)
            token, top = scores.token_logprobs, scores.topk_logprobs
        out["seconds"] = time.perf_counter() - start
        out["peak_mb"] = peak_mb()
        if name != "scoring_logits" and args.out:
            np.save(Path(args.out) / f"{name}_token.npy", np.stack(token))
            if top is not None:
                np.save(Path(args.out) / f"{name}_topk.npy", np.stack(top))
    else:
        from collections import OrderedDict

        from sdft_ray.ema import EmaWeights

        shapes = scaled_7b_shapes(args.ema_scale)
        g = torch.Generator().manual_seed(0)
        model = OrderedDict((n, torch.randn(s, generator=g).to(torch.bfloat16)) for n, s in shapes)
        ema = EmaWeights.from_named_parameters(model.items())
        host_copies = lambda: ((n, p.to("cpu", torch.float32)) for n, p in model.items())  # noqa: E731
        numel = [p.numel() for p in model.values()]
        out.update(params_mb=4 * sum(numel) / 2**20, largest_tensor_mb=4 * max(numel) / 2**20)
        peak_mb = _peak_tracker("cpu")
        start = time.perf_counter()
        if name == "ema_before":
            ema_update_materialised(ema._tensors, host_copies(), 0.05)
        else:
            ema.update(host_copies(), 0.05, names=list(model))
        out["seconds"] = time.perf_counter() - start
        out["peak_mb"] = peak_mb()
        out["checksum"] = float(sum(t.double().sum() for _, t in ema.named_tensors()))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        result = run_variant(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    variants = args.only or SCORING + EMA
    print(f"bench_memory: batch {args.batch} x {args.length} tokens, vocabulary {args.vocab}, hidden {args.hidden}, "
          f"teacher {args.dtype} on {args.device}, top-k {args.top_k}; EMA: Qwen2.5-7B widths / {args.ema_scale}; "
          f"{args.threads} thread(s); each variant in a fresh process", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for name in variants:
            cmd = [sys.executable, __file__, "--variant", name, "--out", tmp] + [
                a for a in (argv if argv is not None else sys.argv[1:]) if a not in variants and a != "--only"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                return 1
            res = results[name] = json.loads(line[len("RESULT "):])
            extra = ", ".join(f"{k} {v:.0f}" for k, v in res.items() if k.endswith("_mb") and k != "peak_mb")
            print(f"{name:22s} peak +{res['peak_mb']:9.1f} MiB  {res['seconds']:6.2f} s" + (f"  ({extra})" if extra else ""),
                  flush=True)
        import numpy as np

        for signal in ("topk", "token"):
            before, after = f"scoring_{signal}_before", f"scoring_{signal}_after"
            if before in results and after in results:
                for part in ("token", "topk"):
                    a, b = Path(tmp, f"{before}_{part}.npy"), Path(tmp, f"{after}_{part}.npy")
                    if a.exists() and b.exists():
                        print(f"max |before - after| {signal} scoring, {part} log-probs: "
                              f"{float(np.abs(np.load(a) - np.load(b)).max()):.2e}")
    if "ema_before" in results and "ema_after" in results:
        print(f"EMA checksum before/after: {results['ema_before']['checksum']:.6f} / {results['ema_after']['checksum']:.6f}")
    for label, before, after in [("scoring topk", "scoring_topk_before", "scoring_topk_after"),
                                 ("scoring token", "scoring_token_before", "scoring_token_after"),
                                 ("ema update", "ema_before", "ema_after")]:
        if before in results and after in results:
            ratio = results[before]["peak_mb"] / max(results[after]["peak_mb"], 1e-9)
            print(f"ratio {label} before/after peak: {ratio:.2f}x")
    if "scoring_logits" in results:
        for label, before, after in [("scoring topk", "scoring_topk_before", "scoring_topk_after"),
                                     ("scoring token", "scoring_token_before", "scoring_token_after")]:
            if before in results and after in results:
                floor = results["scoring_logits"]["peak_mb"]
                print(f"ratio {label} beyond the model's logits (peak - logits-only peak): "
                      f"{(results[before]['peak_mb'] - floor) / max(results[after]['peak_mb'] - floor, 1.0):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
