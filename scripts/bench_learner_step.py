"""The learner's step against a plain PyTorch step of the same work, in one process, side by side.

Both run one SDFT optimizer step on the same fixed batch (``--prompts`` rows of ``--prompt-tokens``
prompt and ``--max-new-tokens`` response tokens, a full-vocabulary teacher distribution), the same
loss (:func:`sdft_ray.losses.distillation_loss`, forward KL, first 3 tokens skipped), fp32, AdamW,
gradient clipping 1.0 and an EMA teacher (rate 0.05) - what TRL's ``SDFTTrainer`` step does:

* ``plain``: ``response_logits`` -> loss -> ``backward`` -> ``clip_grad_norm_`` -> ``AdamW.step``
  -> ``zero_grad`` -> EMA update (``torch._foreach_lerp_``), no metrics beyond the loss;
* ``learner``: :class:`actors.learner.LearnerWorker` exactly as the Ray actor runs it (DeepSpeed
  engine, world size 1), called in this process without Ray;
* ``learner_all_reduce``: the same with DeepSpeed's gradient all-reduce left on (what the learner
  did before it skipped it on one rank).

They alternate for ``--steps`` timed steps each after one warm-up, each one first, second and
third in turn, so a drifting load and the order hit all alike. The ``learner``'s parts are timed
with wrappers: backward, the optimizer step (clipping + AdamW), the loss (with its metrics), the
extra gradient-norm pass, the EMA update and ``release_free_memory``. Prints mean seconds per
step of each variant and part, and the ratios.

    .venv/bin/python scripts/bench_learner_step.py                 # SmolLM2-135M, 8 x (64 + 48) tokens
    .venv/bin/python scripts/bench_learner_step.py --tiny --steps 3
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bc.add_common_args(ap, steps=6, prompts=8, max_new_tokens=48)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    return ap.parse_args(argv)


def make_batch(vocab: int, rows: int, prompt_tokens: int, response_tokens: int, seed: int):
    """A fixed batch: random prompts/responses (lengths vary by row, as rollouts do) and a random
    teacher distribution over the whole vocabulary."""
    import numpy as np
    import torch

    from sdft_ray.trajectory import TeacherScores, Trajectories

    rng = np.random.default_rng(seed)
    lengths = [max(4, response_tokens - int(x)) for x in rng.integers(0, response_tokens // 3, size=rows)]
    prompts = [rng.integers(3, vocab, size=prompt_tokens) for _ in range(rows)]
    responses = [rng.integers(3, vocab, size=n) for n in lengths]
    teacher = [torch.log_softmax(torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed + i)), -1).numpy()
               for i, n in enumerate(lengths)]
    traj = Trajectories(step=1, policy_version=0, example_index=np.arange(rows), epoch=np.zeros(rows, int),
                        sample_index=np.zeros(rows, int), prompt_ids=prompts, teacher_prompt_ids=prompts,
                        response_ids=responses, rollout_logprobs=[np.zeros(n, np.float32) for n in lengths],
                        finished=np.ones(rows, bool))
    scores = TeacherScores(teacher_version=0, kind="full", full_logprobs=teacher,
                           token_logprobs=[t[np.arange(len(r)), r] for t, r in zip(teacher, responses)])
    return traj, scores


class PlainStep:
    """TRL's step, written out: one forward/backward, clip, AdamW, EMA."""

    def __init__(self, cfg, model_folder: str, pad_id: int):
        import torch

        from sdft_ray.losses import LossSpec
        from sdft_ray.models import load_causal_lm

        self.model = load_causal_lm(model_folder, "float32")
        self.model.config.use_cache = False
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.learner.lr, betas=tuple(cfg.learner.betas),
                                     weight_decay=cfg.learner.weight_decay)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.spec = LossSpec(alpha=0.0, estimator="full", skip_first_tokens=cfg.loss.skip_first_tokens)
        self.rate, self.pad_id = cfg.teacher.ema_rate, pad_id

    def step(self, traj, scores) -> None:
        import torch

        from sdft_ray.forward import pad_right, response_logits
        from sdft_ray.losses import TeacherSignal, distillation_loss

        self.model.train()
        logits, ids, mask = response_logits(self.model, traj.prompt_ids, traj.response_ids, self.pad_id)
        teacher = pad_right(scores.full_logprobs, 0.0, torch.float32, ids.shape[1])
        loss, _ = distillation_loss(self.spec, logits, ids, mask, TeacherSignal(full_logprobs=teacher))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], self.rate)


