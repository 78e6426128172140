"""Teacher scoring: the teacher's distribution on the student's own tokens, under ``pi(.|x, c)``."""

from __future__ import annotations

import dataclasses
import time

import torch

from actors.group import SyncGroupMember, WeightHolder, set_torch_threads
from sdft_ray.memory import MemoryBaseline, release_free_memory, tensor_bytes
from sdft_ray.models import load_causal_lm, load_tokenizer, torch_dtype
from sdft_ray.scoring import score_trajectories
from sdft_ray.trajectory import ScoreReceipt, Trajectories
from sdft_ray.weights import WeightHandle, get_transport, load_named_tensors


class TeacherScorer(WeightHolder, SyncGroupMember):
    def __init__(self, worker_index: int, model_folder: str, dtype: str, signal: str, top_k: int,
                 micro_batch_size: int, transfer_dtype: str = "float32", trust_remote_code: bool = False,
                 resources: dict | None = None, run_config: dict | None = None, engine: str = "hf",
                 engine_options: dict | None = None, lora: dict | None = None):
        self.memory = MemoryBaseline()
        set_torch_threads(resources)
        self.worker_index = worker_index
        self.model = self.vllm = None
        if engine == "vllm":  # prompt log-probs from a vLLM engine: the shared prefix is cached
            from sdft_ray.engines import make_engine

            self.vllm = make_engine("vllm", model_folder, dtype, trust_remote_code, extra=engine_options)
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_causal_lm(model_folder, dtype, trust_remote_code)
            if lora is not None:  # base model + the (EMA) adapters that weight sync sends
                from sdft_ray.config import LoraSettings
                from sdft_ray.lora import add_adapters

                model = add_adapters(model, LoraSettings.model_validate(lora))
            self.model = model.to(device).eval()
        self._bind(load_tokenizer(model_folder, trust_remote_code), signal, top_k, micro_batch_size, transfer_dtype,
                   run_config)

    @classmethod
    def in_process(cls, worker_index: int, model: torch.nn.Module, tokenizer, signal: str, top_k: int,
                   micro_batch_size: int, transfer_dtype: str, run_config: dict) -> TeacherScorer:
        """The role inside another actor (``placement.mode: colocated``), scoring with ``model``,
        whose weights that actor keeps (see ``actors/colocated.py``)."""
        scorer = cls.__new__(cls)
        scorer.memory, scorer.worker_index, scorer.model, scorer.vllm = None, worker_index, model, None
        scorer._bind(tokenizer, signal, top_k, micro_batch_size, transfer_dtype, run_config)
        return scorer

    def _bind(self, tokenizer, signal: str, top_k: int, micro_batch_size: int, transfer_dtype: str,
              run_config: dict | None) -> None:
        self.tokenizer = tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.variant, self.demonstration_shift = None, False
        if run_config is not None:
            from sdft_ray.config import RunConfig
            from sdft_ray.variants import get_variant

            cfg = RunConfig.model_validate(run_config)
            self.variant = get_variant(cfg)
            self.demonstration_shift = cfg.loss.position_weights == "demonstration_shift"
        self.signal, self.top_k, self.micro_batch_size = signal, top_k, micro_batch_size
        self.transfer_dtype = torch_dtype(transfer_dtype)
        self.start_incarnation()

    def memory_report(self) -> dict:
        return self.memory.report(weights=tensor_bytes(self.model.parameters()) if self.model is not None else 0.0)

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
            was_training = self.model.training  # a colocated live teacher is the module being trained
            self.model.eval()
            try:
                scores = score_trajectories(self.model, traj, self.pad_id, self.signal, self.top_k,
                                            self.micro_batch_size, self.transfer_dtype, self.version,
                                            demonstration_shift=self.demonstration_shift)
            finally:
                self.model.train(was_training)
        release_free_memory()  # the batch's logits
        receipt = ScoreReceipt(worker=self.worker_index, teacher_version=self.version, sequences=len(traj),
                               seconds=time.perf_counter() - start)
        return receipt, scores
