"""One actor per learner rank that holds all three roles (``placement.mode: colocated``).

The learner (:class:`~actors.learner.LearnerWorker`) trains the student; the rollout role samples
with that same live module (no weights move) or, with ``rollout.engine: vllm``, with a vLLM engine
in the same process that is handed the learner's weights in process after every step (on GPUs it
sleeps - weights offloaded, KV cache freed - while the learner trains: ``rollout.vllm.sleep_level:
1``); the teacher role scores with a module of its own in the same process: the EMA teacher, the
base model (``frozen``), another model (variant ``opd``) or the live student itself (``live``).
Where they can, the teacher module's parameters *are* tensors the learner keeps anyway (no second
copy):

* the EMA teacher followed every step (``teacher.sync_every: 1``) in fp32 on the EMA's device:
  its parameters are the EMA's own tensors;
* with ``model.lora``: the frozen base weights are the student's own (only the adapters differ).

The controller drives the roles through :class:`sdft_ray.roles.ColocatedRoleGroup`, whose calls
arrive at :meth:`ColocatedWorker.role_call`. Each role keeps its weight version and refuses work
sent for other weights exactly as a separate actor would, so the schedule, the staleness bound,
checkpoints and resume are those of the disaggregated mode.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from actors.learner import LearnerWorker, teacher_signal_kind
from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer
from sdft_ray.engines import make_engine
from sdft_ray.engines.hf import HFEngine
from sdft_ray.lora import add_adapters
from sdft_ray.memory import tensor_bytes
from sdft_ray.models import load_causal_lm, load_tokenizer, torch_dtype
from sdft_ray.roles import on_ranks
from sdft_ray.weights import IN_PROCESS, WeightHandle, get_transport, load_named_tensors

ROLES = ("rollout", "teacher")


@contextlib.contextmanager
def keep_random_state(device: torch.device) -> Iterator[None]:
    """Leave Python's, NumPy's and torch's random streams (the CPU's and ``device``'s) as they were
    before the block: what the learner draws next does not depend on what the block seeded."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def alias_parameters(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """Make ``model``'s parameters named in ``tensors`` use those tensors' storage (same shape,
    dtype and device required; a parameter that does not match is left alone). Tied parameters
    follow their shared tensor. Returns the names aliased."""
    aliased = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = tensors.get(name)
            if source is not None and (source.shape, source.dtype, source.device) == (param.shape, param.dtype,
                                                                                    param.device):
                param.data = source
                aliased.add(name)
    return aliased


class ColocatedWorker(LearnerWorker):
    def __init__(self, rank: int, world_size: int, cfg_dict: dict, model_folder: str, total_steps: int,
                 teacher_folder: str | None = None):
        super().__init__(rank, world_size, cfg_dict, model_folder, total_steps)
        self.teacher_folder = teacher_folder or model_folder
        self.rollout: RolloutWorker | None = None
        self.teacher: TeacherScorer | None = None
        self.teacher_is_ema = False  # the teacher module's synced parameters are the EMA's tensors

    # ---- set-up ---------------------------------------------------------------------------
    @on_ranks("all")
    def setup(self, master_addr: str, master_port: int) -> dict:
        info = super().setup(master_addr, master_port)
        if self.supervised:  # SFT: nothing is sampled or scored
            return info
        cfg = self.cfg
        if cfg.rollout.engine == "hf":  # the live student: nothing to hand over
            engine = HFEngine.on_module(self.engine.module, self.tokenizer, cfg.rollout.batch_size)
        else:  # an engine with weights of its own, loaded in process from the learner's
            with keep_random_state(self.device):  # vLLM seeds random/numpy/torch at start-up
                engine = make_engine(cfg.rollout.engine, self.model_folder, cfg.model.dtype,
                                     cfg.model.trust_remote_code, cfg.rollout.batch_size, cfg.rollout.vllm)
        self.rollout = RolloutWorker.in_process(self.rank, engine)
        teacher_tokenizer = self.tokenizer if self.teacher_folder == self.model_folder else load_tokenizer(
            self.teacher_folder, cfg.model.trust_remote_code)
        self.teacher = TeacherScorer.in_process(
            self.rank, self._teacher_module(), teacher_tokenizer,
            teacher_signal_kind(cfg), cfg.loss.top_k, cfg.teacher.micro_batch_size, cfg.teacher.transfer_dtype,
            cfg.model_dump(mode="json"))
        self.teacher.incarnation = self.rollout.incarnation  # one process: one incarnation for both roles
        return {**info, "teacher_is_ema": self.teacher_is_ema}

    def _teacher_module(self) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.teacher.kind == "live":
            return self.engine.module
        model = load_causal_lm(self.teacher_folder, cfg.model.dtype, cfg.model.trust_remote_code)
        own_base = self.teacher_folder == self.model_folder
        if cfg.model.lora is not None and own_base:
            model = add_adapters(model, cfg.model.lora)
        model = model.to(self.device).eval().requires_grad_(False)
        if cfg.model.lora is not None and own_base:  # the base is frozen in the student: share it
            alias_parameters(model, {n: p.detach() for n, p in self.engine.module.named_parameters()
                                     if not p.requires_grad})
        if self.ema is not None and cfg.teacher.sync_every == 1:
            ema = self.ema.state_dict()
            self.teacher_is_ema = alias_parameters(model, ema) == set(ema)
        return model

    def ema_source(self) -> Iterator[tuple[str, torch.Tensor]] | None:
        """Every rank keeps the EMA: its own teacher scores with it (ZeRO 0-2: full parameters)."""
        return self.full_parameters()

    @property
    def rollout_is_live(self) -> bool:
        """The rollout role samples with the learner's own module (the ``transformers`` engine)."""
        return getattr(self.rollout.engine, "model", None) is self.engine.module

    # ---- the roles ---------------------------------------------------------------------------
    def role_call(self, role: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """A call of :class:`sdft_ray.roles.ColocatedRoleGroup` for ``role``'s ``method``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; this actor holds {ROLES}")
        if method == "update_weights":
            return self._hold(role, *args, **kwargs)
        return getattr(getattr(self, role), method)(*args, **kwargs)

    def _hold(self, role: str, handle: WeightHandle) -> int:
        """Make ``role`` hold ``handle``'s weights: in process, the learner's weights of that
        version; from another transport, a checkpoint's snapshot of older teacher weights."""
        holder = getattr(self, role)
        if handle.transport == IN_PROCESS:
            if handle.version != self.step:
                raise RuntimeError(f"{role}: asked to hold weight version {handle.version} in process, but the "
                                   f"learner is at step {self.step}")
            if role == "teacher" and handle.kind == "teacher" and not self.teacher_is_ema:
                load_named_tensors(self.teacher.model, self.ema.named_tensors())
            if role == "rollout" and not self.rollout_is_live:
                # vLLM: the student's weights in the model dtype, straight from the learner's module (on
                # its device: no host round trip; ZeRO 0-2 keep full parameters on every rank)
                dtype = torch_dtype(self.cfg.model.dtype)
                self.rollout.engine.load_weights((n, p.detach().to(dtype)) for n, p in self.synced_parameters())
        elif role == "teacher":
            load_named_tensors(self.teacher.model, get_transport(handle.transport).receive(handle))
        else:
            raise RuntimeError(f"rollout samples with the learner's weights; it cannot hold {handle.transport} weights")
        return holder.loaded(handle.version)

    def snapshot_tensors(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """A teacher that follows every ``teacher.sync_every`` steps holds older weights than the
        EMA: its module's synced parameters are those."""
        if handle.transport != IN_PROCESS:
            return super().snapshot_tensors(handle)
        names = {n for n, _ in self.synced_parameters()}
        return ((n, p.detach()) for n, p in self.teacher.model.named_parameters() if n in names)

    @on_ranks("all")
    def memory_report(self) -> dict:
        """The learner's report, plus the teacher module's tensors that are not the learner's own."""
        report = super().memory_report()
        if self.teacher is not None and self.teacher.model is not self.engine.module:
            owned = {p.data_ptr() for p in self.engine.module.parameters()}
            if self.ema is not None:
                owned |= {t.data_ptr() for _, t in self.ema.named_tensors()}
            report["teacher_weights"] = tensor_bytes(p for p in self.teacher.model.parameters()
                                                     if p.data_ptr() not in owned)
            report["other"] -= report["teacher_weights"]
        return report
