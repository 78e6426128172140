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
