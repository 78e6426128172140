"""DeepSpeed learner: student forward, SDFT loss, update; keeps and publishes the EMA teacher.

One actor per data-parallel rank, driven by :class:`sdft_ray.roles.LearnerGroup`: every method
declares the ranks it runs on and whose answer counts (:func:`sdft_ray.roles.on_ranks`). Rank 0
owns the fp32 EMA copy and publishes weights; under ZeRO-3 every rank takes part in gathering
parameters (``full_parameters``) but only rank 0 copies them to host memory.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch

from actors.group import SyncGroupMember, set_torch_threads
from sdft_ray.config import RunConfig
from sdft_ray.distributed import all_reduce_sum
from sdft_ray.ema import EmaWeights
from sdft_ray.forward import micro_batches, pad_right, response_logits
from sdft_ray.lora import adapter_tensors, add_adapters, save_adapter
from sdft_ray.losses import (LossSpec, TeacherSignal, distillation_loss, response_loss_mask, sft_loss,
                             shift_position_weights)
from sdft_ray.memory import MemoryBaseline, optimizer_state_tensors, release_free_memory, tensor_bytes
from sdft_ray.models import load_causal_lm, load_tokenizer, torch_dtype
from sdft_ray.roles import on_ranks
from sdft_ray.trajectory import TeacherScores, Trajectories
from sdft_ray.variants import get_variant
from sdft_ray.weights import CollectiveTransport, FileTransport, ObjectStoreTransport, WeightHandle, get_transport


GATHER_NUMEL = 64 * 2**20  # elements gathered at once under ZeRO-3 (256 MB in fp32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return factor


def loss_spec(cfg: RunConfig) -> LossSpec:
    c = cfg.loss
    return LossSpec(alpha=c.alpha, estimator=c.estimator, tail_bucket=c.tail_bucket,
                    skip_first_tokens=c.skip_first_tokens, aggregation=c.aggregation, is_clip=c.is_clip,
                    position_weights=c.position_weights, shift_floor=c.shift_floor)


def teacher_signal_kind(cfg: RunConfig) -> str:
    """What the teacher group must send for this loss configuration."""
    if cfg.loss.estimator == "full":
        return "full"
    if cfg.loss.estimator == "sampled":
        return "sampled"
    return "topk_student" if cfg.loss.topk_source == "student" else "topk_teacher"


def collate_signal(scores: list[TeacherScores], rows: list[tuple[int, int]], width: int, device) -> TeacherSignal:
    """Pad the teacher's per-sequence arrays for the rows ``(part, row)`` into a TeacherSignal."""
    first = scores[0]
    pick = lambda attr: [getattr(scores[p], attr)[r] for p, r in rows]  # noqa: E731
    shift = None
    if first.demonstration_shift is not None:
        shift = pad_right(pick("demonstration_shift"), 0.0, torch.float32, width).to(device)
    if first.kind == "full":
        arrays = [first.as_float(a) for a in pick("full_logprobs")]
        return TeacherSignal(full_logprobs=pad_right(arrays, 0.0, torch.float32, width).to(device),
                             demonstration_shift=shift)
    if first.kind == "topk":
        ids = pad_right(pick("topk_ids"), 0, torch.long, width).to(device)
        return TeacherSignal(topk_ids=ids, topk_logprobs=pad_right(pick("topk_logprobs"), 0.0, torch.float32, width).to(device),
                             demonstration_shift=shift)
    return TeacherSignal(token_logprobs=pad_right(pick("token_logprobs"), 0.0, torch.float32, width).to(device),
                         demonstration_shift=shift)


