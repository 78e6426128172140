"""Tests for sdft_ray.ema."""

from __future__ import annotations

import pytest
import torch

from sdft_ray.ema import EmaWeights, ema_update_

SHAPES = [(5, 3), (7,), (2, 2, 4)]


pytestmark = pytest.mark.usefixtures("single_thread")


def _params(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rate", [0.01, 0.3, 0.999])
def test_ema_update_matches_float64_reference(param_dtype: torch.dtype, rate: float) -> None:
    ema = [p.float() for p in _params(0, torch.float32)]
    ref = [e.double() for e in ema]
    for step in range(1, 6):
        params = _params(step, param_dtype)
        ema_update_(ema, params, rate)
        ref = [(1 - rate) * r + rate * p.double() for r, p in zip(ref, params)]
        for e, r in zip(ema, ref):
            assert e.dtype == torch.float32
            torch.testing.assert_close(e.double(), r, atol=1e-6, rtol=1e-6)
    # the ema keeps fp32 precision: it is not rounded to the params' bf16 grid
    if param_dtype == torch.bfloat16:
        assert any((e != e.to(torch.bfloat16).float()).any() for e in ema)


def test_rate_edge_cases() -> None:
    start = [p.float() for p in _params(0, torch.float32)]
    params = _params(1, torch.bfloat16)
    ema = [s.clone() for s in start]
    ema_update_(ema, params, 0.0)
    assert all(torch.equal(e, s) for e, s in zip(ema, start))
    ema_update_(ema, params, 1.0)
    assert all(torch.equal(e, p.float()) for e, p in zip(ema, params))


def test_ema_update_validation() -> None:
    ema = [torch.zeros(3), torch.zeros(2, 2)]
    for rate in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            ema_update_(ema, [torch.ones(3), torch.ones(2, 2)], rate)
    with pytest.raises(ValueError, match="2 tensors but 1"):
        ema_update_(ema, [torch.ones(3)], 0.5)
    with pytest.raises(ValueError, match=r"tensor 1 .*\(2, 2\).*param 1 .*\(4,\)"):
        ema_update_(ema, [torch.ones(3), torch.ones(4)], 0.5)
    assert all((e == 0).all() for e in ema)  # nothing was modified by failed calls


def test_ema_weights_from_named_parameters_and_update() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    ema = EmaWeights.from_named_parameters(model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in ema.named_tensors()] == names and len(ema) == 4
    for (_, t), p in zip(ema.named_tensors(), model.parameters()):
        assert t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad
        assert torch.equal(t, p.detach().float()) and t.data_ptr() != p.data_ptr()
    before = {n: t.clone() for n, t in ema.named_tensors()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(reversed(list(model.named_parameters())), 0.25)  # order does not matter
    for n, p in model.named_parameters():
        expected = 0.75 * before[n].double() + 0.25 * p.detach().double()
        torch.testing.assert_close(ema[n].double(), expected, atol=1e-6, rtol=1e-6)


def test_ema_weights_name_mismatch() -> None:
    ema = EmaWeights({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"missing=\['b'\], unexpected=\['c'\]"):
        ema.update([("a", torch.ones(2)), ("c", torch.ones(3))], 0.5)
    with pytest.raises(ValueError, match=r"missing=\['b'\], unexpected=\[\]"):
        ema.update([("a", torch.ones(2))], 0.5)
    with pytest.raises(ValueError, match=r"shape"):
        ema.update([("a", torch.ones(2)), ("b", torch.ones(4))], 0.5)
    with pytest.raises(ValueError, match=r"unexpected=\['z'\]"):
        ema.load_state_dict({"a": torch.ones(2), "b": torch.ones(3), "z": torch.ones(1)})
    assert (ema["a"] == 0).all() and (ema["b"] == 0).all()


def test_state_dict_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    ema = EmaWeights({"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)})
    ema.update([("w", torch.randn(3, 2, generator=g)), ("b", torch.randn(2, generator=g))], 0.1)
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    assert list(state) == ["w", "b"]

    fresh = EmaWeights()
    fresh.load_state_dict(state)
    assert list(fresh.state_dict()) == ["w", "b"]
    assert all(torch.equal(fresh[k], v) for k, v in state.items())

    other = EmaWeights({"w": torch.zeros(3, 2), "b": torch.zeros(2)})
    other.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
    assert all(other[k].dtype == torch.float32 for k in state)
    torch.testing.assert_close(other["w"], state["w"].to(torch.bfloat16).float())
    state["w"].add_(1.0)  # loaded copies do not alias the source
    assert not torch.equal(fresh["w"], state["w"])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"w": torch.zeros(2, 3), "b": torch.zeros(2)})


def test_should_update() -> None:
    assert [EmaWeights.should_update(s, 3) for s in range(1, 8)] == [
        False, False, True, False, False, True, False]
    assert all(EmaWeights.should_update(s, 1) for s in range(1, 5))
    with pytest.raises(ValueError):
        EmaWeights.should_update(1, 0)
    with pytest.raises(ValueError):
        EmaWeights.should_update(0, 2)
