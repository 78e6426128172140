"""What ``bench_memory.py`` and ``gpu_check.py`` measure against: the code as it was before the
memory fixes (full fp32 log-softmax for scoring, a materialised EMA update), and the inputs
(a random tiny Llama with Qwen2.5's 152k vocabulary, a batch of teacher prompts + responses,
a scaled-down 7B parameter list). Needs only torch, numpy and transformers.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from sdft_ray.ema import ema_update_
from sdft_ray.forward import micro_batches, response_logits
from sdft_ray.trajectory import Trajectories

QWEN_VOCAB = 152064
#: Qwen2.5-7B: hidden, intermediate, layers, key/value width, vocabulary (untied head)
QWEN_7B = dict(hidden=3584, intermediate=18944, layers=28, kv=512, vocab=QWEN_VOCAB)


def tiny_llama(vocab: int = QWEN_VOCAB, hidden: int = 64, dtype: torch.dtype = torch.bfloat16,
               device: str = "cpu", seed: int = 0):
    """A random 1-layer Llama with a large vocabulary: the LM head dominates, as in scoring."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=1,
                         initializer_range=0.5)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def scoring_batch(vocab: int, batch: int, length: int, prompt: int = 48, seed: int = 0,
                  top_k: int = 0) -> Trajectories:
    """``batch`` responses of exactly ``length`` tokens after teacher prompts of ``prompt/2 ..
    prompt`` tokens (left padding)."""
    g = np.random.default_rng(seed)
    ids = lambda n: g.integers(2, vocab, n, dtype=np.int64)  # noqa: E731
    prompts = [ids(int(g.integers(prompt // 2, prompt + 1))) for _ in range(batch)]
    responses = [ids(length) for _ in range(batch)]
    return Trajectories(
        step=0, policy_version=0, example_index=np.arange(batch), epoch=np.zeros(batch, np.int64),
        sample_index=np.zeros(batch, np.int64), prompt_ids=prompts, teacher_prompt_ids=prompts,
        response_ids=responses, rollout_logprobs=[np.zeros(length, np.float32) for _ in range(batch)],
        finished=np.ones(batch, bool),
        rollout_topk_ids=[np.stack([g.choice(vocab, top_k, replace=False) for _ in range(length)])
                          for _ in range(batch)] if top_k else None,
    )


@torch.no_grad()
def naive_scores(model, traj: Trajectories, signal: str, top_k: int, micro_batch_size: int,
                 pad_id: int = 0) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The teacher's scoring before the fix: one ``[B, T, V]`` fp32 log-softmax per micro-batch.
    Returns (token log-probs, top-k log-probs or None) per row."""
    n = len(traj)
    token: list = [None] * n
    top: list | None = [None] * n if signal == "topk_teacher" else None
    for rows in micro_batches(n, micro_batch_size):
        logits, ids, _ = response_logits(model, [traj.teacher_prompt_ids[r] for r in rows],
                                         [traj.response_ids[r] for r in rows], pad_id)
        logp = logits.float().log_softmax(-1)
        tok = logp.gather(-1, ids[..., None]).squeeze(-1)
        for j, r in enumerate(rows):
            t = len(traj.response_ids[r])
            token[r] = tok[j, :t].cpu().numpy()
            if top is not None:
                top[r] = logp[j, :t].topk(top_k, dim=-1).values.cpu().numpy()
    return token, top


def scaled_7b_shapes(scale: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of Qwen2.5-7B with hidden, intermediate and key/value widths
    divided by ``scale`` (vocabulary kept): the embedding's share of the model grows as
    ``scale`` grows, so the streaming EMA's gain is smaller than at full size."""
    h, i, kv = (QWEN_7B[k] // scale for k in ("hidden", "intermediate", "kv"))
    vocab = QWEN_7B["vocab"]
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for layer in range(QWEN_7B["layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
                   (p + "self_attn.o_proj.weight", (h, h)), (p + "mlp.gate_proj.weight", (i, h)),
                   (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
                   (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def ema_update_materialised(ema_tensors: "OrderedDict[str, torch.Tensor]", named_params, rate: float) -> None:
    """The EMA update before the fix: every parameter the generator yields is kept (a second
    full fp32 copy of the model when it yields host copies), then one ``ema_update_``."""
    params = OrderedDict(named_params)
    names = list(ema_tensors)
    ema_update_([ema_tensors[n] for n in names], [params[n] for n in names], rate)
