"""Rollout worker: samples student responses ``y ~ pi_theta(.|x)`` with a rollout engine."""

from __future__ import annotations

import time

import numpy as np

from actors.group import SyncGroupMember, WeightHolder, set_torch_threads
from sdft_ray.engines import SamplingSpec, make_engine
from sdft_ray.memory import MemoryBaseline, release_free_memory, tensor_bytes
from sdft_ray.trajectory import PromptShard, Trajectories
from sdft_ray.weights import WeightHandle, get_transport


class RolloutWorker(WeightHolder, SyncGroupMember):
    def __init__(self, worker_index: int, model_folder: str, engine: str, dtype: str,
                 trust_remote_code: bool = False, batch_size: int = 16, engine_options: dict | None = None,
                 resources: dict | None = None, lora: dict | None = None):
        self.memory = MemoryBaseline()
        set_torch_threads(resources)
        self.worker_index = worker_index
        self.engine = make_engine(engine, model_folder, dtype, trust_remote_code, batch_size, engine_options, lora)
        self.start_incarnation()

    @classmethod
    def in_process(cls, worker_index: int, engine) -> RolloutWorker:
        """The role inside another actor (``placement.mode: colocated``), sampling with ``engine``;
        that actor delivers its weights (see ``actors/colocated.py``)."""
        worker = cls.__new__(cls)
        worker.memory, worker.worker_index, worker.engine = None, worker_index, engine
        worker.start_incarnation()
        return worker

    def memory_report(self) -> dict:
        model = getattr(self.engine, "model", None)  # the transformers engine (vLLM keeps its own)
        return self.memory.report(weights=tensor_bytes(model.parameters()) if model is not None else 0.0)

    def update_weights(self, handle: WeightHandle) -> int:
        self.engine.load_weights(get_transport(handle.transport).receive(handle))
        return self.loaded(handle.version)

    def generate(self, shard: PromptShard, num_parts: int, sampling: dict, samples: int = 1,
                 expect: tuple[str | None, int] | None = None):
        """Sample ``samples`` responses per prompt; split the rows into ``num_parts`` learner shards.
        Refuses (StaleActor) unless this is the incarnation holding the weight version in ``expect``.

        Returns ``(receipt, *trajectory_parts)``: call with ``num_returns=1 + num_parts``.
        """
        self.check_expected(expect)
        start = time.perf_counter()
        spec = SamplingSpec(**{**sampling, "seed": shard.seed})
        rows = [r for r in range(len(shard)) for _ in range(samples)]
        gens = self.engine.generate([shard.prompt_ids[r] for r in rows], spec)
        traj = Trajectories(
            step=shard.step,
            policy_version=self.version,
            example_index=shard.example_index[rows],
            epoch=shard.epoch[rows],
            sample_index=np.array([i % samples for i in range(len(rows))], dtype=np.int64),
            prompt_ids=[shard.prompt_ids[r] for r in rows],
            teacher_prompt_ids=[shard.teacher_prompt_ids[r] for r in rows],
            response_ids=[g.token_ids for g in gens],
            rollout_logprobs=[g.logprobs for g in gens],
            finished=np.array([g.finished for g in gens], dtype=bool),
            rollout_topk_ids=[g.topk_ids for g in gens] if spec.topk_logprobs else None,
            contexts=None if shard.contexts is None else [shard.contexts[r] for r in rows],
            contrast_prompt_ids=None if shard.contrast_prompt_ids is None
            else [shard.contrast_prompt_ids[r] for r in rows],
        )
        receipt = traj.receipt(self.worker_index, time.perf_counter() - start)
        parts = traj.split(num_parts)
        release_free_memory()  # the KV cache and logits of this batch
        return (receipt, *parts)
