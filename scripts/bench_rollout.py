"""Rollout throughput through the Ray rollout actor vs bare vLLM, and weight-sync cost.

Runs in the vLLM environment (``scripts/install_vllm_cpu.sh``)::

    .venv-vllm/bin/python scripts/bench_rollout.py                       # SmolLM2-135M, fp32
    .venv-vllm/bin/python scripts/bench_rollout.py --model tiny --prompts 16
    .venv-vllm/bin/python scripts/bench_rollout.py --hf                  # + transformers engine

Measured one after the other, on the same prompts, sampling parameters, per-row seeds (hence
the same generated tokens) and thread count:

1. bare vLLM: ``LLM.generate`` in this process, no result conversion;
2. ``VLLMEngine.generate`` in this process (adds the log-prob/top-k unpacking);
3. ``RolloutWorker.generate`` in a Ray actor (adds the actor call, trajectory packing and the
   object-store round trip); the ratio 1/3 is the actor's overhead;
4. (``--hf``) ``HFEngine.generate`` in this process, for reference;

then weight sync: ``ObjectStoreTransport.publish`` of the model's parameters here plus
``RolloutWorker.update_weights`` in the actor (in-place vLLM reload), as seconds per GB; and the
same through ``CollectiveTransport`` (this process as group rank 0, a gloo broadcast), with the
ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct",
                    help="HF folder, embedded:<name>, or 'tiny' (random 2-layer Llama, hidden 64)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=8, help="sequences per generate call")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed generate calls per setting (after 1 warm-up)")
    ap.add_argument("--sync-rounds", type=int, default=3, help="timed weight syncs")
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads for every engine")
    ap.add_argument("--topk", type=int, default=0, help="SamplingSpec.topk_logprobs")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--hf", action="store_true", help="also time the transformers engine")
    ap.add_argument("--json", help="also write the numbers to this file")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    # Same thread count in this process (bare vLLM, HF) and in the actor (runtime_env below).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))

    import numpy as np
    import torch

    from sdft_ray.engines import SamplingSpec
    from sdft_ray.models import build_random_model, load_tokenizer, resolve_model_path

    if args.model == "tiny":
        from conftest_tokenizer import make_test_tokenizer

        folder = build_random_model(Path(tempfile.mkdtemp(prefix="bench_tiny_")), make_test_tokenizer(),
                                    hidden_size=64, heads=2, initializer_range=0.3)
    else:
        folder = resolve_model_path(args.model)
    tok = load_tokenizer(folder)
    questions = [json.loads(line)["prompt"] for line in open(REPO / "data/fictional_facts/train.jsonl")]
    prompts = []
    for q in questions[: args.prompts]:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        prompts.append(np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64))
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0, topk_logprobs=args.topk)
    engine_options = {"max_model_len": args.max_model_len}
    results: dict[str, object] = {
        "model": args.model, "dtype": args.dtype, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "topk": args.topk, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
    }

    def timed(fn, label):
        fn()  # warm-up
        secs, toks = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            n = fn()
            secs.append(time.perf_counter() - t0)
            toks.append(n)
        # Median of per-call rates: robust to a call slowed down by other load on a shared machine.
        rate = statistics.median(n / s for n, s in zip(toks, secs))
        results[label] = {"tokens_per_s": rate, "seconds_per_call": statistics.median(secs),
                          "tokens_per_call": statistics.median(toks), "calls_s": secs}
        print(f"  {label:<22s} {rate:8.1f} tok/s   median {statistics.median(secs):6.2f} s/call "
              f"(min {min(secs):.2f}, max {max(secs):.2f})   {int(statistics.median(toks))} tokens/call", flush=True)
        return rate

    print(f"model={args.model} dtype={args.dtype} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
          f"threads={args.threads} topk={args.topk}", flush=True)

    # 1 + 2: bare vLLM and the engine wrapper, in this process.
    from vllm.inputs import TokensPrompt

    from sdft_ray.engines.vllm import VLLMEngine

    t0 = time.perf_counter()
    engine = VLLMEngine(str(folder), dtype=args.dtype, **engine_options)
    results["vllm_startup_s"] = time.perf_counter() - t0
    print(f"  vLLM start-up (in-process) {results['vllm_startup_s']:.1f} s", flush=True)
    requests = [TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts]
    params = [engine._sampling_params(spec, row) for row in range(len(prompts))]

    def bare():
        outs = engine.llm.generate(requests, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def wrapped():
        return sum(len(g.token_ids) for g in engine.generate(prompts, spec))

    bare_rate = timed(bare, "bare_vllm")
    timed(wrapped, "vllm_engine")
    engine.shutdown()
    del engine, params, requests
    import gc

    gc.collect()

    # 3: the rollout actor in Ray.
    import ray

    from actors.group import worker_runtime_env
    from actors.rollout import RolloutWorker
    from sdft_ray.config import ResourcesConfig
    from sdft_ray.trajectory import PromptShard
    from sdft_ray.weights import ObjectStoreTransport

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    res = ResourcesConfig(num_cpus=1, torch_threads=args.threads)
    t0 = time.perf_counter()
    actor = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env=worker_runtime_env(res)).remote(
        0, str(folder), "vllm", args.dtype, engine_options=engine_options, resources=res.model_dump())
    ray.get(actor.ready.remote())
    results["actor_startup_s"] = time.perf_counter() - t0
    results["torch_threads"] = {"this_process": torch.get_num_threads(),
                                "actor": ray.get(actor.__ray_call__.remote(lambda _self: __import__("torch").get_num_threads()))}
    print(f"  actor start-up (Ray + vLLM) {results['actor_startup_s']:.1f} s", flush=True)
    n = len(prompts)
    shard = PromptShard(step=0, seed=0, example_index=np.arange(n), epoch=np.zeros(n, dtype=np.int64),
                        prompt_ids=prompts, teacher_prompt_ids=prompts)
    sampling = {"max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature, "top_p": spec.top_p,
                "topk_logprobs": spec.topk_logprobs}

    def through_actor():
        receipt, traj = ray.get(actor.generate.options(num_returns=2).remote(shard, 1, sampling, 1))
        return receipt.response_tokens

    actor_rate = timed(through_actor, "ray_actor")
    results["actor_overhead_ratio"] = bare_rate / actor_rate

    # Weight sync: publish (pack + ray.put) here, update_weights (receive + in-place reload) there.
    from sdft_ray.models import load_causal_lm

    model = load_causal_lm(folder, args.dtype)
    transport = ObjectStoreTransport()
    pub, upd, nbytes = [], [], 0
    for version in range(1, args.sync_rounds + 1):
        t0 = time.perf_counter()
        handle = transport.publish(model.named_parameters(), version=version, kind="student")
        t1 = time.perf_counter()
        assert ray.get(actor.update_weights.remote(handle)) == version
        t2 = time.perf_counter()
        pub.append(t1 - t0)
        upd.append(t2 - t1)
        nbytes = handle.num_bytes
        del handle
    gb = nbytes / 1e9
    results["weight_sync"] = {"bytes": nbytes, "publish_s": statistics.median(pub), "update_s": statistics.median(upd),
                              "s_per_gb": (statistics.median(pub) + statistics.median(upd)) / gb}
    ws = results["weight_sync"]

    # The same through weight_sync.transport 'collective': this process is group rank 0 (the
    # learner's role), the actor rank 1; pack here, then broadcast + in-place reload together.
    from actors.learner import free_port
    from sdft_ray.collective import join_group
    from sdft_ray.weights import CollectiveTransport

    addr, port = ray.util.get_node_ip_address(), free_port()
    joined = actor.join_sync_group.remote("rollout", addr, port, 1, 2, "gloo", 300)
    join_group("rollout", addr, port, 0, 2, "gloo", 300)
    ray.get(joined)
    collective = CollectiveTransport("rollout")
    pub, upd = [], []
    for version in range(args.sync_rounds + 1, 2 * args.sync_rounds + 1):
        t0 = time.perf_counter()
        handle = collective.publish(model.named_parameters(), version=version, kind="student")
        t1 = time.perf_counter()
        receiving = actor.update_weights.remote(handle)
        collective.send()
        assert ray.get(receiving) == version
        t2 = time.perf_counter()
        pub.append(t1 - t0)
        upd.append(t2 - t1)
    results["weight_sync_collective"] = {
        "bytes": handle.num_bytes, "pack_s": statistics.median(pub), "broadcast_update_s": statistics.median(upd),
        "s_per_gb": (statistics.median(pub) + statistics.median(upd)) / (handle.num_bytes / 1e9)}
    wc = results["weight_sync_collective"]

    if args.hf:
        ray.kill(actor)
        from sdft_ray.engines.hf import HFEngine

        torch.set_num_threads(args.threads)
        hf = HFEngine(str(folder), dtype=args.dtype, batch_size=len(prompts))
        timed(lambda: sum(len(g.token_ids) for g in hf.generate(prompts, spec)), "hf_engine")

    results["loadavg_end"] = os.getloadavg()
    print()
    print(f"host load average at start {results['loadavg_start'][0]:.1f}, at end {results['loadavg_end'][0]:.1f} "
          f"({os.cpu_count()} CPUs): other load on the machine shows up as noise")
    print(f"{'rollout (tokens/s)':<28s}{'bare vLLM':>12s}{'VLLMEngine':>12s}{'Ray actor':>12s}"
          + (f"{'HF engine':>12s}" if args.hf else ""))
    row = f"{'':<28s}{results['bare_vllm']['tokens_per_s']:>12.1f}{results['vllm_engine']['tokens_per_s']:>12.1f}" \
          f"{results['ray_actor']['tokens_per_s']:>12.1f}"
    if args.hf:
        row += f"{results['hf_engine']['tokens_per_s']:>12.1f}"
    print(row)
    print(f"torch threads: this process {results['torch_threads']['this_process']}, "
          f"actor {results['torch_threads']['actor']}")
    print(f"actor overhead ratio (bare / actor tokens/s): {results['actor_overhead_ratio']:.3f}")
    print(f"weight sync: {nbytes / 1e6:.1f} MB, publish {ws['publish_s']:.3f} s + update {ws['update_s']:.3f} s "
          f"= {ws['s_per_gb']:.2f} s/GB")
    print(f"weight sync (collective, gloo): pack {wc['pack_s']:.3f} s + broadcast and update "
          f"{wc['broadcast_update_s']:.3f} s = {wc['s_per_gb']:.2f} s/GB "
          f"(ratio object store / collective: {ws['s_per_gb'] / wc['s_per_gb']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
