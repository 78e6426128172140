"""Property test: any JSONL input either loads as valid Examples or raises a located DataError."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sdft_ray.data import CHAT_ROLES, COLUMN_PRESETS, Message, load_examples
from sdft_ray.errors import DataError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
texts = st.sampled_from(["", " ", "\n\t", "ok", "What is the capital of Zorbia?", "{prompt}", "é 日本"]) | st.text(max_size=12)
roles = st.sampled_from([*CHAT_ROLES, "user", "user", "bot", "", "USER", "tool"]) | json_values
messages = st.fixed_dictionaries({}, optional={"role": roles, "content": texts | json_values, "name": texts})
chats = st.lists(messages | json_values, max_size=4)
fields = texts | chats | json_values
column_names = st.sampled_from(["prompt", "demonstration", "privileged_context", "messages", "output_text", "answer"])


@st.composite
def object_lines(draw) -> bytes:
    cols = COLUMN_PRESETS[draw(st.sampled_from(sorted(COLUMN_PRESETS)))]
    row = {}
    if draw(st.booleans()) or draw(st.booleans()):
        row[cols["prompt"]] = draw(fields)
    if draw(st.booleans()) or draw(st.booleans()):
        row[cols["demonstration"]] = draw(texts | json_values)
    row.update(draw(st.dictionaries(column_names | st.text(max_size=4), json_values, max_size=2)))
    return json.dumps(row, ensure_ascii=draw(st.booleans())).encode()


TRICKY = [
    b"",
    b"   ",
    b"\r",
    b"\xef\xbb\xbf{}",
    b"{",
    b"[]",
    b"null",
    b"NaN",
    b'"just a string"',
    b"1" * 5000,
    b"[" * 50_000 + b"]" * 50_000,
    b'{"prompt": "\\ud800", "demonstration": "lone surrogate"}',
    b'{"prompt": "dup", "prompt": 5, "demonstration": "d"}',
    b'{"prompt": "caf\xe9", "demonstration": "latin-1"}',
    b'{"prompt": "ok", "demonstration": "ok"}\r',
    b'{"messages": [{"role": "user", "content": "q"}], "output_text": "a", "prompt": "q", "demonstration": "a"}',
]
bad_lines = st.one_of(
    object_lines(),
    st.sampled_from(TRICKY),
    st.binary(max_size=24),
    st.text(max_size=24).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
)
good_texts = st.text(min_size=1, max_size=12).filter(str.strip)
good_chats = st.lists(
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(CHAT_ROLES), good_texts), max_size=3
).map(lambda turns: [*turns, {"role": "user", "content": "q?"}])


@st.composite
def jsonl_files(draw) -> tuple[str, bytes]:
    """A preset and a file body: mostly valid rows for that preset, some malformed lines."""
    preset = draw(st.sampled_from(sorted(COLUMN_PRESETS)))
    cols = COLUMN_PRESETS[preset]
    good = st.builds(
        lambda p, d, extra: json.dumps({cols["prompt"]: p, cols["demonstration"]: d, **extra}).encode(),
        good_texts | good_chats,
        good_texts,
        st.dictionaries(st.sampled_from(["answer", "split", "feedback"]), json_values, max_size=2),
    )
    line = st.integers(0, 9).flatmap(lambda i: good if i < 7 else bad_lines if i < 9 else st.just(b""))  # 70% valid
    body = draw(st.lists(line, max_size=6))
    return preset, b"\n".join(body)


def check_valid(examples, n_rows: int, file: str, require_demonstration: bool) -> None:
    assert [e.index for e in examples] == list(range(n_rows))
    for e in examples:
        assert e.source == f"{file}:{e.index}"
        if isinstance(e.prompt, str):
            assert e.prompt.strip()
        else:
            assert e.prompt and all(isinstance(m, Message) and m.role in CHAT_ROLES and m.content.strip() for m in e.prompt)
            assert e.prompt[-1].role == "user"
        if e.demonstration is None:
            assert not require_demonstration
        else:
            assert isinstance(e.demonstration, str) and e.demonstration.strip()


FUZZ_EXAMPLES = int(os.environ.get("SDFT_FUZZ_EXAMPLES", "300"))  # raise for a deeper search


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(file=jsonl_files(), require_demonstration=st.booleans())
def test_jsonl_fuzz(file: tuple[str, bytes], require_demonstration: bool) -> None:
    preset, data = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(data)
        kwargs = {"columns": preset, "require_demonstration": require_demonstration}
        try:
            examples = load_examples(path, **kwargs)
        except DataError as err:
            msg = str(err)
            event("DataError" if err.line is None else "DataError with line")
            assert str(path) in msg and err.file == str(path)
            if err.line is None:  # only whole-file problems carry no line number
                assert err.row is None and ("empty" in msg or "missing column" in msg), msg
                return
            assert f"line {err.line}" in msg and err.row is not None and f"(row {err.row})" in msg
            # the reported line is really bad: on its own it fails too
            bad_line = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")[err.line - 1]
            assert bad_line.strip(), "blank lines are never reported"
            alone = Path(tmp) / "alone.jsonl"
            alone.write_bytes(bad_line)
            try:
                load_examples(alone, **kwargs)
            except DataError:
                pass
            else:
                raise AssertionError(f"line {err.line} ({bad_line!r}) loads fine on its own, but was reported: {msg}")
            return
        event(f"loaded {len(examples)} examples")
        n_rows = sum(1 for raw in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if raw.decode().strip())
        check_valid(examples, n_rows, str(path), require_demonstration)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=st.lists(good_texts | good_chats, min_size=1, max_size=4),
    demos=st.lists(st.text(min_size=1, max_size=200).filter(str.strip), min_size=4, max_size=4),
    max_prompt=st.integers(20, 120),
    max_teacher=st.integers(70, 300),
    overflow=st.sampled_from(["error", "drop", "truncate_demonstration"]),
)
def test_prompt_builder_fuzz(prompts: list, demos: list[str], max_prompt: int, max_teacher: int, overflow: str) -> None:
    """Arbitrary text never crashes PromptBuilder; kept examples respect both limits and keep the query."""
    from conftest_tokenizer import make_test_tokenizer
    from sdft_ray.prompts import PromptBuilder

    tok = make_test_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": p, "demonstration": d}) for p, d in zip(prompts, demos)), encoding="utf-8")
        examples = load_examples(path)
    builder = PromptBuilder(tok, max_prompt_tokens=max_prompt, max_teacher_prompt_tokens=max_teacher, overflow=overflow)
    try:
        kept, stats = builder.build(examples)
    except DataError as err:
        event("builder: DataError")
        assert err.file == str(path) and err.row is not None and f"row {err.row}" in str(err)
        assert overflow != "drop"
        return
    event(f"builder: kept={stats['kept']} truncated={stats['truncated']}")
    assert stats["kept"] == len(kept) and stats["kept"] + stats["dropped"] == len(examples)
    assert stats["truncated"] == sum(t.demonstration_truncated for t in kept)
    for t in kept:
        assert len(t.prompt_ids) <= max_prompt and len(t.teacher_prompt_ids) <= max_teacher
        ex = examples[t.index]
        query = ex.prompt if isinstance(ex.prompt, str) else ex.prompt[-1].content
        assert query in tok.decode(t.teacher_prompt_ids)
