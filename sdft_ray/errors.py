"""User-facing error types: each names *where* the bad input is."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Invalid training/eval data.

    Attributes: ``file`` (path as given), ``row`` (0-based row or None),
    ``line`` (1-based line in a JSONL file or None), ``field`` (our field or the
    user's column name, or None) and ``detail`` (the bare reason). ``str(err)``
    reads like ``data/train.jsonl line 17 (row 16), field 'demonstration':
    expected a non-empty string, got int``.
    """

    def __init__(
        self,
        file: str | os.PathLike[str],
        detail: str,
        *,
        row: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = os.fspath(file)
        self.row = row
        self.line = line
        self.field = field
        self.detail = detail
        where = self.file
        if line is not None:
            where += f" line {line}"
            if row is not None:
                where += f" (row {row})"
        elif row is not None:
            where += f" row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {detail}")


class ConfigError(ValueError):
    """Invalid run configuration; ``field`` is the dotted path of the bad value (when known)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class StaleActor(RuntimeError):
    """A work call reached an actor that is not in the state it was sent for: another incarnation
    (Ray restarted it, possibly while it was idle) or other weights. Raised inside the actor; the
    role group counts the restart, re-delivers the weights and re-issues the call."""

    def __init__(self, incarnation: str, holds: int, expected_incarnation: str | None, expected: int) -> None:
        self.incarnation, self.holds = incarnation, holds
        self.expected_incarnation, self.expected = expected_incarnation, expected
        super().__init__(f"this actor (incarnation {incarnation[:8]}, weight version {holds}) is not the one the call "
                         f"expects (incarnation {(expected_incarnation or '?')[:8]}, weight version {expected})")

    def __reduce__(self):  # rebuilt with its arguments on the caller's side of Ray
        return type(self), (self.incarnation, self.holds, self.expected_incarnation, self.expected)


class ActorApplicationError(RuntimeError):
    """An actor raised an error of its own (it is alive): a bug or bad input, not a lost actor.
    The run stops at once with the actor's traceback instead of restarting it."""


class ActorRestartLimit(RuntimeError):
    """A role lost more actors than ``fault_tolerance.max_actor_restarts`` allows."""


class LearnerFailure(RuntimeError):
    """A learner rank was lost or hung: the step is abandoned; the run may resume from a checkpoint."""