def time_parts(obj, names: list[str], totals: dict[str, list[float]]) -> None:
    """Wrap ``obj``'s methods ``names`` (dotted for attributes) to add their wall time to ``totals``."""
    for dotted in names:
        *path, name = dotted.split(".")
        target = functools.reduce(getattr, path, obj)
        fn = getattr(target, name)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _key=dotted, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_key][-1] += time.perf_counter() - t0

        setattr(target, name, timed)


def main(argv=None) -> int:
    args = parse_args(argv)
    bc.setup(args)
    import torch

    import actors.learner as learner_module
    from actors.learner import LearnerWorker
    from sdft_ray.models import load_tokenizer

    torch.set_num_threads(args.threads)
    model_folder = bc.resolve_model(args)
    root = bc.output_root(args)
    cfg = bc.make_config(args, model_folder, root / "run", {"teacher.ema_rate": 0.05, "learner.grad_clip": 1.0})
    print(bc.machine_line(), flush=True)
    pad_id = int(load_tokenizer(str(model_folder)).pad_token_id)
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(model_folder).vocab_size)
    traj, scores = make_batch(vocab, args.prompts, args.prompt_tokens, args.max_new_tokens, args.seed)

    class InProcessLearner(LearnerWorker):
        def _load_parts(self, traj_refs, score_refs):
            return list(traj_refs), list(score_refs)

    port = learner_module.free_port()
    learner = InProcessLearner(0, 1, cfg.model_dump(mode="json"), str(model_folder), args.steps + 1)
    learner.setup("127.0.0.1", port)
    reducing = InProcessLearner(0, 1, cfg.model_dump(mode="json"), str(model_folder), args.steps + 1)
    reducing.setup("127.0.0.1", port)
    reducing.engine.enable_backward_allreduce = True
    plain = PlainStep(cfg, str(model_folder), pad_id)

    parts: dict[str, list[float]] = defaultdict(list)
    engine_parts = ["engine.backward", "engine.step", "ema.update"]
    time_parts(learner, engine_parts, parts)
    module_parts = ["distillation_loss", "release_free_memory"]
    time_parts(learner_module, module_parts, parts)
    time_parts(torch.nn.utils, ["get_total_norm"], parts)  # the learner's extra gradient-norm pass
    seconds: dict[str, list[float]] = {"plain": [], "learner": [], "learner_all_reduce": []}
    for i in range(args.steps + 1):
        for name in engine_parts + module_parts + ["get_total_norm"]:
            parts[name].append(0.0)
        timed = {}
        runs = [("plain", lambda: plain.step(traj, scores)),
                ("learner_all_reduce", lambda: reducing.train_step(i + 1, [traj], [scores])),
                ("learner", lambda: learner.train_step(i + 1, [traj], [scores]))]
        for name, run in runs[i % 3:] + runs[:i % 3]:  # each goes first, second and third in turn
            mark = {part: values[-1] for part, values in parts.items()}
            t0 = time.perf_counter()
            run()
            timed[name] = time.perf_counter() - t0
            if name != "learner":  # the parts are those of `learner` alone
                for part, values in parts.items():
                    values[-1] = mark[part]
        if i:  # the first step of each warms up (allocator, DeepSpeed buffers)
            for name, value in timed.items():
                seconds[name].append(value)
        print(f"step {i}: " + ", ".join(f"{k} {v:.3f} s" for k, v in timed.items()) + f" (load {bc.loadavg()})",
              flush=True)
    mean = {k: statistics.fmean(v) for k, v in seconds.items()}
    print(f"\n{args.prompts} rows x ({args.prompt_tokens} prompt + <= {args.max_new_tokens} response) tokens, "
          f"{args.threads} threads, {args.steps} timed steps each, load average now {bc.loadavg()}")
    for name, label in (("plain", "plain step (TRL-like)"), ("learner", "learner step (DeepSpeed actor)"),
                        ("learner_all_reduce", "learner step, all-reduce on")):
        print(f"{label:34s} {mean[name]:.3f} s  (sd {statistics.pstdev(seconds[name]):.3f})")
    print("learner parts (mean s per step):")
    for name, values in parts.items():
        if any(values[1:]):
            print(f"  {name:32s} {statistics.fmean(values[1:]):.3f}")
    print(f"ratio learner/plain: {mean['learner'] / mean['plain']:.3f}")
    print(f"ratio learner_all_reduce/plain: {mean['learner_all_reduce'] / mean['plain']:.3f}")
    print(f"ratio learner/learner_all_reduce: {mean['learner'] / mean['learner_all_reduce']:.3f}")
    return 0 if all(math.isfinite(v) for v in mean.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
