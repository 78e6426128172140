"""Loading and validating SDFT training data, and a resumable epoch sampler.

An SDFT example is a query (the *prompt*: a string or a list of chat messages
ending with a user turn) plus a *demonstration* (an expert answer shown only to
the teacher). :func:`load_examples` reads JSON lines (``.jsonl``/``.json``),
``.parquet``, ``.arrow``, a ``datasets`` ``save_to_disk`` directory or a hub dataset id
``org/name`` already in the local ``datasets`` cache (:mod:`sdft_ray.hub`), maps the
user's column names onto ours and validates every row, raising
:class:`~sdft_ray.errors.DataError` (naming file, row, line and field) for
anything malformed. :class:`EpochSampler` gives a deterministic, resumable
stream of ``(epoch, index)`` pairs.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from sdft_ray.errors import DataError
from sdft_ray.hub import is_hub_id, load_cached_dataset

__all__ = [
    "COLUMN_PRESETS",
    "CHAT_ROLES",
    "SUPPORTED_FORMATS",
    "DataError",
    "EpochSampler",
    "Example",
    "Message",
    "Prompt",
    "read_records",
    "load_examples",
]

COLUMN_PRESETS: dict[str, dict[str, str]] = {
    "sdft": {"prompt": "prompt", "demonstration": "demonstration"},
    "trl": {"prompt": "prompt", "demonstration": "privileged_context"},
    "official": {"prompt": "messages", "demonstration": "output_text"},
}
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
SUPPORTED_FORMATS = (".jsonl, .json (JSON lines), .parquet, .arrow, a directory written by datasets' save_to_disk, "
                     "or a hub dataset id 'org/name' in the local datasets cache")
_FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")  # a missing path with one of these is a missing file


class Message(NamedTuple):
    """One chat turn; a plain ``(role, content)`` tuple with named fields."""

    role: str
    content: str


Prompt = str | tuple[Message, ...]


@dataclass(frozen=True)
class Example:
    """A validated SDFT example.

    ``index`` is the 0-based row in the dataset, ``source`` is ``"file:row"``,
    ``demonstration`` is None only when loaded with ``require_demonstration=False``
    and ``extra`` holds the row's other columns (e.g. ``answer``, ``split``).
    """

    index: int
    prompt: Prompt
    demonstration: str | None
    source: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        """True when the prompt is a list of chat messages."""
        return not isinstance(self.prompt, str)

    @property
    def query(self) -> str:
        """The question as text: the prompt, or a chat prompt's last user turn."""
        if isinstance(self.prompt, str):
            return self.prompt
        return [m.content for m in self.prompt if m.role == "user"][-1]


# --------------------------------------------------------------------------- loading


class _Row(NamedTuple):
    row: int
    line: int | None
    values: Mapping[str, Any]


def _no_splits(split: str) -> str:
    return f"split {split!r} requested, but this is a single dataset (only a saved DatasetDict has splits)"


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _resolve_columns(columns: str | Mapping[str, str]) -> dict[str, str]:
    if isinstance(columns, str):
        if columns not in COLUMN_PRESETS:
            choices = ", ".join(COLUMN_PRESETS)
            raise ValueError(f"unknown column preset {columns!r}; choose one of {choices} or pass a mapping")
        return dict(COLUMN_PRESETS[columns])
    unknown = set(columns) - {"prompt", "demonstration"}
    if unknown:
        raise ValueError(f"unknown fields in column mapping: {sorted(unknown)}; allowed: 'prompt', 'demonstration'")
    resolved = {**COLUMN_PRESETS["sdft"], **columns}
    for key, col in resolved.items():
        if not isinstance(col, str) or not col:
            raise ValueError(f"column mapping for {key!r} must be a non-empty string, got {col!r}")
    return resolved


