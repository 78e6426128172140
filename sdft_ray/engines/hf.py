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
                 batch_size: int = 16, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_causal_lm(model_folder, dtype, trust_remote_code).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_folder, trust_remote_code)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.default_stops = tuple(stop_token_ids(self.tokenizer, self.model.generation_config))
        self.batch_size = batch_size

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

    def _generate_chunk(self, prompts, sampling: SamplingSpec, stops) -> list[Generation]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding
            ids[b, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[b, width - len(p):] = 1
        kwargs = dict(do_sample=False) if sampling.greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        result = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
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
