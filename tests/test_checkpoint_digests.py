"""Checkpoint digests: cheap for large files, and what they still catch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import sdft_ray.checkpoint as ck
from sdft_ray.checkpoint import STATE_FILE, CheckpointManager, verify

BIG = 64 * 2**20  # above FULL_DIGEST_BYTES
_SHA256 = hashlib.sha256


def _checkpoint(tmp_path: Path) -> tuple[CheckpointManager, Path]:
    mgr = CheckpointManager(tmp_path / "checkpoints")
    tmp = mgr.begin(1)
    (tmp / "student").mkdir()
    (tmp / "student" / "config.json").write_text('{"hidden_size": 8}')
    with open(tmp / "optim_states.pt", "wb") as fh:  # sparse: large on paper, nothing on disk
        fh.write(b"HEAD" * 16)
        fh.truncate(BIG)
        fh.seek(BIG - 4)
        fh.write(b"TAIL")
    return mgr, mgr.commit(tmp, 1, {"step": 1})


class _CountingSha256:
    """hashlib.sha256 that counts the bytes it is fed."""

    fed = 0

    def __init__(self):
        self._h = _SHA256()

    def update(self, data):
        _CountingSha256.fed += len(data)
        self._h.update(data)

    def hexdigest(self):
        return self._h.hexdigest()


def test_commit_hashes_a_bounded_amount_of_a_large_file(tmp_path, monkeypatch):
    """The per-checkpoint cost: sizes for everything, all bytes of small files only (the old
    commit hashed every byte: 64 MiB here, ~100 GB at 7B)."""
    monkeypatch.setattr(ck.hashlib, "sha256", _CountingSha256)
    _CountingSha256.fed = 0
    _, path = _checkpoint(tmp_path)
    assert _CountingSha256.fed <= ck.SAMPLE_BLOCKS * ck.SAMPLE_BLOCK_BYTES + 1024
    files = json.loads((path / STATE_FILE).read_text())["files"]
    assert files["optim_states.pt"]["bytes"] == BIG and files["optim_states.pt"]["sampled"] is True
    assert files["student/config.json"]["sampled"] is False
    verify(path)


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


@pytest.mark.parametrize("tamper", ["small_file", "big_head", "big_tail", "big_middle_block", "big_truncated",
                                    "big_extended", "big_swapped", "file_removed", "file_added"])
def test_verify_catches_changes(tmp_path, tamper):
    _, path = _checkpoint(tmp_path)
    big = path / "optim_states.pt"
    if tamper == "small_file":
        (path / "student" / "config.json").write_text('{"hidden_size": 9}')
    elif tamper == "big_head":
        _patch(big, 0, b"X")
    elif tamper == "big_tail":
        _patch(big, BIG - 1, b"X")
    elif tamper == "big_middle_block":  # inside the 8th sampled block
        _patch(big, ck._sample_offsets(BIG)[7] + 10, b"X")
    elif tamper == "big_truncated":
        os.truncate(big, BIG - 1)
    elif tamper == "big_extended":
        with open(big, "ab") as fh:
            fh.write(b"\0")
    elif tamper == "big_swapped":  # same size, other content (another checkpoint's file)
        with open(big, "wb") as fh:
            fh.write(b"HEAD" * 16)
            fh.truncate(BIG)
            fh.seek(BIG // 2)
            fh.write(os.urandom(4 * ck.SAMPLE_BLOCK_BYTES))
    elif tamper == "file_removed":
        (path / "student" / "config.json").unlink()
    else:
        (path / "student" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="files changed"):
        verify(path)


def test_a_change_between_sampled_blocks_is_not_caught(tmp_path):
    """The documented limit: a byte of a large file outside every sampled block."""
    _, path = _checkpoint(tmp_path)
    offsets = ck._sample_offsets(BIG)
    _patch(path / "optim_states.pt", offsets[1] + ck.SAMPLE_BLOCK_BYTES + 100, b"X")
    assert offsets[1] + ck.SAMPLE_BLOCK_BYTES + 100 < offsets[2]
    verify(path)


def test_older_full_sha256_digests_still_verify(tmp_path):
    _, path = _checkpoint(tmp_path)
    state = json.loads((path / STATE_FILE).read_text())
    state["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in state["files"]}
    (path / STATE_FILE).write_text(json.dumps(state))
    verify(path)
    _patch(path / "optim_states.pt", BIG // 2 + 3, b"X")  # a full digest sees every byte
    with pytest.raises(ValueError, match="optim_states.pt"):
        verify(path)
