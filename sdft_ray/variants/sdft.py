"""SDFT: the teacher is the (EMA) student prompted with the query and a demonstration."""

from sdft_ray.variants.base import Variant


class SDFT(Variant):
    name = "sdft"
