"""The learner's step does not depend on how a batch is cut: one micro-batch, micro-batches of one
sequence, or two data-parallel ranks give the same gradient, update and logged loss - and those
equal the loss and gradient of the whole batch computed at once in this process."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from actors.group import worker_runtime_env
from actors.learner import LearnerWorker
from conftest import tiny_config
from sdft_ray.config import ResourcesConfig
from sdft_ray.distributed import all_reduce_sum
from sdft_ray.forward import pad_right, response_logits
from sdft_ray.losses import LossSpec, TeacherSignal, distillation_loss
from sdft_ray.models import load_causal_lm
from sdft_ray.roles import LearnerGroup
from sdft_ray.step_metrics import combine_learner_metrics
from sdft_ray.trajectory import TeacherScores, Trajectories
from sdft_ray.weights import get_transport

pytestmark = pytest.mark.slow

RESPONSE_LENGTHS = [9, 2, 6, 4]  # uneven: token and sequence means differ, micro-batches differ in tokens


def make_batch(vocab: int, seed: int = 0) -> tuple[Trajectories, TeacherScores]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=n) for n in (5, 7, 3, 6)]
    responses = [rng.integers(3, vocab, size=n) for n in RESPONSE_LENGTHS]
    teacher = [torch.log_softmax(torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed + i)) * 2, -1)
               for i, n in enumerate(RESPONSE_LENGTHS)]
    traj = Trajectories(step=1, policy_version=0, example_index=np.arange(4), epoch=np.zeros(4, int),
                        sample_index=np.zeros(4, int), prompt_ids=prompts, teacher_prompt_ids=prompts,
                        response_ids=responses, rollout_logprobs=[np.zeros(n, np.float32) for n in RESPONSE_LENGTHS],
                        finished=np.ones(4, bool))
    scores = TeacherScores(teacher_version=0, kind="full", full_logprobs=[t.numpy() for t in teacher],
                           token_logprobs=[np.zeros(n, np.float32) for n in RESPONSE_LENGTHS],
                           demonstration_shift=[rng.exponential(1.0, size=n).astype(np.float32)
                                                for n in RESPONSE_LENGTHS])
    return traj, scores


def whole_batch_reference(model_dir, traj: Trajectories, scores: TeacherScores, spec: LossSpec, pad_id: int):
    """Loss and gradient norm of the whole batch in one forward/backward, in this process."""
    model = load_causal_lm(model_dir, "float32")
    logits, ids, mask = response_logits(model, traj.prompt_ids, traj.response_ids, pad_id)
    teacher = pad_right(scores.full_logprobs, 0.0, torch.float32, ids.shape[1])
    shift = pad_right(scores.demonstration_shift, 0.0, torch.float32, ids.shape[1])
    loss, _ = distillation_loss(spec, logits, ids, mask, TeacherSignal(full_logprobs=teacher, demonstration_shift=shift))
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), float(norm)


def run_learners(model_dir, data_path, tmp_path, traj, scores, *, ranks: int, micro: int, spec: LossSpec):
    cfg = tiny_config(model_dir, data_path, tmp_path / "run",
                      learner={"num_workers": ranks, "micro_batch_size": micro, "lr": 1e-2, "grad_clip": 1e9},
                      loss={"aggregation": spec.aggregation, "skip_first_tokens": spec.skip_first_tokens,
                            "position_weights": spec.position_weights, "shift_floor": spec.shift_floor},
                      teacher={"kind": "frozen"}, schedule={"prompts_per_step": 4})
    res = ResourcesConfig(num_cpus=0.5, torch_threads=1)
    handles = [ray.remote(LearnerWorker).options(num_cpus=0.5, runtime_env=worker_runtime_env(res)).remote(
        r, ranks, cfg.model_dump(mode="json"), str(model_dir), 1) for r in range(ranks)]
    learners = LearnerGroup(LearnerWorker, handles, timeout_s=300)
    try:
        learners.call("setup", *learners.call("address"))
        parts = traj.split(ranks)
        part_scores = [select_scores(scores, traj, part) for part in parts]
        per_rank = learners.call_each("train_step", [
            (1, [ray.put(parts[r])], [ray.put(part_scores[r])]) for r in range(ranks)])
        handle = learners.call("publish", "student", 1, None)
        weights = {n: t.clone() for n, t in get_transport(handle.transport).receive(handle)}
    finally:
        learners.kill()
    return combine_learner_metrics(per_rank), weights


def select_scores(scores: TeacherScores, traj: Trajectories, part: Trajectories) -> TeacherScores:
    """The teacher rows of ``part`` (a split of ``traj``: rows are matched by example index)."""
    rows = [int(np.flatnonzero(traj.example_index == i)[0]) for i in part.example_index]
    return TeacherScores(teacher_version=0, kind="full", full_logprobs=[scores.full_logprobs[r] for r in rows],
                         token_logprobs=[scores.token_logprobs[r] for r in rows],
                         demonstration_shift=[scores.demonstration_shift[r] for r in rows])


@pytest.mark.parametrize("aggregation,weights", [("sequence_mean", "uniform"), ("token_mean", "uniform"),
                                                 ("token_mean", "demonstration_shift")])
def test_step_is_independent_of_micro_batches_and_ranks(ray_local, tiny_model_dir, tiny_data, tmp_path, aggregation,
                                                        weights):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    traj, scores = make_batch(len(tok))
    spec = LossSpec(aggregation=aggregation, skip_first_tokens=1, position_weights=weights, shift_floor=0.1)
    loss, norm = whole_batch_reference(tiny_model_dir, traj, scores, spec, tok.pad_token_id)
    runs = {(r, m): run_learners(tiny_model_dir, tiny_data, tmp_path / f"{r}x{m}", traj, scores, ranks=r, micro=m,
                                 spec=spec)
            for r, m in ((1, 4), (1, 1), (2, 1))}
    for (ranks, micro), (metrics, _) in runs.items():
        where = f"{ranks} rank(s), micro-batch {micro}"
        assert metrics["loss"] == pytest.approx(loss, rel=1e-6), where  # the logged loss is the optimised one
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5), where
        assert metrics["loss_tokens"] == sum(n - 1 for n in RESPONSE_LENGTHS), where
    # (The weights after the step are not compared: Adam's first update g / (|g| + eps) turns
    # rounding-level differences of near-zero gradients into visible ones. The gradient norm above,
    # taken from the all-reduced gradients before clipping, is the check on the gradient.)
    base = load_causal_lm(tiny_model_dir, "float32").state_dict()
    for key, (_, weights) in runs.items():
        moved = [float((weights[n] - base[n]).abs().max()) for n in weights]
        assert max(moved) > 1e-3 and all(np.isfinite(moved)), key


def test_normaliser_reduces_the_tensor_it_reads_back(monkeypatch):
    """Regression (issue 12, bug 1): on a GPU ``all_reduce(total.to(device))`` reduced a temporary
    copy and read back the unreduced host tensor: every rank divided by its own count. Simulated
    here: ``Tensor.to`` copies (as host->GPU does) and the reduction adds the other rank's 3 units."""
    real_to = torch.Tensor.to

    def copying_to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, torch.device) and device.type == "cuda":
            return self.clone()
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", copying_to)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(3.0))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    learner = LearnerWorker.__new__(LearnerWorker)
    learner.world_size, learner.device, learner.supervised = 2, torch.device("cuda"), False
    traj = Trajectories(step=1, policy_version=0, example_index=np.arange(2), epoch=np.zeros(2, int),
                        sample_index=np.zeros(2, int), prompt_ids=[np.ones(2), np.ones(2)],
                        teacher_prompt_ids=[np.ones(2), np.ones(2)], response_ids=[np.ones(4), np.ones(1)],
                        rollout_logprobs=[np.zeros(4), np.zeros(1)], finished=np.ones(2, bool))
    total, local = learner._normaliser([traj], None, LossSpec(aggregation="token_mean", skip_first_tokens=1))
    assert (total, local) == (6.0, 3.0)  # 3 local loss tokens + 3 on the other rank
    assert all_reduce_sum([2.0], torch.device("cuda")) == [5.0]


