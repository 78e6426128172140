"""Weight packing and transports: exact round trips, bucketing, name and shape checks."""

from __future__ import annotations

import pytest
import torch

from sdft_ray.weights import FileTransport, InProcessTransport, bucketize, load_named_tensors, pack_bucket, unpack_bucket


def named(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.randn(3, 4, generator=g)), ("b.bias", torch.randn(5, generator=g).to(torch.bfloat16)),
            ("c.scale", torch.randn((), generator=g).to(torch.float16)), ("d.big", torch.randn(64, 64, generator=g))]


def test_pack_unpack_is_bit_exact_for_every_dtype():
    tensors = named()
    back = list(unpack_bucket(pack_bucket(tensors)))
    assert [n for n, _ in back] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, back):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_buckets_respect_the_size_limit_and_keep_order():
    tensors = named()
    buckets = list(bucketize(tensors, bucket_bytes=200))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    for bucket in buckets:  # a bucket over the limit holds a single tensor that alone exceeds it
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= 200 or len(bucket) == 1


@pytest.mark.parametrize("transport", ["in_process", "file"])
def test_transport_round_trip_into_a_model(transport, tmp_path):
    source, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    t = InProcessTransport() if transport == "in_process" else FileTransport()
    kwargs = {"path": str(tmp_path / "w.safetensors")} if transport == "file" else {}
    handle = t.publish(source.named_parameters(), version=7, kind="student", **kwargs)
    # bytes moved: 12 + 3 float32s; packed buckets start every tensor at a 16-byte boundary
    assert handle.version == 7 and handle.num_tensors == 2
    assert handle.num_bytes == ((12 + 3) * 4 if transport == "file" else 12 * 4 + 16)
    assert load_named_tensors(target, t.receive(handle)) == 2
    assert torch.equal(source.weight, target.weight) and torch.equal(source.bias, target.bias)


def test_unknown_names_and_shapes_are_errors():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(KeyError, match="nope"):
        load_named_tensors(model, [("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        load_named_tensors(model, [("weight", torch.zeros(4, 3))])
