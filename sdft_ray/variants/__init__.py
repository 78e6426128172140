"""Self-distillation variants: how the teacher's context and weights are made.

Everything else (rollout, scoring, learning, weight sync, checkpoints) is shared. A variant
is a small class; pick one with ``algorithm.variant`` (a registered name, or
``"package.module:ClassName"`` for your own). See docs/variants.md for writing a new one.
"""

from __future__ import annotations

import importlib

from sdft_ray.variants.base import Variant
from sdft_ray.variants.opd import ExternalTeacher
from sdft_ray.variants.sdft import SDFT
from sdft_ray.variants.sdpo import SDPO
from sdft_ray.variants.sft import SFT

VARIANTS: dict[str, type[Variant]] = {v.name: v for v in (SDFT, SDPO, ExternalTeacher, SFT)}


def get_variant(cfg) -> Variant:
    """The variant object for a RunConfig (``algorithm.variant``)."""
    name = cfg.algorithm.variant
    if name in VARIANTS:
        return VARIANTS[name](cfg)
    module, sep, cls = name.partition(":")
    if not sep:
        raise ValueError(f"algorithm.variant: unknown variant {name!r}; known: {sorted(VARIANTS)} or 'module:Class'")
    try:
        return getattr(importlib.import_module(module), cls)(cfg)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"algorithm.variant: cannot load {name!r}: {exc}") from exc


__all__ = ["VARIANTS", "Variant", "get_variant", "SDFT", "SDPO", "ExternalTeacher", "SFT"]
