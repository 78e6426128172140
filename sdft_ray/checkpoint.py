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
        """Write ``state.json`` last (with a digest of every file), rename into place, point ``latest`` at it, rotate."""
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


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (except the state file), by relative path."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digests[str(path.relative_to(folder))] = h.hexdigest()
    return digests


def verify(checkpoint: Path) -> None:
    """Refuse a checkpoint whose files differ from what its run wrote (corrupt or replaced)."""
    expected = read_state(checkpoint).get("files")
    if expected is None:
        raise ValueError(f"{checkpoint}: no file digests in {STATE_FILE}; not written by sdft-ray")
    actual = file_digests(checkpoint)
    changed = sorted(set(expected) ^ set(actual) | {k for k in expected if actual.get(k) != expected[k]})
    if changed:
        raise ValueError(f"{checkpoint}: files changed since the checkpoint was written: {changed[:5]}")


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