def _scan_json_lines(path: str, limit: int | None) -> Iterator[_Row]:
    """Yield one object per non-blank line; blank lines still count for line numbers."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if path.lower().endswith(".json") and data.lstrip()[:1] == b"[":
        yield from _scan_json_array(path, data, limit)
        return
    row = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if limit is not None and row >= limit:
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, f"invalid UTF-8 (byte {e.start} of the line)", row=row, line=lineno) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", row=row, line=lineno) from None
        except (ValueError, RecursionError) as e:
            raise DataError(path, f"malformed JSON: {e}", row=row, line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {_type_name(obj)}", row=row, line=lineno)
        yield _Row(row, lineno, obj)
        row += 1


def _scan_json_array(path: str, data: bytes, limit: int | None) -> Iterator[_Row]:
    """A ``.json`` file holding one top-level array of objects (rows carry no line numbers)."""
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(path, f"invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise DataError(path, f"malformed JSON: {e}") from None
    for row, obj in enumerate(items[:limit] if limit is not None else items):
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {_type_name(obj)}", row=row)
        yield _Row(row, None, obj)


def _read_table_rows(path: str, split: str | None, limit: int | None) -> tuple[list[str], list[_Row]]:
    """Rows of a parquet/arrow file, a save_to_disk directory or a cached hub dataset, plus its column names."""
    try:
        is_file = os.path.isfile(path)  # else a save_to_disk folder, or a hub id (_read_rows checked its shape)
        if not is_file:
            import datasets

            if os.path.isdir(path):
                try:
                    ds = datasets.load_from_disk(path)
                except FileNotFoundError:
                    detail = f"directory is not a dataset written by save_to_disk; supported: {SUPPORTED_FORMATS}"
                    raise DataError(path, detail) from None
            else:
                ds = load_cached_dataset(path)
            if isinstance(ds, datasets.DatasetDict):
                name = split or "train"
                if name not in ds:
                    raise DataError(path, f"split {name!r} not found; available splits: {', '.join(ds)}")
                ds = ds[name]
            elif split not in (None, "train"):
                raise DataError(path, _no_splits(split))
            if limit is not None and limit < len(ds):
                ds = ds.select(range(limit))
            names, records = list(ds.column_names), ds.to_list()
        else:
            import pyarrow as pa

            if path.lower().endswith(".parquet"):
                import pyarrow.parquet as pq

                table = pq.read_table(path)
            else:
                try:
                    table = pa.ipc.open_file(path).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_stream(path).read_all()
            if limit is not None:
                table = table.slice(0, limit)
            names, records = list(table.column_names), table.to_pylist()
    except DataError:
        raise
    except Exception as e:  # pyarrow/datasets raise many types for corrupt files
        raise DataError(path, f"cannot read file: {type(e).__name__}: {e}") from None
    return names, [_Row(i, None, rec) for i, rec in enumerate(records)]


def _check_text(value: Any, where: dict[str, Any], what: str = "a non-empty string") -> str:
    if not isinstance(value, str):
        raise DataError(detail=f"expected {what}, got {_type_name(value)}", **where)
    if not value.strip():
        kind = "a whitespace-only" if value else "an empty"
        raise DataError(detail=f"expected {what}, got {kind} string", **where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(detail="string contains invalid Unicode (lone surrogate)", **where) from None
    return value


def _check_prompt(value: Any, where: dict[str, Any]) -> Prompt:
    what = "a non-empty string or a non-empty list of chat messages"
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return _check_text(value, where, what)
    if not value:
        raise DataError(detail=f"expected {what}, got an empty list", **where)
    col = where["field"]
    messages = []
    for i, msg in enumerate(value):
        at = {**where, "field": f"{col}[{i}]"}
        if not isinstance(msg, Mapping):
            raise DataError(detail=f"expected a message object with 'role' and 'content', got {_type_name(msg)}", **at)
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(detail=f"message is missing {key!r}", **{**at, "field": f"{col}[{i}].{key}"})
        role = msg["role"]
        if not isinstance(role, str) or role not in CHAT_ROLES:
            detail = f"invalid role {role!r}; expected one of {', '.join(CHAT_ROLES)}"
            raise DataError(detail=detail, **{**at, "field": f"{col}[{i}].role"})
        content = _check_text(msg["content"], {**at, "field": f"{col}[{i}].content"})
        messages.append(Message(role, content))
    if messages[-1].role != "user":
        raise DataError(
            detail=f"the last message must be a 'user' message (the query to answer), got {messages[-1].role!r}; "
            "put the expert answer in the demonstration column instead",
            **{**where, "field": f"{col}[{len(messages) - 1}].role"},
        )
    return tuple(messages)


def _read_rows(file: str, split: str | None, limit: int | None) -> tuple[list[str], list[_Row]]:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    ext = os.path.splitext(file)[1].lower()
    hub_dataset = not os.path.exists(file) and is_hub_id(file) and ext not in _FILE_EXTENSIONS
    if not os.path.exists(file) and not hub_dataset:
        raise DataError(file, "file not found")
    if split not in (None, "train") and not (os.path.isdir(file) or hub_dataset):
        raise DataError(file, _no_splits(split))
    if os.path.isdir(file) or hub_dataset or ext in (".parquet", ".arrow"):
        names, rows = _read_table_rows(file, split, limit)
    elif ext in (".jsonl", ".json"):
        rows = list(_scan_json_lines(file, limit))
        names = list(dict.fromkeys(k for r in rows for k in r.values))
    else:
        raise DataError(file, f"unsupported file extension {ext or '(none)'!r}; supported: {SUPPORTED_FORMATS}")
    if not rows:
        raise DataError(file, "file is empty (no rows)")
    return names, rows


def read_records(path: str | os.PathLike[str], *, split: str | None = None,
                 limit: int | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The raw rows of any supported file (JSONL/JSON, Parquet, Arrow, a ``save_to_disk``
    folder) as ``(where, record)`` pairs; ``where`` = ``{"file", "row", "line"}``, the keyword
    arguments of :class:`DataError`. Same errors as :func:`load_examples`; no column is required."""
    file = os.fspath(path)
    _, rows = _read_rows(file, split, limit)
    return [({"file": file, "row": r.row, "line": r.line}, dict(r.values)) for r in rows]


