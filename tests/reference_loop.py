"""SDFT written out as one plain single-process loop, as an independent reference for the trainer.

No Ray, no DeepSpeed, no role groups, no micro-batches: sample with the rollout engine, score
with a teacher model that holds the EMA weights, take the loss of the whole batch at once, clip,
step with AdamW, update the EMA. It uses the library's pure pieces (prompt shards and their seeds,
the engine, the per-token loss, the EMA formula) and nothing of the orchestration it checks:
sharding over actors and ranks, micro-batch accumulation, loss normalisation across ranks,
versions and weight sync. A distributed run with ``max_staleness: 0`` must take the same steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from sdft_ray.config import RunConfig
from sdft_ray.data import EpochSampler
from sdft_ray.engines import SamplingSpec
from sdft_ray.engines.hf import HFEngine
from sdft_ray.forward import pad_right, response_logits
from sdft_ray.losses import LossSpec, TeacherSignal, distillation_loss
from sdft_ray.models import load_causal_lm
from sdft_ray.trajectory import PromptShard


def reference_sdft_losses(cfg: RunConfig, model_folder: str | Path, examples, steps: int) -> list[float]:
    """Per-step losses of plain synchronous SDFT (full-vocabulary loss, EMA or frozen teacher)."""
    assert cfg.loss.estimator == "full" and cfg.schedule.max_staleness == 0
    assert cfg.rollout.sync_every == 1 and cfg.teacher.sync_every == 1 and cfg.teacher.ema_every == 1
    torch.manual_seed(cfg.schedule.seed)
    engine = HFEngine(str(model_folder), batch_size=cfg.rollout.batch_size)
    student = engine.model  # generation and training share the student's weights
    teacher = load_causal_lm(model_folder, "float32").eval()
    pad = engine.pad_id
    lc = cfg.learner
    optimizer = torch.optim.AdamW(student.parameters(), lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay)
    assert lc.lr_schedule == "constant" and lc.warmup_ratio == 0.0
    sampler = EpochSampler(len(examples), cfg.schedule.seed, cfg.data.shuffle)
    spec = LossSpec(alpha=cfg.loss.alpha, estimator="full", skip_first_tokens=cfg.loss.skip_first_tokens,
                    aggregation=cfg.loss.aggregation, tail_bucket=cfg.loss.tail_bucket)
    rc = cfg.rollout
    losses = []
    for step in range(1, steps + 1):
        picks = sampler.next_batch(cfg.schedule.prompts_per_step)
        rows = [examples[i] for _, i in picks]
        shard = PromptShard(step=step, seed=cfg.schedule.seed * 1_000_003 + step,
                            example_index=np.array([i for _, i in picks]), epoch=np.array([e for e, _ in picks]),
                            prompt_ids=[np.asarray(r.prompt_ids) for r in rows],
                            teacher_prompt_ids=[np.asarray(r.teacher_prompt_ids) for r in rows])
        prompts, teacher_prompts, responses = [], [], []
        for part in shard.split(rc.num_workers):  # each rollout worker samples its part with its seed
            sampling = SamplingSpec(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                                    seed=part.seed)
            rows_per_sample = [r for r in range(len(part)) for _ in range(rc.num_samples)]
            student.eval()
            gens = engine.generate([part.prompt_ids[r] for r in rows_per_sample], sampling)
            prompts += [part.prompt_ids[r] for r in rows_per_sample]
            teacher_prompts += [part.teacher_prompt_ids[r] for r in rows_per_sample]
            responses += [g.token_ids for g in gens]
        with torch.no_grad():
            t_logits, _, _ = response_logits(teacher, teacher_prompts, responses, pad)
            teacher_logp = t_logits.double().log_softmax(-1)
        student.train()
        logits, ids, mask = response_logits(student, prompts, responses, pad)
        loss, _ = distillation_loss(spec, logits, ids, mask, TeacherSignal(full_logprobs=teacher_logp))
        optimizer.zero_grad()
        loss.backward()
        if lc.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), lc.grad_clip)
        optimizer.step()
        losses.append(float(loss))
        if cfg.teacher.kind == "ema":
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), student.parameters()):
                    t.mul_(1 - cfg.teacher.ema_rate).add_(s, alpha=cfg.teacher.ema_rate)
    assert all(math.isfinite(x) for x in losses)
    return losses


def pad_ids(seqs) -> torch.Tensor:  # re-exported for tests that build batches by hand
    return pad_right(seqs, 0, torch.long)