def test_zero3_gathers_land_on_rank0_host_only(monkeypatch):
    """Under ZeRO-3 every rank joins each bucket's gather (a collective), but only rank 0 copies the
    gathered tensors to host memory (issue 12, bug 10: every rank used to)."""
    import contextlib

    import deepspeed

    from sdft_ray.config import RunConfig

    gathers: list[int] = []
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters",
                        lambda params, modifier_rank=None: gathers.append(len(params)) or contextlib.nullcontext())
    host_copies = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: host_copies.append(a) or real_empty(*a, **k))
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    answers = {}
    for rank in (0, 1):
        worker = LearnerWorker.__new__(LearnerWorker)  # no Ray, no engine: only what the gather path reads
        worker.cfg = RunConfig.model_validate({"learner": {"zero_stage": 3}})
        worker.rank, worker.engine = rank, type("Engine", (), {"module": module})()
        gathers.clear(), host_copies.clear()
        got = worker.rank0_parameters()
        answers[rank] = (None if got is None else [(n, t.clone()) for n, t in got], len(gathers), len(host_copies))
    names = [n for n, _ in module.named_parameters()]
    assert answers[1] == (None, answers[0][1], 0)  # rank 1: the same gathers, no host copy, nothing returned
    assert answers[0][1] >= 1 and answers[0][2] == len(names)
    assert [n for n, _ in answers[0][0]] == names
    for (_, copy), param in zip(answers[0][0], module.parameters()):
        assert torch.equal(copy, param.detach())


