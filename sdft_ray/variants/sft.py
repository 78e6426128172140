"""Supervised fine-tuning on the demonstrations (the baseline), on the same learners.

No rollout and no teacher: each demonstration (followed by the end-of-turn token) is the
response, and the learner minimises its negative log-likelihood.
"""

from sdft_ray.variants.base import Variant


class SFT(Variant):
    name = "sft"
    uses_rollout = False
