"""Teacher scoring: the teacher's distribution on the student's own tokens, under ``pi(.|x, c)``."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from actors.group import SyncGroupMember, WeightHolder, set_torch_threads
from sdft_ray.forward import micro_batches, response_logits
from sdft_ray.models import load_causal_lm, load_tokenizer, torch_dtype
from sdft_ray.trajectory import ScoreReceipt, TeacherScores, Trajectories
from sdft_ray.weights import WeightHandle, get_transport, load_named_tensors


def score_trajectories(model, traj: Trajectories, pad_id: int, signal: str, top_k: int,
                       micro_batch_size: int, transfer_dtype: torch.dtype, version: int) -> TeacherScores:
    """Run the teacher on ``teacher_prompt + response`` and keep what the loss needs.

    ``signal``: "full" (log-probs over the vocabulary), "topk_teacher" (the teacher's own
    top-k), "topk_student" (log-probs at the rollout's top-k ids) or "sampled" (the sampled token only).
    Sampled-token log-probs are always returned (for the implicit reward metric).
    """
    kind = {"full": "full", "topk_teacher": "topk", "topk_student": "topk", "sampled": "sampled"}[signal]
    n = len(traj)
    out = TeacherScores(teacher_version=version, kind=kind, token_logprobs=[None] * n,
                        transfer_dtype=str(transfer_dtype).removeprefix("torch."))
    if kind == "full":
        out.full_logprobs = [None] * n
    if kind == "topk":
        out.topk_ids, out.topk_logprobs = [None] * n, [None] * n
    lengths = [len(p) + len(r) for p, r in zip(traj.teacher_prompt_ids, traj.response_ids)]
    with torch.no_grad():
        for rows in micro_batches(n, micro_batch_size, lengths):
            logits, ids, mask = response_logits(
                model, [traj.teacher_prompt_ids[r] for r in rows], [traj.response_ids[r] for r in rows], pad_id)
            logp = logits.float().log_softmax(-1)
            tok = logp.gather(-1, ids[..., None]).squeeze(-1)
            for j, r in enumerate(rows):
                t = len(traj.response_ids[r])
                out.token_logprobs[r] = tok[j, :t].cpu().numpy()
                if kind == "full":
                    out.full_logprobs[r] = _to_numpy(logp[j, :t], transfer_dtype)
                elif signal == "topk_teacher":
                    top = logp[j, :t].topk(top_k, dim=-1)
                    out.topk_ids[r] = top.indices.cpu().numpy()
                    out.topk_logprobs[r] = top.values.cpu().numpy()
                elif signal == "topk_student":
                    if traj.rollout_topk_ids is None:
                        raise ValueError("loss.topk_source 'student' needs the rollout's top-k ids")
                    sid = torch.as_tensor(traj.rollout_topk_ids[r][:t], device=logp.device)
                    out.topk_ids[r] = sid.cpu().numpy()
                    out.topk_logprobs[r] = logp[j, :t].gather(-1, sid).cpu().numpy()
    return out


def _to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float32:
        return t.cpu().numpy()
    # numpy has no bfloat16: keep the raw 16-bit pattern; the learner views it back.
    return t.to(dtype).cpu().view(torch.int16).numpy()


class TeacherScorer(WeightHolder, SyncGroupMember):
    def __init__(self, worker_index: int, model_folder: str, dtype: str, signal: str, top_k: int,
                 micro_batch_size: int, transfer_dtype: str = "float32", trust_remote_code: bool = False,
                 resources: dict | None = None, run_config: dict | None = None, engine: str = "hf",
                 engine_options: dict | None = None):
        set_torch_threads(resources)
        self.worker_index = worker_index
        self.model = self.vllm = None
        if engine == "vllm":  # prompt log-probs from a vLLM engine: the shared prefix is cached
            from sdft_ray.engines import make_engine

            self.vllm = make_engine("vllm", model_folder, dtype, trust_remote_code, extra=engine_options)
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = load_causal_lm(model_folder, dtype, trust_remote_code).to(device).eval()
        self.tokenizer = load_tokenizer(model_folder, trust_remote_code)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.variant = None
        if run_config is not None:
            from sdft_ray.config import RunConfig
            from sdft_ray.variants import get_variant

            self.variant = get_variant(RunConfig.model_validate(run_config))
        self.signal, self.top_k, self.micro_batch_size = signal, top_k, micro_batch_size
        self.transfer_dtype = torch_dtype(transfer_dtype)
        self.start_incarnation()

    def update_weights(self, handle: WeightHandle) -> int:
        named = get_transport(handle.transport).receive(handle)
        if self.vllm is not None:
            self.vllm.load_weights(named)
        else:
            load_named_tensors(self.model, named)
        return self.loaded(handle.version)

    def score(self, traj: Trajectories, expect: tuple[str | None, int] | None = None):
        """Returns ``(receipt, TeacherScores)``: call with ``num_returns=2``. Refuses
        (StaleActor) unless this is the incarnation holding the teacher weight version in ``expect``."""
        self.check_expected(expect)
        start = time.perf_counter()
        prompts = self.variant.teacher_prompts(traj, self.tokenizer) if self.variant is not None else None
        if prompts is not None:  # the variant builds the teacher's context from the student's attempt
            traj = dataclasses.replace(traj, teacher_prompt_ids=prompts)
        if self.vllm is not None:
            scores = self.vllm.score_trajectories(traj, self.signal, self.top_k, self.version)
        else:
            scores = score_trajectories(self.model, traj, self.pad_id, self.signal, self.top_k,
                                        self.micro_batch_size, self.transfer_dtype, self.version)
        receipt = ScoreReceipt(worker=self.worker_index, teacher_version=self.version, sequences=len(traj),
                               seconds=time.perf_counter() - start)
        return receipt, scores
