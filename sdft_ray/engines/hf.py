"""transformers ``generate`` as a rollout engine (the fast-starting CPU default)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessorList

from sdft_ray.engines import Generation, SamplingSpec
from sdft_ray.forward import micro_batches
from sdft_ray.models import load_causal_lm, load_tokenizer, stop_token_ids
from sdft_ray.scoring import LogprobStats, logprob_stats
from sdft_ray.weights import load_named_tensors


class StepLogprobs:
    """Sampled-token log-probs and top-k of each generation step, from that step's ``[B, V]``
    logits: memory O(B * V) however many tokens are generated (``output_logits`` would keep
    all ``T`` steps, and a log-softmax over them is a ``[B, T, V]`` fp32 tensor).

    A forward hook on the model keeps each forward's raw next-token logits (what
    ``output_logits`` returned: temperature 1, before any logits processor, so the numbers do
    not depend on processors that the model's ``generation_config`` may add, such as a
    repetition penalty, nor on their order). Passed to ``generate`` as a logits processor, it
    returns the scores unchanged; its ``input_ids`` at step ``t + 1`` end with the token
    sampled at step ``t``, so step ``t`` is recorded then, and the last step in
    :meth:`finish` from the returned sequences. Use it as a context manager (the hook is
    removed on exit).
    """

    def __init__(self, model: torch.nn.Module, top_k: int = 0):
        self.top_k = top_k
        self._raw: torch.Tensor | None = None  # next-token logits of the latest forward
        self._pending: torch.Tensor | None = None  # a step's fp32 logits, waiting for its sampled token
        self._steps: list[LogprobStats] = []
        self._hook = model.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self._raw = output.logits[:, -1, :]

    def _record(self, token_ids: torch.Tensor) -> None:
        self._steps.append(logprob_stats(self._pending, token_ids, self.top_k))
        self._pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self._record(input_ids[:, -1])
        if self._raw is None:
            raise RuntimeError("StepLogprobs: a generation step without a model forward (not plain sampling?)")
        self._pending, self._raw = self._raw.to(torch.float32, copy=True), None
        return scores

    def finish(self, sequences: torch.Tensor, new_tokens: int) -> LogprobStats:
        """``[B, T]`` token log-probs (and ``[B, T, k]`` top-k) on the CPU, for the last
        ``new_tokens`` columns of ``sequences``."""
        if self._pending is not None:
            self._record(sequences[:, -1])
        if len(self._steps) != new_tokens:
            raise RuntimeError(f"StepLogprobs: recorded {len(self._steps)} steps for {new_tokens} new tokens")
        batch, k = sequences.shape[0], self.top_k
        if not self._steps:
            return LogprobStats(token=torch.zeros(batch, 0), topk_ids=torch.zeros(batch, 0, k, dtype=torch.long),
                                topk=torch.zeros(batch, 0, k))
        stack = lambda attr: torch.stack([getattr(s, attr) for s in self._steps], dim=1).cpu()  # noqa: E731
        return LogprobStats(token=stack("token"), topk_ids=stack("topk_ids") if k else None,
                            topk=stack("topk") if k else None)

    def __enter__(self) -> StepLogprobs:
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()


class HFEngine:
    def __init__(self, model_folder: str, dtype: str = "float32", trust_remote_code: bool = False,
                 batch_size: int = 16, device: str | None = None, share_prompts: bool = True,
                 lora: dict | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_causal_lm(model_folder, dtype, trust_remote_code)
        if lora is not None:  # the learner's adapters arrive by weight sync (model.lora)
            from sdft_ray.config import LoraSettings
            from sdft_ray.lora import add_adapters

            model = add_adapters(model, LoraSettings.model_validate(lora))
        self._bind(model.to(device).eval(), load_tokenizer(model_folder, trust_remote_code), batch_size, share_prompts)

    @classmethod
    def on_module(cls, model: torch.nn.Module, tokenizer, batch_size: int = 16, share_prompts: bool = True) -> HFEngine:
        """An engine over a module that something else trains (``placement.mode: colocated``: the
        learner's live student). It loads nothing; generation switches the module to eval mode and
        back, and uses the KV cache whatever the module's ``config.use_cache`` says."""
        engine = cls.__new__(cls)
        engine._bind(model, tokenizer, batch_size, share_prompts)
        return engine

    def _bind(self, model: torch.nn.Module, tokenizer, batch_size: int, share_prompts: bool) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.default_stops = tuple(stop_token_ids(self.tokenizer, self.model.generation_config))
        self.batch_size = batch_size
        self.share_prompts = share_prompts  # prefill a prompt once for all its samples

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        return load_named_tensors(self.model, named_tensors)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> list[Generation]:
        """Sample (or decode greedily) each prompt; chunk ``i`` is seeded with ``sampling.seed``
        and ``i``. The process's own RNG stream is left where it was (a colocated learner's
        next random draw does not depend on whether it generated), and so is the module's mode."""
        stops = tuple(sampling.stop_token_ids) or self.default_stops
        out: list[Generation] = []
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                for chunk_index, rows in enumerate(micro_batches(len(prompts), self.batch_size)):
                    torch.manual_seed(sampling.seed * 100_003 + chunk_index)
                    out.extend(self._generate_chunk([prompts[i] for i in rows], sampling, stops))
        finally:
            self.model.train(was_training)
        return out

    def _left_padded(self, prompts, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[b, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _shared_prompt_cache(self, prompts, width: int):
        """When rows repeat a prompt (several samples per prompt), run the prompt (all but its
        last token) once per distinct prompt and repeat its KV cache rows: ``generate`` then
        only processes the last prompt token per row. None when every prompt is distinct."""
        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        if len(distinct) == len(prompts) or width < 2 or not self.share_prompts:
            return None
        ids, mask = self._left_padded(distinct, width)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        prefill = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
                             use_cache=True)
        cache = prefill.past_key_values
        where = {p: i for i, p in enumerate(distinct)}
        cache.reorder_cache(torch.as_tensor([where[tuple(p)] for p in prompts], device=self.device))
        return cache

    def _generate_chunk(self, prompts, sampling: SamplingSpec, stops) -> list[Generation]:
        width = max(len(p) for p in prompts)
        ids, mask = self._left_padded(prompts, width)
        kwargs = dict(do_sample=False) if sampling.greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        cache = self._shared_prompt_cache(prompts, width)
        if cache is not None:
            kwargs["past_key_values"] = cache
        # Raw (temperature-1) log-probs, as the learner computes them and vLLM reports them.
        with StepLogprobs(self.model, sampling.topk_logprobs) as recorder:
            sequences = self.model.generate(
                input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([recorder]),
                max_new_tokens=sampling.max_new_tokens, eos_token_id=list(stops), pad_token_id=self.pad_id,
                use_cache=True, **kwargs,
            )
            stats = recorder.finish(sequences, sequences.shape[1] - width)
        new_tokens = sequences[:, width:].cpu()
        stop_set = set(stops)
        gens = []
        for b in range(len(prompts)):
            toks = new_tokens[b].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in stop_set), len(toks))
            gen = Generation(
                token_ids=new_tokens[b, :end].numpy().astype(np.int64),
                logprobs=stats.token[b, :end].numpy().astype(np.float32),
                finished=end <= len(toks) and bool(toks) and toks[end - 1] in stop_set,
            )
            if sampling.topk_logprobs:
                gen.topk_ids = stats.topk_ids[b, :end].numpy().astype(np.int64)
                gen.topk_logprobs = stats.topk[b, :end].numpy().astype(np.float32)
            gens.append(gen)
        return gens