class LearnerWorker(SyncGroupMember):
    def __init__(self, rank: int, world_size: int, cfg_dict: dict, model_folder: str, total_steps: int,
                 master_addr: str | None = None, master_port: int | None = None):
        self.memory = MemoryBaseline()
        self.cfg = RunConfig.model_validate(cfg_dict)
        set_torch_threads(self.cfg.placement.learner)
        self.rank, self.world_size = rank, world_size
        self.model_folder, self.total_steps = model_folder, total_steps
        self.master = (master_addr, master_port)
        self.engine = None
        self.ema: EmaWeights | None = None
        self.step = 0
        self.transport = ObjectStoreTransport(self.cfg.weight_sync.bucket_mb)
        self.collective: dict[str, CollectiveTransport] = {}  # sync group name -> transport (rank 0)
        self.supervised = not get_variant(self.cfg).uses_rollout  # SFT: no teacher, NLL of the responses

    # ---- set-up ---------------------------------------------------------------------------
    @on_ranks("rank0")
    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    @on_ranks("rank0")
    def join_sync_group(self, name: str, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str = "auto", timeout_s: float = 600.0) -> dict:
        """Rank 0 of a weight sync group: the sender of :class:`CollectiveTransport` buckets."""
        info = super().join_sync_group(name, master_addr, master_port, rank, world_size, backend, timeout_s)
        self.collective[name] = CollectiveTransport(name, self.cfg.weight_sync.bucket_mb)
        return info

    @on_ranks("rank0")
    def send_weights(self, group: str) -> int:
        """Broadcast what the last ``publish(..., group=group)`` packed; returns the bytes sent."""
        return self.collective[group].send()

    @on_ranks("rank0")
    def republish(self, group: str) -> WeightHandle:
        """The weights last broadcast to ``group``, as an object-store handle (for one restarted member)."""
        sent = self.collective[group]
        return self.transport.publish(sent.retained(), *sent.published)

    @on_ranks("all")
    def setup(self, master_addr: str, master_port: int) -> dict:
        import deepspeed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        cuda = torch.cuda.is_available() and self.cfg.placement.learner.num_gpus > 0
        backend = self.cfg.learner.backend if self.cfg.learner.backend != "auto" else ("nccl" if cuda else "gloo")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        torch.manual_seed(self.cfg.schedule.seed)
        lc = self.cfg.learner
        model = load_causal_lm(self.model_folder, "float32", self.cfg.model.trust_remote_code)
        model.config.use_cache = False
        if self.cfg.model.lora is not None:  # train adapters on the frozen base (sdft_ray/lora.py)
            model = add_adapters(model, self.cfg.model.lora)
        if lc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if self.cfg.model.lora is not None:
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        self.tokenizer = load_tokenizer(self.model_folder, self.cfg.model.trust_remote_code)
        self.pad_id = int(self.tokenizer.pad_token_id)
        per_rank = self.cfg.sequences_per_learner
        micro = min(lc.micro_batch_size, per_rank)
        self.micro_batch_size = micro
        gas = math.ceil(per_rank / micro)
        dtype = self.cfg.model.dtype
        ds_config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": gas,
            "train_batch_size": micro * gas * self.world_size,
            "gradient_clipping": lc.grad_clip,
            "zero_optimization": {"stage": lc.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == "bfloat16"},
            "fp16": {"enabled": dtype == "float16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay)
        warmup = math.ceil(lc.warmup_ratio * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(lc.lr_schedule, warmup, self.total_steps))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        if self.world_size == 1 and lc.zero_stage == 0:
            # One data-parallel rank: DeepSpeed's all-reduce would flatten every gradient into a
            # model-sized buffer, average it over the one rank and copy it back (SmolLM2-135M, 2
            # threads: a 4.07 s step becomes 3.60 s, results/bench/learner_step.txt; the peak memory
            # is elsewhere). The gradients are already the ones to apply. One difference: the
            # reduction gave a trainable parameter that the forward did not use a zero gradient;
            # without it AdamW skips that parameter (the models here use all of theirs). ZeRO 1-2
            # reduce into their own partitions there, so they keep it.
            self.engine.enable_backward_allreduce = False
        self.gas = gas
        self.device = self.engine.device
        if self.cfg.teacher.kind == "ema":
            named = self.ema_source()
            self.ema = EmaWeights.from_named_parameters(named) if named is not None else None
        return {"rank": self.rank, "device": str(self.device), "zero_stage": lc.zero_stage, "pid": os.getpid()}

    # ---- weights ---------------------------------------------------------------------------
    def synced_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What the other roles receive and the EMA follows: every parameter, or with
        ``model.lora`` the adapters alone."""
        named = list(self.engine.module.named_parameters())
        return named if self.cfg.model.lora is None else list(adapter_tensors(named))

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0: yield (name, full fp32 CPU tensor), one tensor at a time: every weight, or with
        ``model.lora`` only the adapters (what the learner trains and the other roles receive).
        Under ZeRO-3 every rank must iterate (the gathers are collectives), but only rank 0 copies
        to host memory."""
        named = self.synced_parameters()
        if self.cfg.learner.zero_stage != 3:
            for name, param in named:
                yield name, param.detach().to("cpu", torch.float32)
            return
        import deepspeed

        # ZeRO-3: one all-gather per bucket of parameters (up to GATHER_NUMEL elements), not per tensor.
        bucket: list[tuple[str, torch.nn.Parameter]] = []
        for i, (name, param) in enumerate(named):
            bucket.append((name, param))
            size = sum(getattr(p, "ds_numel", p.numel()) for _, p in bucket)
            if size >= GATHER_NUMEL or i == len(named) - 1:
                with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                    # one fp32 host copy each (the gathered tensors are released on leaving the context)
                    copies = [(n, torch.empty(p.shape, dtype=torch.float32).copy_(p.detach())) for n, p in bucket] \
                        if self.rank == 0 else []
                yield from copies
                bucket = []

    def rank0_parameters(self) -> Iterator[tuple[str, torch.Tensor]] | None:
        """Full parameters on rank 0; other ranks take part in the ZeRO-3 gathers and get None."""
        if self.rank == 0:
            return self.full_parameters()
        if self.cfg.learner.zero_stage == 3:
            for _ in self.full_parameters():
                pass
        return None

    def ema_source(self) -> Iterator[tuple[str, torch.Tensor]] | None:
        """What the EMA teacher starts from and follows: the full parameters where this rank keeps
        an EMA (rank 0, the one that publishes it), None elsewhere."""
        return self.rank0_parameters()

    @on_ranks("all_rank0_answers")
    def publish(self, kind: str, version: int, group: str | None = None) -> WeightHandle | None:
        """Publish student or teacher weights in the model dtype (rank 0 answers; others return None):
        into the object store, or, with ``group``, packed for a broadcast over that sync group
        (then call :meth:`send_weights` together with the receivers' ``update_weights``)."""
        dtype = torch_dtype(self.cfg.model.dtype)
        if kind == "teacher" and self.cfg.teacher.kind == "ema":
            if self.rank != 0:
                return None
            named = ((n, t.to(dtype)) for n, t in self.ema.named_tensors())
        else:
            params = self.rank0_parameters()
            if params is None:
                return None
            named = ((n, t.to(dtype)) for n, t in params)
        if group is None:
            return self.transport.publish(named, version, kind)
        return self.collective[group].publish(named, version, kind)

    # ---- training --------------------------------------------------------------------------
    def _load_parts(self, traj_refs, score_refs) -> tuple[list[Trajectories], list[TeacherScores]]:
        timeout = self.cfg.fault_tolerance.call_timeout_s
        trajs = ray.get(list(traj_refs), timeout=timeout)
        scores = ray.get(list(score_refs), timeout=timeout) if score_refs else None
        return trajs, scores

    def _micro_batch_loss(self, trajs, scores, rows, spec: LossSpec):
        prompts = [trajs[p].prompt_ids[r] for p, r in rows]
        responses = [trajs[p].response_ids[r] for p, r in rows]
        logits, ids, mask = response_logits(self.engine, prompts, responses, self.pad_id)
        if scores is None:  # no teacher: supervised fine-tuning on the given responses
            loss, metrics = sft_loss(logits, ids, mask, spec.aggregation)
            count = float(mask.sum() if spec.aggregation == "token_mean" else mask.any(-1).sum())
            return loss, metrics, count
        signal = collate_signal(scores, rows, ids.shape[1], self.device)
        rollout_lp = pad_right([trajs[p].rollout_logprobs[r] for p, r in rows], 0.0, torch.float32, ids.shape[1])
        loss, metrics = distillation_loss(spec, logits, ids, mask, signal, rollout_lp.to(self.device))
        # How many units the micro-batch mean averaged over, to turn it back into a sum.
        loss_mask = response_loss_mask(mask, spec.skip_first_tokens)
        if spec.aggregation == "sequence_mean":
            count = float(loss_mask.any(-1).sum())
        else:  # tokens, or their total weight under position weights
            count = metrics.get("position_weight_sum", float(loss_mask.sum()))
        return loss, metrics, count

    @staticmethod
    def _lengths(trajs: list[Trajectories], rows: list[tuple[int, int]]) -> list[int]:
        return [len(trajs[p].prompt_ids[r]) + len(trajs[p].response_ids[r]) for p, r in rows]

    def _normaliser(self, trajs: list[Trajectories], scores: list[TeacherScores] | None,
                    spec: LossSpec) -> tuple[float, float]:
        """Global count (sequences with a loss token; loss tokens, or their total position weight)
        and this rank's share."""
        lengths = torch.as_tensor([len(r) for t in trajs for r in t.response_ids])
        width = int(lengths.max()) if len(lengths) else 1
        skip = 0 if self.supervised else spec.skip_first_tokens
        mask = response_loss_mask(torch.arange(width)[None] < lengths[:, None], skip)
        if spec.aggregation == "sequence_mean":
            local = float(mask.any(-1).sum())
        elif spec.position_weights == "demonstration_shift" and scores is not None:
            shift = pad_right([x for s in scores for x in s.demonstration_shift], 0.0, torch.float64, width)
            local = float(torch.where(mask, shift_position_weights(shift, spec.shift_floor), 0.0).sum())
        else:
            local = float(mask.sum())
        return all_reduce_sum([local], self.device)[0], local

    @staticmethod
    def _add(sums: dict[str, float], loss: torch.Tensor, metrics: dict[str, float], count: float) -> None:
        """Accumulate a micro-batch: its loss weighted by the units it averaged over, and the sums."""
        sums["loss_sum"] = sums.get("loss_sum", 0.0) + metrics["loss"] * count
        sums["loss_units"] = sums.get("loss_units", 0.0) + count
        for key, value in metrics.items():
            if key != "loss":
                sums[key] = sums.get(key, 0.0) + value

    @on_ranks("all")
    def train_step(self, step: int, traj_refs: list, score_refs: list) -> dict:
        """One optimizer step on this rank's shard. Returns this rank's sums and counts (see
        :mod:`sdft_ray.step_metrics`): the controller adds them over ranks and divides once."""
        start = time.perf_counter()
        trajs, scores = self._load_parts(traj_refs, score_refs)
        spec = loss_spec(self.cfg)
        total, _ = self._normaliser(trajs, scores, spec)
        rows = [(p, r) for p, t in enumerate(trajs) for r in range(len(t))]
        if len(rows) != self.cfg.sequences_per_learner:
            raise ValueError(f"learner {self.rank}: got {len(rows)} sequences, expected {self.cfg.sequences_per_learner}")
        self.engine.train()
        sums: dict[str, float] = {}
        share = self.world_size / max(total, 1.0)  # DeepSpeed averages gradients over ranks
        batches = micro_batches(len(rows), self.micro_batch_size, self._lengths(trajs, rows))
        grad_norm = None
        for n, mb in enumerate(batches):
            loss, metrics, count = self._micro_batch_loss(trajs, scores, [rows[i] for i in mb], spec)
            self.engine.backward(loss * count * share * self.gas)
            if n == len(batches) - 1 and self.cfg.learner.zero_stage == 0:
                # Without ZeRO, DeepSpeed clips but does not record the norm: take it from the
                # gradients before the step (all-reduced over ranks; on one rank as they are).
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            self.engine.step()
            self._add(sums, loss, metrics, count)
        self.step = step
        out = dict(
            sums, sequences=len(rows), response_tokens=sum(len(t.response_ids[r]) for t in trajs for r in range(len(t))),
            grad_norm=grad_norm if grad_norm is not None else float(self.engine.get_global_grad_norm() or 0.0),
            lr=float(self.engine.get_lr()[0]), policy_version_min=min(t.policy_version for t in trajs),
            teacher_version_min=min(s.teacher_version for s in scores) if scores else -1,
            seconds=time.perf_counter() - start,
        )
        if self.cfg.teacher.kind == "ema" and EmaWeights.should_update(step, self.cfg.teacher.ema_every):
            t0 = time.perf_counter()
            named = self.ema_source()
            if named is not None:  # streamed: one parameter in flight, names checked before any moves
                self.ema.update(named, self.cfg.teacher.ema_rate,
                                names=[n for n, _ in self.synced_parameters()])
            out["ema_seconds"] = time.perf_counter() - t0
        release_free_memory()  # the step's activations and logits: back to the OS, not kept by malloc
        return out

    @on_ranks("all")
    @torch.no_grad()
    def evaluate(self, traj_refs: list, score_refs: list) -> dict:
        """This rank's loss sums on given trajectories, without updating (e.g. a fixed probe batch)."""
        trajs, scores = self._load_parts(traj_refs, score_refs)
        spec = loss_spec(self.cfg)
        rows = [(p, r) for p, t in enumerate(trajs) for r in range(len(t))]
        self.engine.eval()
        sums: dict[str, float] = {}
        for mb in micro_batches(len(rows), self.micro_batch_size, self._lengths(trajs, rows)):
            loss, metrics, count = self._micro_batch_loss(trajs, scores, [rows[i] for i in mb], spec)
            self._add(sums, loss, metrics, count)
        return sums

    # ---- in-flight batches (exact resume of the pipelined schedule) ----------------------------
    @on_ranks("rank0")
    def save_batches(self, folder: str, batches: list[dict]) -> list[str]:
        """Write the trajectories and teacher scores of batches still in flight (``{"step", "trajs":
        [[ref per part] per rollout worker], "scores": [[ref per part] per worker]}``), so that a
        resume trains on exactly what the uninterrupted run would have."""
        timeout = self.cfg.fault_tolerance.call_timeout_s
        out = Path(folder) / "inflight"
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for batch in batches:
            payload = {"step": batch["step"],
                       "trajs": [ray.get(list(parts), timeout=timeout) for parts in batch["trajs"]],
                       "scores": [ray.get(list(parts), timeout=timeout) for parts in batch["scores"]]}
            path = out / f"step-{batch['step']:08d}.pkl"
            with open(path, "wb") as fh:
                pickle.dump(payload, fh, protocol=5)
            written.append(path.name)
        return written

    @on_ranks("rank0")
    def load_batches(self, folder: str) -> list[dict]:
        """The batches :meth:`save_batches` wrote, back in the object store (refs, step order)."""
        batches = []
        for path in sorted((Path(folder) / "inflight").glob("step-*.pkl")):
            with open(path, "rb") as fh:
                payload = pickle.load(fh)  # noqa: S301 - written by this run; resume verifies digests
            batches.append({"step": payload["step"],
                            "trajs": [[ray.put(t) for t in parts] for parts in payload["trajs"]],
                            "scores": [[ray.put(s) for s in parts] for parts in payload["scores"]]})
        return batches

    # ---- checkpoints -----------------------------------------------------------------------
    @on_ranks("all_rank0_answers")
    def save_checkpoint(self, folder: str, client_state: dict, snapshots: dict[str, WeightHandle] | None = None) -> dict:
        """Collective: DeepSpeed state in ``folder/deepspeed``; rank 0 also writes the HF student and EMA.

        ``snapshots`` are weights that a role holds but that differ from the learner's current
        ones (rollout weights synced every N > 1 steps, a teacher synced less often than the
        EMA moves): rank 0 stores them as ``weights_<name>.safetensors`` so a resume restores
        exactly what each role held.
        """
        from safetensors.torch import save_file

        folder_path = Path(folder)
        lora = self.cfg.model.lora
        self.engine.save_checkpoint(str(folder_path / "deepspeed"), tag="learner",
                                    client_state={**client_state, "torch_rng": torch.get_rng_state()},
                                    exclude_frozen_parameters=lora is not None)  # LoRA: the base is the model folder
        params = self.rank0_parameters()
        if params is None:
            return {"rank": self.rank}
        state = {n: t.clone() for n, t in params}
        if lora is not None:  # student/ = a PEFT adapter folder (loads merged through models.load_causal_lm)
            save_adapter(folder_path / "student", state.items(), lora, self.model_folder)
        else:
            self.engine.module.save_pretrained(folder_path / "student", state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(folder_path / "student")
        if self.ema is not None:
            save_file({n: t.contiguous() for n, t in self.ema.state_dict().items()}, str(folder_path / "teacher_ema.safetensors"))
        for name, handle in (snapshots or {}).items():
            FileTransport().publish(self.snapshot_tensors(handle), handle.version, handle.kind,
                                    path=str(folder_path / f"weights_{name}.safetensors"))
        return {"rank": 0}

    def snapshot_tensors(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights behind ``handle``, which a role holds and the learner has moved past."""
        if handle.transport == CollectiveTransport.name:  # what this rank broadcast last
            return iter(self.collective[handle.payload[0]].retained())
        return iter(get_transport(handle.transport).receive(handle))

    @on_ranks("all_rank0_answers")
    def load_checkpoint(self, folder: str) -> dict:
        from safetensors.torch import load_file

        folder_path = Path(folder)
        _, client = self.engine.load_checkpoint(str(folder_path / "deepspeed"), tag="learner",
                                                load_optimizer_states=True, load_lr_scheduler_states=True,
                                                load_module_strict=self.cfg.model.lora is None)
        if client and "torch_rng" in client:
            torch.set_rng_state(client["torch_rng"])
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(folder_path / "teacher_ema.safetensors")))
        self.step = int((client or {}).get("step", 0))
        return {"rank": self.rank, "step": self.step}

    @on_ranks("all")
    def memory_report(self) -> dict:
        """This rank's process memory and its tensors by purpose (MiB)."""
        params = [p for _, p in self.engine.module.named_parameters()]
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # DeepSpeed's wrapper
        return {"rank": self.rank, **self.memory.report(
            weights=tensor_bytes(params), gradients=tensor_bytes(p.grad for p in params),
            optimizer=tensor_bytes(optimizer_state_tensors(optimizer)),
            ema=tensor_bytes(t for _, t in self.ema.named_tensors()) if self.ema is not None else 0.0)}

    @on_ranks("all")
    def ping(self) -> int:
        return self.rank
