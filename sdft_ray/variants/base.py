"""The variant interface (see ``sdft_ray.variants``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdft_ray.data import Example
from sdft_ray.prompts import PromptBuilder, TokenizedExample


class Variant:
    """Defaults are SDFT's; subclasses override what differs.

    Driver side (before any actor starts): ``tokenize`` turns examples into student and
    teacher prompt ids. Teacher side (inside the scoring actor, after the rollout):
    ``teacher_prompts`` may build the teacher's context from the student's own response
    (return None to keep the prompts made by ``tokenize``). ``teacher_model`` names the
    teacher's weights.
    """

    name = "base"
    requires_demonstration = True
    uses_rollout = True  # False: the learner trains on the demonstrations (SFT)
    needs_context = False  # True: prompt text and extra columns travel with the trajectories

    def __init__(self, cfg):
        self.cfg = cfg

    def tokenize(self, builder: PromptBuilder, examples: Sequence[Example]) -> tuple[list[TokenizedExample], dict]:
        kept, stats = builder.build(examples)
        if self.cfg.loss.position_weights == "demonstration_shift":
            kept = builder.with_contrast_prompts(kept, examples)
        return kept, stats

    def teacher_prompts(self, traj, tokenizer) -> list[np.ndarray] | None:
        return None

    def teacher_model(self, student_folder: Path) -> Path:
        return student_folder

    @staticmethod
    def student_prompt_only(builder: PromptBuilder, examples: Sequence[Example]) -> tuple[list[TokenizedExample], dict]:
        """Tokenize student prompts; the teacher prompt starts as the student's (variants without a demonstration)."""
        kept = []
        for ex in examples:
            ids = builder.student_ids(ex)
            if len(ids) > builder.max_prompt_tokens:
                from sdft_ray.errors import DataError

                raise DataError(ex.source.rpartition(":")[0], f"student prompt is {len(ids)} tokens, over "
                                f"prompts.max_prompt_tokens={builder.max_prompt_tokens}", row=ex.index, field="prompt")
            kept.append(TokenizedExample(index=ex.index, source=ex.source, prompt_ids=tuple(ids),
                                         teacher_prompt_ids=tuple(ids), extra=dict(ex.extra)))
        return kept, {"kept": len(kept), "dropped": 0, "truncated": 0}

    @staticmethod
    def context(example: Example) -> dict[str, Any]:
        prompt = example.prompt if isinstance(example.prompt, str) else [tuple(m) for m in example.prompt]
        return {**dict(example.extra), "prompt": prompt, "demonstration": example.demonstration,
                "row": example.index, "where": example.source}
