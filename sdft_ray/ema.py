"""Exponential moving average of model weights (the SDFT teacher), kept in fp32 master precision."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence

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
        self._tensors: OrderedDict[str, Tensor] = OrderedDict()
        self._broken: str | None = None  # why the tensors are inconsistent (a failed update), else None
        for name, t in (tensors or {}).items():
            self._add(name, t)

    def _add(self, name: str, t: Tensor) -> None:
        if name in self._tensors:
            raise ValueError(f"EMA parameter {name!r} given twice")
        self._tensors[name] = t.detach().to(device=self.device, dtype=torch.float32, copy=True)

    @classmethod
    def from_named_parameters(cls, named_params: Iterable[tuple[str, Tensor]],
                              device: torch.device | str = "cpu") -> EmaWeights:
        """Detached fp32 clones of ``named_params`` (e.g. ``model.named_parameters()``), taken one
        tensor at a time: a generator of host copies is never held whole next to the EMA."""
        ema = cls(device=device)
        for name, t in named_params:
            ema._add(name, t)
            del t  # not held while the generator makes the next one
        return ema

    def _check_names(self, names: Iterable[str]) -> None:
        counts = Counter(list(names))  # a Mapping counts its keys
        missing = [n for n in self._tensors if n not in counts]
        unexpected = [n for n in counts if n not in self._tensors]
        duplicated = [n for n, c in counts.items() if c > 1]
        if missing or unexpected or duplicated:
            raise ValueError(f"EMA parameter names do not match: missing={missing}, "
                             f"unexpected={unexpected}" + (f", duplicated={duplicated}" if duplicated else ""))

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"the EMA weights are inconsistent since a failed update ({self._broken}); "
                               "load them from a checkpoint")

    def update(self, named_params: Iterable[tuple[str, Tensor]], rate: float,
               names: Sequence[str] | None = None) -> None:
        """``ema <- (1 - rate) * ema + rate * param``, streamed: each tensor is cast (to the EMA's
        fp32 and device) and lerped as it arrives, so memory beyond the EMA is one tensor (the
        caller's generator can gather parameters one bucket at a time); names must match
        exactly (any order), each once.

        Checks: with ``names`` (the names the generator will yield, e.g. from
        ``model.named_parameters()``, which copies nothing) the set is checked before any tensor
        moves; unknown, repeated or mis-shaped tensors stop the update when they arrive (before
        they are applied); names never seen are only known at the end. A check that fails after
        some tensors moved leaves the EMA half updated: it then refuses every use
        (``RuntimeError``) until :meth:`load_state_dict` restores a consistent state. On any
        failed check the rest of ``named_params`` is still consumed (and dropped), so that a
        generator that gathers collectively (ZeRO-3) finishes on every rank instead of leaving
        the other ranks waiting in a gather.
        """
        items = iter(named_params)
        seen: set[str] = set()
        try:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"EMA rate must be in [0, 1], got {rate}")
            self._check_usable()
            if names is not None:
                self._check_names(names)
            for name, param in items:
                ema = self._tensors.get(name)
                if ema is None or name in seen:
                    raise ValueError(f"EMA parameter names do not match: "
                                     f"{'unexpected' if ema is None else 'duplicated'}=[{name!r}]")
                if ema.shape != param.shape:
                    raise ValueError(f"EMA tensor {name!r} has shape {tuple(ema.shape)} but the parameter has "
                                     f"shape {tuple(param.shape)}")
                ema_update_([ema], [param], rate)
                seen.add(name)
                del param  # not held while the generator makes the next one (a 7B embedding is 2 GB)
            if len(seen) != len(self._tensors):
                missing = [n for n in self._tensors if n not in seen]
                raise ValueError(f"EMA parameter names do not match: missing={missing}, unexpected=[]")
        except (ValueError, RuntimeError) as exc:
            if seen:
                self._broken = f"{len(seen)} of {len(self._tensors)} tensors moved: {exc}"
            for _ in items:  # let a collective generator finish on this rank too
                pass
            raise

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Iterate ``(name, fp32 tensor)`` in insertion order."""
        self._check_usable()
        return iter(self._tensors.items())

    def state_dict(self) -> OrderedDict[str, Tensor]:
        """Name -> tensor mapping (the live tensors, like ``nn.Module.state_dict``)."""
        self._check_usable()
        return OrderedDict(self._tensors)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` in (cast to fp32). An empty instance adopts the names of ``state``;
        otherwise names and shapes must match exactly. Makes an EMA usable again after a failed
        update."""
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
        self._broken = None

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, name: str) -> Tensor:
        self._check_usable()
        return self._tensors[name]

    @staticmethod
    def should_update(step: int, every: int) -> bool:
        """True when ``step`` (counted from 1) is a multiple of ``every``."""
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        if step < 1:
            raise ValueError(f"step is counted from 1, got {step}")
        return step % every == 0
