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


def prompt_builder(cfg: RunConfig, tokenizer) -> PromptBuilder:
    p = cfg.prompts
    return PromptBuilder(tokenizer, teacher_template=resolve_template(p.teacher_template), system_prompt=p.system_prompt,
                         use_chat_template=p.use_chat_template, max_prompt_tokens=p.max_prompt_tokens,
                         max_teacher_prompt_tokens=p.max_teacher_prompt_tokens, overflow=p.overflow)


def prepare(cfg: RunConfig) -> PreparedRun:
    """Resolve the model, load and tokenize the data: every input error surfaces here."""
    from sdft_ray.variants import get_variant

    variant = get_variant(cfg)
    model_folder = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_folder, cfg.model.trust_remote_code)
    if variant.teacher_model(model_folder) != model_folder:
        teacher_vocab = len(load_tokenizer(variant.teacher_model(model_folder), cfg.model.trust_remote_code))
        if teacher_vocab != len(tokenizer):
            raise ValueError(f"teacher.model_path: the teacher's tokenizer has {teacher_vocab} tokens, the student's "
                             f"{len(tokenizer)}: distillation needs the same vocabulary")
    raw = load_examples(cfg.data.path, columns=cfg.data.columns, split=cfg.data.split, limit=cfg.data.limit,
                        require_demonstration=variant.requires_demonstration or not variant.uses_rollout)
    examples, stats = variant.tokenize(prompt_builder(cfg, tokenizer), raw)
    if not examples:
        raise ValueError(f"data.path {cfg.data.path}: no example left after the length policy ({stats})")
    if len(examples) < cfg.schedule.prompts_per_step:
        log.warning("only %d examples for %d prompts per step: batches repeat examples across epochs",
                    len(examples), cfg.schedule.prompts_per_step)
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
          trust_checkpoint: bool = False) -> dict[str, Any]:
    from sdft_ray.controller import LearnerFailure

    prepared = prepare(cfg)
    if cfg.probe.gate != "off":  # the teacher check, in this process, before any actor starts
        from sdft_ray.probe import gate_run

        gate_run(cfg)
    init_ray(cfg)
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    checkpoint = resolve_resume(resume, run_dir / "checkpoints", trust_checkpoint) if resume else None
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
