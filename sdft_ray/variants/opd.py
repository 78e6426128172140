"""On-policy distillation from a separate (larger) teacher model, GKD-style.

The teacher sees the same prompt as the student; its weights come from
``teacher.model_path`` and are never overwritten (``teacher.kind: frozen``). The two models
must share a tokenizer (the loss compares distributions over the same vocabulary).
"""

from __future__ import annotations

from pathlib import Path

from sdft_ray.models import resolve_model_path
from sdft_ray.variants.base import Variant


class ExternalTeacher(Variant):
    name = "opd"
    requires_demonstration = False

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.teacher.model_path:
            raise ValueError("algorithm.variant 'opd' needs teacher.model_path (the external teacher's model folder)")
        if cfg.teacher.kind != "frozen":
            raise ValueError("algorithm.variant 'opd': set teacher.kind to 'frozen' (an external teacher is not an EMA)")

    def tokenize(self, builder, examples):
        return self.student_prompt_only(builder, examples)

    def teacher_model(self, student_folder: Path) -> Path:
        return resolve_model_path(self.cfg.teacher.model_path, self.cfg.model.cache_dir, field="teacher.model_path")
