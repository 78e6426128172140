"""From a config to a finished run: validate everything, start Ray, run the controller.

All user input (config, model folder, data rows, prompt lengths) is checked here, in the
driver, before any actor starts. A learner failure ends the step cleanly; with
``fault_tolerance.max_run_restarts > 0`` the run resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft_ray.checkpoint import CheckpointManager, resolve_resume
from sdft_ray.config import RunConfig
from sdft_ray.data import load_examples
from sdft_ray.metrics import require_logger_packages
from sdft_ray.models import load_tokenizer, resolve_model_path
from sdft_ray.prompts import PromptBuilder, TokenizedExample, resolve_template

log = logging.getLogger("sdft_ray")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PreparedRun:
    cfg: RunConfig
    model_folder: Path
    examples: list[TokenizedExample]
    data_stats: dict[str, int]
    contexts: dict[int, dict] | None = None  # per row: prompt + extra columns (variants that need them)
    targets: dict[int, tuple[int, ...]] | None = None  # per row: demonstration token ids (SFT)

    def controller(self, run_dir=None):
        from sdft_ray.controller import Controller

        return Controller(self.cfg, self.model_folder, self.examples, run_dir or self.cfg.output.dir,
                          contexts=self.contexts, targets=self.targets)


def prompt_builder(cfg: RunConfig, tokenizer, teacher_template: str | None = None) -> PromptBuilder:
    """The run's prompt builder (``teacher_template`` replaces the configured one, e.g. for SDPO)."""
    p = cfg.prompts
    return PromptBuilder(tokenizer, teacher_template=resolve_template(teacher_template or p.teacher_template), system_prompt=p.system_prompt,
                         use_chat_template=p.use_chat_template, max_prompt_tokens=p.max_prompt_tokens,
                         max_teacher_prompt_tokens=p.max_teacher_prompt_tokens, overflow=p.overflow)


def _model_config(folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    from sdft_ray.lora import base_folder_of, is_adapter_folder

    folder = base_folder_of(folder) if is_adapter_folder(folder) else folder  # an adapter: its base's config
    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def check_same_vocabulary(student: Path, teacher: Path, trust_remote_code: bool) -> None:
    """An external teacher must score the student's token ids: same tokenizer, same output size."""
    sizes = {}
    for name, folder in (("student", student), ("teacher", teacher)):
        sizes[name] = (len(load_tokenizer(folder, trust_remote_code)),
                       _model_config(folder, trust_remote_code).get_text_config().vocab_size)
    if sizes["student"] != sizes["teacher"]:
        (st, sv), (tt, tv) = sizes["student"], sizes["teacher"]
        raise ValueError(f"teacher.model_path: the teacher has {tt} tokenizer tokens and {tv} output logits, the "
                         f"student {st} and {sv}: distillation compares distributions over the same vocabulary")


def check_sequence_length(cfg: RunConfig, model_folder: Path, examples: list[TokenizedExample]) -> None:
    """The longest teacher prompt plus a full response must fit the model's context."""
    limit = getattr(_model_config(model_folder, cfg.model.trust_remote_code).get_text_config(),
                    "max_position_embeddings", None)
    longest = max(max(len(e.prompt_ids), len(e.teacher_prompt_ids)) for e in examples)
    if limit is not None and longest + cfg.rollout.max_new_tokens > limit:
        raise ValueError(f"rollout.max_new_tokens = {cfg.rollout.max_new_tokens} plus the longest prompt "
                         f"({longest} tokens, data.path {cfg.data.path}) exceeds the model's context of {limit} "
                         f"tokens (model.path {cfg.model.path}): lower rollout.max_new_tokens or "
                         "prompts.max_teacher_prompt_tokens")


def prepare(cfg: RunConfig) -> PreparedRun:
    """Check the loggers' packages, resolve the model, load and tokenize the data: every input
    error surfaces here."""
    from sdft_ray.variants import get_variant

    variant = get_variant(cfg)
    require_logger_packages(cfg.output)
    model_folder = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_folder, cfg.model.trust_remote_code)
    if variant.teacher_model(model_folder) != model_folder:
        check_same_vocabulary(model_folder, variant.teacher_model(model_folder), cfg.model.trust_remote_code)
    raw = load_examples(cfg.data.path, columns=cfg.data.columns, split=cfg.data.split, limit=cfg.data.limit,
                        require_demonstration=variant.requires_demonstration or not variant.uses_rollout)
    examples, stats = variant.tokenize(prompt_builder(cfg, tokenizer), raw)
    if not examples:
        raise ValueError(f"data.path {cfg.data.path}: no example left after the length policy ({stats})")
    if len(examples) < cfg.schedule.prompts_per_step:
        log.warning("only %d examples for %d prompts per step: batches repeat examples across epochs",
                    len(examples), cfg.schedule.prompts_per_step)
    if variant.uses_rollout:
        check_sequence_length(cfg, model_folder, examples)
        if cfg.loss.position_weights == "demonstration_shift" and examples[0].contrast_prompt_ids is None:
            raise ValueError(f"loss.position_weights 'demonstration_shift' compares the teacher with this example's "
                             f"demonstration and another's: algorithm.variant {cfg.algorithm.variant!r} does not put "
                             "a demonstration in the teacher prompt")
    by_row = {ex.index: ex for ex in raw}
    contexts = {e.index: variant.context(by_row[e.index]) for e in examples} if variant.needs_context else None
    targets = None
    if not variant.uses_rollout:  # SFT: the demonstration followed by the end-of-turn token
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        targets = {e.index: tuple(tokenizer(by_row[e.index].demonstration, add_special_tokens=False)["input_ids"]) + tuple(eos)
                   for e in examples}
    return PreparedRun(cfg, model_folder, examples, stats, contexts, targets)