@pytest.mark.parametrize("ranks", [1, 2])
def test_one_rank_skips_the_gradient_all_reduce(ray_local, tiny_model_dir, tiny_data, tmp_path, ranks):
    """With one data-parallel rank DeepSpeed's all-reduce only copies every gradient through a
    model-sized flat buffer and back: the learner turns it off. Two ranks must still reduce (that
    their update equals one rank's is test_step_is_independent_of_micro_batches_and_ranks)."""
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run", learner={"num_workers": ranks, "micro_batch_size": 2},
                      teacher={"kind": "frozen"}, schedule={"prompts_per_step": 4})
    res = ResourcesConfig(num_cpus=0.5, torch_threads=1)
    handles = [ray.remote(LearnerWorker).options(num_cpus=0.5, runtime_env=worker_runtime_env(res)).remote(
        r, ranks, cfg.model_dump(mode="json"), str(tiny_model_dir), 1) for r in range(ranks)]
    learners = LearnerGroup(LearnerWorker, handles, timeout_s=300)

    def count_all_reduces(worker):
        engine, worker.all_reduces = worker.engine, 0
        reduce = engine.allreduce_gradients

        def counted(*args, **kwargs):
            worker.all_reduces += 1
            return reduce(*args, **kwargs)

        engine.allreduce_gradients = counted

    try:
        learners.call("setup", *learners.call("address"))
        ray.get([h.__ray_call__.remote(count_all_reduces) for h in handles])
        from transformers import AutoTokenizer

        traj, scores = make_batch(len(AutoTokenizer.from_pretrained(tiny_model_dir)))
        parts = traj.split(ranks)
        learners.call_each("train_step", [(1, [ray.put(parts[r])], [ray.put(select_scores(scores, traj, parts[r]))])
                                          for r in range(ranks)])
        counts = ray.get([h.__ray_call__.remote(lambda worker: worker.all_reduces) for h in handles])
    finally:
        learners.kill()
    assert counts == ([0] if ranks == 1 else [1] * ranks)  # two ranks: one call per backward (one micro-batch each)
