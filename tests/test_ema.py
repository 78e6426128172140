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
    # with the names up front, nothing moves and the EMA stays usable
    with pytest.raises(ValueError, match=r"missing=\['b'\], unexpected=\['c'\]"):
        ema.update([("a", torch.ones(2)), ("c", torch.ones(3))], 0.5, names=["a", "c"])
    with pytest.raises(ValueError, match=r"duplicated=\['a'\]"):
        ema.update([("a", torch.ones(2))], 0.5, names=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"unexpected=\['z'\]"):
        ema.load_state_dict({"a": torch.ones(2), "b": torch.ones(3), "z": torch.ones(1)})
    assert (ema["a"] == 0).all() and (ema["b"] == 0).all()
    # the first tensor is wrong: found before anything moved
    for bad, match in [([("c", torch.ones(3))], r"unexpected=\['c'\]"),
                       ([("b", torch.ones(4))], r"'b' has shape \(3,\) .* \(4,\)")]:
        with pytest.raises(ValueError, match=match):
            ema.update(bad + [("a", torch.ones(2))], 0.5)
        assert (ema["a"] == 0).all() and (ema["b"] == 0).all()


@pytest.mark.parametrize("stream, match", [
    ([("a", torch.ones(2))], r"missing=\['b'\]"),
    ([("a", torch.ones(2)), ("c", torch.ones(3))], r"unexpected=\['c'\]"),
    ([("a", torch.ones(2)), ("a", torch.ones(2))], r"duplicated=\['a'\]"),
    ([("a", torch.ones(2)), ("b", torch.ones(4))], r"shape"),
])
def test_failed_streaming_update_poisons_until_reloaded(stream, match) -> None:
    """A mismatch found after a tensor moved: the EMA is half updated, so it refuses every use
    until a consistent state is loaded."""
    ema = EmaWeights({"a": torch.zeros(2), "b": torch.zeros(3)})
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ema.update(stream, 0.5)
    for use in (lambda: ema["a"], ema.state_dict, ema.named_tensors,
                lambda: ema.update([("a", torch.ones(2)), ("b", torch.ones(3))], 0.5)):
        with pytest.raises(RuntimeError, match="inconsistent"):
            use()
    ema.load_state_dict(saved)
    assert (ema["a"] == 0).all() and (ema["b"] == 0).all()


def test_failed_update_still_consumes_the_generator() -> None:
    """A ZeRO-3 generator gathers collectively: every rank must run it to the end, error or not."""
    ema = EmaWeights({"a": torch.zeros(2), "b": torch.zeros(3)})
    consumed = []

    def gen():
        for name, t in [("x", torch.ones(2)), ("a", torch.ones(2)), ("b", torch.ones(3))]:
            consumed.append(name)
            yield name, t

    with pytest.raises(ValueError, match="unexpected"):
        ema.update(gen(), 0.5)
    assert consumed == ["x", "a", "b"]
    consumed.clear()
    with pytest.raises(ValueError, match="missing"):
        ema.update(gen(), 0.5, names=["a"])
    assert consumed == ["x", "a", "b"]


def test_streaming_update_holds_one_parameter_at_a_time() -> None:
    """Each yielded tensor is released before the next is asked for (the old update kept them
    all: a second full copy of the model), the generator is consumed once, and the result equals
    the float64 reference formula."""
    import weakref

    g = torch.Generator().manual_seed(3)
    shapes = {f"p{i}": (4, 3 + i) for i in range(6)}
    start = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    params = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    ema = EmaWeights(start)
    alive: list[weakref.ref] = []
    live_when_asked: list[int] = []
    calls = []

    def host_copies():  # like the learner's full_parameters: a fresh copy per tensor
        calls.append(1)
        for name in reversed(shapes):
            live_when_asked.append(sum(r() is not None for r in alive))
            copy = params[name].clone()
            alive.append(weakref.ref(copy))
            yield name, copy
            del copy

    ema.update(host_copies(), 0.2, names=list(shapes))
    assert calls == [1] and len(alive) == len(shapes)
    assert max(live_when_asked) == 0, live_when_asked
    for name in shapes:
        expected = 0.8 * start[name].double() + 0.2 * params[name].double()
        torch.testing.assert_close(ema[name].double(), expected, atol=1e-6, rtol=1e-6)
        assert ema[name].dtype == torch.float32


def test_from_named_parameters_streams_and_refuses_duplicates() -> None:
    import weakref

    alive: list[weakref.ref] = []
    live_when_asked: list[int] = []

    def host_copies():
        for i in range(4):
            live_when_asked.append(sum(r() is not None for r in alive))
            copy = torch.full((3,), float(i), dtype=torch.bfloat16)
            alive.append(weakref.ref(copy))
            yield f"p{i}", copy
            del copy

    ema = EmaWeights.from_named_parameters(host_copies())
    assert max(live_when_asked) == 0 and [float(t[0]) for _, t in ema.named_tensors()] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="twice"):
        EmaWeights.from_named_parameters([("a", torch.ones(1)), ("a", torch.ones(1))])


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