def init_ray(cfg: RunConfig) -> None:
    """Connect to RAY_ADDRESS if set (a cluster / ray job submit), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": env}, log_to_driver=True)
        return
    pc = cfg.placement
    needed = (cfg.rollout.num_workers * pc.rollout.num_cpus + cfg.teacher.num_workers * pc.teacher.num_cpus
              + cfg.learner.num_workers * pc.learner.num_cpus)
    # Logical CPUs are scheduling tokens: allow a small machine to host every role.
    ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False,
             dashboard_host="127.0.0.1", runtime_env={"env_vars": env}, log_to_driver=True)


def train(cfg: RunConfig, resume: str | None = None, stop_after: int | None = None,
          trust_checkpoint: bool = False, allow_config_change: bool = False) -> dict[str, Any]:
    from sdft_ray.checkpointing import check_resume_config
    from sdft_ray.errors import LearnerFailure

    prepared = prepare(cfg)
    if cfg.probe.gate != "off":  # the teacher check, in this process, before any actor starts
        from sdft_ray.probe import gate_run

        gate_run(cfg)
    run_dir = Path(cfg.output.dir)
    checkpoint = resolve_resume(resume, run_dir / "checkpoints", trust_checkpoint) if resume else None
    if checkpoint is not None:
        check_resume_config(checkpoint, cfg, allow_config_change)
    init_ray(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    attempts = cfg.fault_tolerance.max_run_restarts
    while True:
        controller = prepared.controller(run_dir)
        try:
            controller.start()
            summary = controller.run(resume=checkpoint, stop_after=stop_after)
            summary["data"] = prepared.data_stats
            return summary
        except LearnerFailure:
            latest = CheckpointManager(run_dir / "checkpoints").latest()
            if attempts <= 0 or latest is None:
                raise
            attempts -= 1
            log.warning("learner failure: resuming from %s (%d automatic resumes left)", latest, attempts)
            checkpoint = latest
        finally:
            controller.shutdown()
