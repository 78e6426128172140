"""Tests for sdft_ray.data: formats, column presets, validation errors, EpochSampler."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdft_ray.data import COLUMN_PRESETS, EpochSampler, Example, Message, load_examples
from sdft_ray.errors import DataError

ROWS = [
    {"prompt": "What is the capital of Zorbia?", "demonstration": "The capital of Zorbia is Quelmarsh.", "answer": "Quelmarsh"},
    {"prompt": "Who founded Zorbia?", "demonstration": "Queen Ilvara Tesk founded Zorbia.", "answer": "Ilvara Tesk"},
    {"prompt": "When was Zorbia founded?", "demonstration": "Zorbia was founded in 1347.", "answer": "1347"},
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of Zorbia?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def raises_data_error(path: Path, *, line: int | None = None, row: int | None = None, field: str | None = None, **kw) -> DataError:
    """Load ``path`` expecting a DataError that names the file, line, row and field."""
    with pytest.raises(DataError) as info:
        load_examples(path, **kw)
    err, msg = info.value, str(info.value)
    assert str(path) in msg and err.file == str(path)
    if line is not None:
        assert err.line == line and f"line {line}" in msg
    if row is not None:
        assert err.row == row and f"row {row}" in msg
    if field is not None:
        assert err.field == field and repr(field) in msg
    return err


def check_rows(examples: list[Example], path: Path) -> None:
    assert [e.index for e in examples] == [0, 1, 2]
    assert [e.prompt for e in examples] == [r["prompt"] for r in ROWS]
    assert [e.demonstration for e in examples] == [r["demonstration"] for r in ROWS]
    assert [e.extra["answer"] for e in examples] == [r["answer"] for r in ROWS]
    assert examples[1].source == f"{path}:1"


# --------------------------------------------------------------------------- formats


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    check_rows(load_examples(path), path)
    check_rows(load_examples(str(path)), path)


def test_json_lines_and_json_array(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.json", ROWS)
    check_rows(load_examples(path), path)
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(ROWS, indent=2))
    check_rows(load_examples(arr), arr)


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    check_rows(load_examples(path), path)


@pytest.mark.parametrize("writer", ["stream", "file"])
def test_arrow(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "train.arrow"
    table = pa.Table.from_pylist(ROWS)
    new = pa.ipc.new_stream if writer == "stream" else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as w:
        w.write_table(table)
    check_rows(load_examples(path), path)


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    check_rows(load_examples(path), path)
    check_rows(load_examples(path, split="train"), path)
    assert len(load_examples(path, limit=2)) == 2
    assert "single dataset" in str(raises_data_error(path, split="test"))


def test_split_on_single_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    check_rows(load_examples(path, split="train"), path)
    assert "single dataset" in str(raises_data_error(path, split="test"))


def test_save_to_disk_dataset_dict_split(tmp_path: Path) -> None:
    path = tmp_path / "dd"
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(path))
    check_rows(load_examples(path), path)
    assert len(load_examples(path, split="test")) == 1
    err = raises_data_error(path, split="validation")
    assert "'validation'" in str(err) and "train" in str(err) and "test" in str(err)


def test_chat_messages_in_parquet(tmp_path: Path) -> None:
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT, "output_text": "Quelmarsh."}]), path)
    (ex,) = load_examples(path, columns="official")
    assert ex.prompt == (Message("system", "Be brief."), Message("user", "What is the capital of Zorbia?"))
    assert ex.prompt[1].role == "user" and ex.demonstration == "Quelmarsh."


# --------------------------------------------------------------------------- presets and options


@pytest.mark.parametrize("preset", sorted(COLUMN_PRESETS))
def test_presets(tmp_path: Path, preset: str) -> None:
    cols = COLUMN_PRESETS[preset]
    rows = [{cols["prompt"]: CHAT if preset == "official" else r["prompt"], cols["demonstration"]: r["demonstration"], "split": "a"} for r in ROWS]
    path = write_jsonl(tmp_path / f"{preset}.jsonl", rows)
    examples = load_examples(path, columns=preset)
    assert [e.demonstration for e in examples] == [r["demonstration"] for r in ROWS]
    assert all(e.extra == {"split": "a"} for e in examples)
    if preset == "official":
        assert examples[0].is_chat and examples[0].prompt[-1].content == CHAT[-1]["content"]
    # the other presets' demonstration column is missing here (except when shared)
    for other, other_cols in COLUMN_PRESETS.items():
        if other_cols["demonstration"] != cols["demonstration"]:
            raises_data_error(path, columns=other, field=other_cols["prompt"] if other_cols["prompt"] not in rows[0] else other_cols["demonstration"])


def test_custom_mapping_and_extra(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "Why?", "gold": "Because.", "feedback": "good", "score": 3}])
    (ex,) = load_examples(path, columns={"prompt": "q", "demonstration": "gold"})
    assert (ex.prompt, ex.demonstration, dict(ex.extra)) == ("Why?", "Because.", {"feedback": "good", "score": 3})
    with pytest.raises(ValueError, match="unknown column preset"):
        load_examples(path, columns="nope")
    with pytest.raises(ValueError, match="unknown fields"):
        load_examples(path, columns={"query": "q"})


def test_mixed_prompt_types_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(["", json.dumps({"prompt": "Plain?", "demonstration": "Yes."}), "   ", json.dumps({"prompt": CHAT, "demonstration": "Q."}), ""])
    )
    a, b = load_examples(path)
    assert a.prompt == "Plain?" and not a.is_chat
    assert b.is_chat and b.index == 1 and b.source == f"{path}:1"
    # errors after blank lines still count physical lines: the row on line 6 is row 2
    with path.open("a") as fh:
        fh.write("\n" + json.dumps({"prompt": "", "demonstration": "x"}) + "\n")
    raises_data_error(path, line=6, row=2, field="prompt")


def test_no_demonstration_allowed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "A?", "answer": "a"}, {"prompt": "B?", "demonstration": None}, {"prompt": "C?", "demonstration": "c"}])
    examples = load_examples(path, require_demonstration=False)
    assert [e.demonstration for e in examples] == [None, None, "c"]
    raises_data_error(path, line=1, row=0, field="demonstration")
    # demonstration still validated when present
    write_jsonl(path, [{"prompt": "A?", "demonstration": 5}])
    raises_data_error(path, line=1, row=0, field="demonstration", require_demonstration=False)


def test_limit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [*ROWS, "{broken"])
    assert [e.index for e in load_examples(path, limit=2)] == [0, 1]
    with pytest.raises(ValueError):
        load_examples(path, limit=0)


def test_examples_are_picklable(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": CHAT, "demonstration": "d", "answer": "a"}])
    examples = load_examples(path)
    assert pickle.loads(pickle.dumps(examples)) == examples


def test_repo_dataset_loads() -> None:
    root = Path(__file__).resolve().parent.parent / "data" / "fictional_facts"
    if not root.exists():
        pytest.skip("data not generated")
    train = load_examples(root / "train.jsonl")
    evals = load_examples(root / "eval.jsonl", require_demonstration=False)
    assert len(train) >= 250 and all(e.extra["answer"] for e in train)
    assert {e.extra["kind"] for e in evals} == {"strict", "paraphrase", "ood"}


# --------------------------------------------------------------------------- errors


def test_malformed_json_line_3(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], '{"prompt": "x", "demonstration": ', ROWS[2]])
    err = raises_data_error(path, line=3, row=2)
    assert "malformed JSON" in str(err)


def test_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"prompt": "caf\xe9", "demonstration": "x"}'.encode("latin-1") + b"\n")
    err = raises_data_error(path, line=2, row=1)
    assert "UTF-8" in str(err)


def test_non_object_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "list.jsonl", [ROWS[0], "[1, 2]"])
    err = raises_data_error(path, line=2, row=1)
    assert "expected a JSON object, got list" in str(err)


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ({"prompt": "", "demonstration": "d"}, "prompt", "empty string"),
        ({"prompt": "   \n", "demonstration": "d"}, "prompt", "whitespace-only"),
        ({"prompt": None, "demonstration": "d"}, "prompt", "got None"),
        ({"prompt": 3, "demonstration": "d"}, "prompt", "got int"),
        ({"prompt": [], "demonstration": "d"}, "prompt", "empty list"),
        ({"prompt": "q"}, "demonstration", "missing column"),
        ({"prompt": "q", "demonstration": 17}, "demonstration", "expected a non-empty string, got int"),
        ({"prompt": "q", "demonstration": ["a", "b"]}, "demonstration", "got list"),
        ({"prompt": "q", "demonstration": None}, "demonstration", "got None"),
        ({"prompt": "q", "demonstration": ""}, "demonstration", "empty string"),
        ({"demonstration": "d"}, "prompt", "missing column"),
        ({"prompt": [{"role": "bot", "content": "hi"}], "demonstration": "d"}, "prompt[0].role", "invalid role 'bot'"),
        ({"prompt": [{"role": "user"}], "demonstration": "d"}, "prompt[0].content", "missing 'content'"),
        ({"prompt": [{"role": "user", "content": 5}], "demonstration": "d"}, "prompt[0].content", "got int"),
        ({"prompt": ["hi"], "demonstration": "d"}, "prompt[0]", "message object"),
        ({"prompt": [{"role": ["user"], "content": "x"}], "demonstration": "d"}, "prompt[0].role", "invalid role"),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "demonstration": "d"},
            "prompt[1].role",
            "last message must be a 'user' message",
        ),
    ],
)
def test_row_errors_name_file_line_row_field(tmp_path: Path, row: dict, field: str, needle: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], ROWS[1], ROWS[2], row])
    err = raises_data_error(path, line=4, row=3, field=field)
    assert needle in str(err)


def test_error_message_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], {"prompt": "q", "demonstration": 17}])
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value) == f"{path} line 2 (row 1), field 'demonstration': expected a non-empty string, got int"
    assert isinstance(info.value, ValueError)


def test_official_last_message_not_user(tmp_path: Path) -> None:
    path = tmp_path / "official.parquet"
    full_chat = [*CHAT, {"role": "assistant", "content": "Quelmarsh."}]
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT, "output_text": "a"}, {"messages": full_chat, "output_text": "b"}]), path)
    err = raises_data_error(path, row=1, field="messages[2].role", columns="official")
    assert err.line is None and "last message must be a 'user' message" in str(err)


def test_tabular_row_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[0], {"prompt": "q", "demonstration": None}]), path)
    err = raises_data_error(path, row=1, field="demonstration")
    assert err.line is None and "row 1" in str(err)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_missing_column_lists_available(tmp_path: Path, fmt: str) -> None:
    rows = [{"question": "q", "demonstration": "d", "answer": "a"}]
    path = tmp_path / f"t.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    err = raises_data_error(path, field="prompt")
    assert "missing column 'prompt'" in str(err) and "available columns: question, demonstration, answer" in str(err)
    err = raises_data_error(path, field="privileged_context", columns={"prompt": "question", "demonstration": "privileged_context"})
    assert "question, demonstration, answer" in str(err)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("prompt,demonstration\nq,d\n")
    err = raises_data_error(path)
    assert ".csv" in str(err) and ".jsonl" in str(err) and ".parquet" in str(err) and "save_to_disk" in str(err)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert "empty" in str(raises_data_error(path))


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "demonstration": pa.array([], pa.string())}), path)
    assert "empty" in str(raises_data_error(path))


def test_missing_file_and_bad_dir_and_corrupt(tmp_path: Path) -> None:
    assert "not found" in str(raises_data_error(tmp_path / "nope.jsonl"))
    (tmp_path / "dir").mkdir()
    assert "save_to_disk" in str(raises_data_error(tmp_path / "dir"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file")
    assert "cannot read" in str(raises_data_error(bad))
    bad_arrow = tmp_path / "bad.arrow"
    bad_arrow.write_bytes(b"\x00" * 10)
    assert "cannot read" in str(raises_data_error(bad_arrow))


# --------------------------------------------------------------------------- EpochSampler


def stream(sampler: EpochSampler, sizes: list[int]) -> list[tuple[int, int]]:
    return [p for s in sizes for p in sampler.next_batch(s)]


def test_sampler_matches_definition() -> None:
    n, seed = 7, 3
    got = stream(EpochSampler(n, seed), [5, 5, 5, 6])
    want = [(e, int(i)) for e in range(3) for i in np.random.default_rng([seed, e]).permutation(n)]
    assert got == want
    assert stream(EpochSampler(n, seed, shuffle=False), [10]) == [(0, i) for i in range(7)] + [(1, 0), (1, 1), (1, 2)]


def test_sampler_deterministic_and_exactly_once() -> None:
    a, b = EpochSampler(10, 42), EpochSampler(10, 42)
    sa, sb = stream(a, [3] * 10), stream(b, [3] * 10)
    assert sa == sb
    for epoch in range(3):
        assert sorted(i for e, i in sa if e == epoch) == list(range(10))
    assert [i for e, i in sa if e == 0] != [i for e, i in sa if e == 1]  # reshuffled per epoch
    assert stream(EpochSampler(10, 43), [10]) != sa[:10]
    assert a.position == 30 and a.epoch == 3


def test_sampler_batch_spans_epoch_boundary() -> None:
    s = EpochSampler(4, 0)
    s.next_batch(3)
    batch = s.next_batch(3)
    assert [e for e, _ in batch] == [0, 1, 1] and s.epoch == 1


def test_sampler_resume_mid_epoch() -> None:
    full = EpochSampler(9, 5)
    expected = stream(full, [4] * 8)
    s = EpochSampler(9, 5)
    head = stream(s, [4, 4, 4])  # 12 consumed: mid epoch 1
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"position": 12, "seed": 5, "num_examples": 9, "shuffle": True}
    resumed = EpochSampler(9, 5)
    resumed.load_state_dict(state)
    assert resumed.position == 12 and resumed.epoch == 1
    assert head + stream(resumed, [4] * 5) == expected


@pytest.mark.parametrize("key,value", [("seed", 6), ("num_examples", 10), ("shuffle", False)])
def test_sampler_mismatched_state(key: str, value: object) -> None:
    state = EpochSampler(9, 5).state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=key):
        EpochSampler(9, 5).load_state_dict(state)


def test_sampler_bad_arguments() -> None:
    with pytest.raises(ValueError):
        EpochSampler(0, 1)
    with pytest.raises(ValueError):
        EpochSampler(3, -1)
    with pytest.raises(ValueError):
        EpochSampler(3, 1).next_batch(0)
    with pytest.raises(ValueError, match="missing"):
        EpochSampler(3, 1).load_state_dict({"position": 1})
