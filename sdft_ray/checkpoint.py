"""Atomic, rotated run checkpoints.

Layout of ``<output.dir>/checkpoints``::

    step-00000012/          one complete checkpoint
      state.json            controller state: step, versions, data position, config, metrics
      deepspeed/            learner weights + optimizer + scheduler (every rank)
      student/              Hugging Face folder of the student (export-ready)
      teacher_ema.safetensors
    latest                  text file naming the newest complete checkpoint
    .tmp-step-00000012-*/   a write in progress (ignored, removed on the next start)

A checkpoint is written into a temporary folder and renamed into place only after
``state.json`` (written last, fsynced) exists, so an interrupted write never damages the
previous checkpoint and ``latest`` only ever names complete ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (parents created) through a temporary file, fsynced and renamed
    into place: readers see the old or the new file, never a part. The file gets the permissions a
    plain ``open()`` would give (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2, best_mode: str = "min"):
        """Keep the newest ``keep_last`` checkpoints, plus the best one by ``state["best_value"]``."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.best_mode = best_mode

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def clean_partial(self) -> list[Path]:
        """Remove folders of interrupted writes; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for path in self.root.glob(".tmp-*"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def begin(self, step: int) -> Path:
        """A fresh temporary folder that the learners write into."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{self.name(step)}-", dir=self.root))

    def commit(self, tmp: Path, step: int, state: dict[str, Any]) -> Path:
        """Write ``state.json`` last (with the size and a digest of every file: :func:`file_digests`),
        rename into place, point ``latest`` at it, rotate."""
        state = {**state, "files": file_digests(tmp)}
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        final = self.root / self.name(step)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace atomically
            trash = self.root / f".tmp-old-{final.name}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self.rotate()
        return final

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())

    def best(self) -> Path | None:
        """The complete checkpoint with the best recorded ``best_value`` (None if none has one)."""
        scored = [(read_state(p).get("best_value"), p) for p in self.complete()]
        scored = [(v, p) for v, p in scored if v is not None]
        if not scored:
            return None
        pick = min if self.best_mode == "min" else max
        return pick(scored, key=lambda vp: vp[0])[1]

    def rotate(self) -> None:
        best = self.best()
        for old in self.complete()[: -self.keep_last]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text(encoding="utf-8").strip()
            if (candidate / STATE_FILE).is_file():
                return candidate
        done = self.complete()
        return done[-1] if done else None


#: Files up to this size get a sha256 of all their bytes when a checkpoint is committed.
FULL_DIGEST_BYTES = 16 * 2**20
#: Larger files (weights, optimizer state): a sha256 of their size and of this many blocks ...
SAMPLE_BLOCKS = 16
#: ... of this many bytes, evenly spaced from the first byte to the last (1 MiB per file).
SAMPLE_BLOCK_BYTES = 64 * 2**10


def _sample_offsets(size: int) -> list[int]:
    last = max(0, size - SAMPLE_BLOCK_BYTES)
    return sorted({round(i * last / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})


def file_digest(path: Path, sampled: bool | None = None) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex, "sampled": bool}`` of one file. ``sampled`` (default: when
    the file is larger than ``FULL_DIGEST_BYTES``) hashes the size and ``SAMPLE_BLOCKS`` evenly
    spaced blocks (head and tail included) instead of every byte: constant cost per file."""
    size = path.stat().st_size
    sampled = size > FULL_DIGEST_BYTES if sampled is None else sampled
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if sampled:
            h.update(size.to_bytes(8, "little"))
            for offset in _sample_offsets(size):
                fh.seek(offset)
                h.update(fh.read(SAMPLE_BLOCK_BYTES))
        else:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"bytes": size, "sha256": h.hexdigest(), "sampled": sampled}


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """:func:`file_digest` of every file under ``folder`` (except the state file), by relative path.

    Why not a full sha256 of everything: these digests catch corruption and mix-ups (a file
    truncated, lost, swapped with one of another checkpoint or another run, an edited config or
    state), not attackers: whoever can replace a file can rewrite ``state.json`` as well, so the
    pickle risk of DeepSpeed's optimizer state is handled by where a checkpoint lies
    (:func:`resolve_resume` and ``--trust-checkpoint``), not by digests. Hashing every byte of a
    7B run's checkpoint (~100 GB, mostly optimizer state) takes minutes per save in the driver,
    inside the training loop, for no gain in that protection. So: sizes of every file; every
    byte of the small ones (state, configs, tokenizer, indexes); for large ones, 16 blocks of
    64 KiB spread over the file (the safetensors header and the zip directory of a
    ``torch.save`` file, with its per-entry CRC-32s by default, are at the ends). Not caught: a change
    inside a large file that leaves its size and the sampled blocks as they were (a bit flip in
    the middle of a weight shard).
    """
    return {str(path.relative_to(folder)): file_digest(path)
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)}


def verify(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files differ from what its run wrote (see :func:`file_digests`
    for what is compared). Digests written as plain strings (older checkpoints) are full sha256s."""
    expected = read_state(checkpoint).get("files")
    if expected is None:
        raise ValueError(f"{checkpoint}: no file digests in {STATE_FILE}; not written by sdft-ray")
    present = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != STATE_FILE}
    changed = sorted(present ^ set(expected))
    for name in sorted(present & set(expected)):
        recorded = expected[name]
        if isinstance(recorded, str):
            recorded = {"sha256": recorded, "sampled": False}
        path = checkpoint / name
        if "bytes" in recorded and path.stat().st_size != recorded["bytes"]:
            changed.append(name)
        elif file_digest(path, recorded["sampled"])["sha256"] != recorded["sha256"]:
            changed.append(name)
    if changed:
        raise ValueError(f"{checkpoint}: files changed since the checkpoint was written: {sorted(changed)[:5]}")


def resolve_resume(value: str, root: str | Path, trust: bool = False) -> Path:
    """``--resume latest`` or a checkpoint folder -> a verified, complete checkpoint folder.

    DeepSpeed's optimizer state is a pickle, so a checkpoint outside this run's own
    checkpoint folder is refused unless ``trust`` (``--trust-checkpoint``) is given, and every
    checkpoint's files must match the digests recorded when it was written.
    """
    if value in ("latest", "auto"):
        found = CheckpointManager(root).latest()
        if found is None:
            raise FileNotFoundError(f"--resume {value}: no complete checkpoint under {root}")
        path = found
    else:
        path = Path(value)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume {value}: not a complete checkpoint (no {STATE_FILE})")
        inside = Path(root).resolve() in path.resolve().parents
        if not inside and not trust:
            raise PermissionError(f"--resume {value}: not under this run's {root}; its optimizer state is a pickle: "
                                  "pass --trust-checkpoint only for checkpoints you wrote")
    verify(path)
    return path


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
