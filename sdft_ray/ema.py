"""Exponential moving average of model weights (the SDFT teacher), kept in fp32 master precision."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor


@torch.no_grad()
def ema_update_(ema: Iterable[Tensor], params: Iterable[Tensor], rate: float) -> None:
    """In place ``ema <- (1 - rate) * ema + rate * param`` for each pair.

    ``ema`` tensors are typically fp32; ``params`` may be bf16/fp16/fp32 (and on another device):
    they are cast to each ema tensor's dtype/device first. ``rate`` = 0 leaves ``ema`` unchanged,
    ``rate`` = 1 copies ``params``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"EMA rate must be in [0, 1], got {rate}")
    ema_list, param_list = list(ema), list(params)
    if len(ema_list) != len(param_list):
        raise ValueError(f"EMA has {len(ema_list)} tensors but {len(param_list)} params were given")
    for i, (e, p) in enumerate(zip(ema_list, param_list)):
        if e.shape != p.shape:
            raise ValueError(f"EMA tensor {i} has shape {tuple(e.shape)} but param {i} has shape "
                             f"{tuple(p.shape)}")
        if not e.is_floating_point():
            raise ValueError(f"EMA tensor {i} must be floating point, got {e.dtype}")
    if not ema_list:
        return
    cast = [p.detach().to(device=e.device, dtype=e.dtype) for e, p in zip(ema_list, param_list)]
    if hasattr(torch, "_foreach_lerp_"):
        torch._foreach_lerp_(ema_list, cast, rate)
    else:  # pragma: no cover - very old torch
        for e, p in zip(ema_list, cast):
            e.lerp_(p, rate)


class EmaWeights:
    """Ordered ``name -> fp32 tensor`` EMA copy of a model's parameters."""

    def __init__(self, tensors: Mapping[str, Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._tensors: OrderedDict[str, Tensor] = OrderedDict(
            (name, t.detach().to(device=self.device, dtype=torch.float32, copy=True))
            for name, t in (tensors or {}).items())

    @classmethod
    def from_named_parameters(cls, named_params: Iterable[tuple[str, Tensor]],
                              device: torch.device | str = "cpu") -> EmaWeights:
        """Detached fp32 clones of ``named_params`` (e.g. ``model.named_parameters()``)."""
        return cls(OrderedDict(named_params), device=device)

    def _check_names(self, names: Iterable[str]) -> None:
        given = list(names)
        given_set = set(given)
        missing = [n for n in self._tensors if n not in given_set]
        unexpected = [n for n in given if n not in self._tensors]
        if missing or unexpected:
            raise ValueError(f"EMA parameter names do not match: missing={missing}, "
                             f"unexpected={unexpected}")

    def update(self, named_params: Iterable[tuple[str, Tensor]], rate: float) -> None:
        """``ema <- (1 - rate) * ema + rate * param``; names must match exactly (any order)."""
        params = OrderedDict(named_params)
        self._check_names(params)
        names = list(self._tensors)
        try:
            ema_update_([self._tensors[n] for n in names], [params[n] for n in names], rate)
        except ValueError as exc:
            raise ValueError(f"{exc} (names in order: {names})") from exc

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Iterate ``(name, fp32 tensor)`` in insertion order."""
        return iter(self._tensors.items())

    def state_dict(self) -> OrderedDict[str, Tensor]:
        """Name -> tensor mapping (the live tensors, like ``nn.Module.state_dict``)."""
        return OrderedDict(self._tensors)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` in (cast to fp32). An empty instance adopts the names of ``state``;
        otherwise names and shapes must match exactly."""
        if not self._tensors:
            self._tensors = EmaWeights(state, device=self.device)._tensors
            return
        self._check_names(state)
        for name, t in self._tensors.items():
            if t.shape != state[name].shape:
                raise ValueError(f"EMA tensor {name!r} has shape {tuple(t.shape)} but the state "
                                 f"dict has {tuple(state[name].shape)}")
        with torch.no_grad():
            for name, t in self._tensors.items():
                t.copy_(state[name])

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    @staticmethod
    def should_update(step: int, every: int) -> bool:
        """True when ``step`` (counted from 1) is a multiple of ``every``."""
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        if step < 1:
            raise ValueError(f"step is counted from 1, got {step}")
        return step % every == 0
