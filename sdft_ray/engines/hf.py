"""transformers ``generate`` as a rollout engine (the fast-starting CPU default)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from sdft_ray.engines import Generation, SamplingSpec
from sdft_ray.forward import micro_batches
from sdft_ray.models import load_causal_lm, load_tokenizer, stop_token_ids
from sdft_ray.weights import load_named_tensors


class HFEngine:
    def __init__(self, model_folder: str, dtype: str = "float32", trust_remote_code: bool = False,
                 batch_size: int = 16, device: str | None = None, share_prompts: bool = True):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(model_folder, dtype, trust_remote_code).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_folder, trust_remote_code)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.default_stops = tuple(stop_token_ids(self.tokenizer, self.model.generation_config))
        self.batch_size = batch_size
        self.share_prompts = share_prompts  # prefill a prompt once for all its samples

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        return load_named_tensors(self.model, named_tensors)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSpec) -> list[Generation]:
        stops = tuple(sampling.stop_token_ids) or self.default_stops
        out: list[Generation] = []
        for chunk_index, rows in enumerate(micro_batches(len(prompts), self.batch_size)):
            torch.manual_seed(sampling.seed * 100_003 + chunk_index)
            out.extend(self._generate_chunk([prompts[i] for i in rows], sampling, stops))
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
        result = self.model.generate(
            input_ids=ids, attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=list(stops), pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=True, **kwargs,
        )
        new_tokens = result.sequences[:, width:].cpu()
        # Raw (temperature-1) log-probs, as the learner computes them and vLLM reports them.
        logprobs = torch.stack(result.logits, dim=1).float().log_softmax(-1).cpu()  # [B, T, V]
        stop_set = set(stops)
        gens = []
        for b in range(len(prompts)):
            toks = new_tokens[b].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in stop_set), len(toks))
            tok_tensor = new_tokens[b, :end]
            lp = logprobs[b, :end]
            gen = Generation(
                token_ids=tok_tensor.numpy().astype(np.int64),
                logprobs=lp.gather(-1, tok_tensor[:, None]).squeeze(-1).numpy().astype(np.float32),
                finished=end <= len(toks) and bool(toks) and toks[end - 1] in stop_set,
            )
            if sampling.topk_logprobs:
                top = lp.topk(sampling.topk_logprobs, dim=-1)
                gen.topk_ids = top.indices.numpy().astype(np.int64)
                gen.topk_logprobs = top.values.numpy().astype(np.float32)
            gens.append(gen)
        return gens
