"""Rollout engines: token ids in, token ids and log-probs out, weights in by name.

The rollout actor (``actors/rollout.py``) owns one engine and its weight version; engines
know nothing about Ray. ``hf`` (transformers ``generate``) is the CPU default; ``vllm``
wraps ``vllm.LLM`` and is imported only when asked for, so the base install needs no vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    topk_logprobs: int = 0  # also return the top-k (ids, log-probs) of the sampling distribution
    stop_token_ids: tuple[int, ...] = ()
    greedy: bool = False


@dataclass
class Generation:
    token_ids: np.ndarray  # [T] int64, up to and including the first stop token
    logprobs: np.ndarray  # [T] float32, log-prob of each sampled token (temperature 1)
    finished: bool  # ended on a stop token
    topk_ids: np.ndarray | None = None  # [T, k]
    topk_logprobs: np.ndarray | None = None  # [T, k]


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> list[Generation]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int: ...


def make_engine(kind: str, model_folder: str, dtype: str, trust_remote_code: bool = False,
                batch_size: int = 16, extra: dict | None = None, lora: dict | None = None) -> RolloutEngine:
    if kind == "hf":
        from sdft_ray.engines.hf import HFEngine

        return HFEngine(model_folder, dtype=dtype, trust_remote_code=trust_remote_code, batch_size=batch_size,
                        lora=lora)
    if lora is not None:
        raise ValueError("model.lora: the vLLM engine does not load sdft-ray's adapters yet (use engine 'hf')")
    if kind == "vllm":
        from sdft_ray.engines.vllm import VLLMEngine

        return VLLMEngine(model_folder, dtype=dtype, trust_remote_code=trust_remote_code, **(extra or {}))
    raise ValueError(f"rollout.engine: unknown engine {kind!r} (hf | vllm)")