def load_examples(
    path: str | os.PathLike[str],
    *,
    columns: str | Mapping[str, str] = "sdft",
    split: str | None = None,
    require_demonstration: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Load and validate examples from ``path``.

    ``columns`` is a preset name from :data:`COLUMN_PRESETS` or a mapping from our
    field (``prompt``/``demonstration``) to the user's column name. ``split``
    selects a split of a saved ``DatasetDict`` (default ``"train"``); a single
    file or dataset has no splits, so only None or ``"train"`` is accepted there.
    With ``require_demonstration=False`` the demonstration may be absent or null
    (e.g. for evaluation data). ``limit`` keeps only the first rows. Every other
    column is kept in ``Example.extra``.

    Raises :class:`DataError` for any unreadable or invalid input, and
    ``ValueError`` for bad arguments.
    """
    file = os.fspath(path)
    cols = _resolve_columns(columns)
    names, rows = _read_rows(file, split, limit)

    prompt_col, demo_col = cols["prompt"], cols["demonstration"]
    for our, col in (("prompt", prompt_col), ("demonstration", demo_col)):
        if col not in names and (our == "prompt" or require_demonstration):
            hint = f" (column for {our!r})" if col != our else ""
            available = ", ".join(names) or "(none)"
            raise DataError(file, f"missing column {col!r}{hint}; available columns: {available}", field=col)

    examples = []
    for r in rows:
        where: dict[str, Any] = {"file": file, "row": r.row, "line": r.line}
        for col in (prompt_col, demo_col) if require_demonstration else (prompt_col,):
            if col not in r.values:  # only JSON rows can lack a column
                has = ", ".join(r.values) or "nothing"
                raise DataError(detail=f"missing column (row has: {has})", field=col, **where)
        prompt = _check_prompt(r.values[prompt_col], {**where, "field": prompt_col})
        demo = r.values.get(demo_col)
        if demo is not None or require_demonstration:
            demo = _check_text(demo, {**where, "field": demo_col})
        extra = {k: v for k, v in r.values.items() if k not in (prompt_col, demo_col)}
        examples.append(Example(r.row, prompt, demo, f"{file}:{r.row}", extra))
    return examples


# --------------------------------------------------------------------------- sampling


class EpochSampler:
    """Deterministic, resumable stream of ``(epoch, index)`` pairs.

    The stream is ``perm(0) ++ perm(1) ++ ...`` with
    ``perm(e) = numpy.random.default_rng([seed, e]).permutation(num_examples)``
    (the identity when ``shuffle`` is False). Batches may span epoch
    boundaries; restoring :meth:`state_dict` reproduces all future batches.
    """

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True) -> None:
        num_examples, seed = operator.index(num_examples), operator.index(seed)
        if num_examples < 1:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = bool(shuffle)
        self._position = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def position(self) -> int:
        """Number of indices consumed so far (over all epochs)."""
        return self._position

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from."""
        return self._position // self.num_examples

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of dataset indices in ``epoch``."""
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                self._perm = np.arange(self.num_examples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def next_batch(self, size: int) -> list[tuple[int, int]]:
        """Consume and return the next ``size`` ``(epoch, index)`` pairs."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"batch size must be a positive integer, got {size!r}")
        out = []
        for pos in range(self._position, self._position + size):
            epoch, offset = divmod(pos, self.num_examples)
            out.append((epoch, int(self.permutation(epoch)[offset])))
        self._position += size
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: position plus the identity of the stream."""
        return {
            "position": self._position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the seed, size and shuffle flag must match."""
        missing = {"position", "seed", "num_examples", "shuffle"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing keys: {sorted(missing)}")
        mine = self.state_dict()
        keys = ("seed", "num_examples", "shuffle")
        diffs = [f"{k}: saved {state[k]!r}, current {mine[k]!r}" for k in keys if state[k] != mine[k]]
        if diffs:
            raise ValueError("sampler state does not match this dataset/config (" + "; ".join(diffs) + ")")
        position = state["position"]
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"sampler state has an invalid position {position!r}")
        self._position = position
