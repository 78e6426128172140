"""Tests for sdft_ray.prompts: templates, student/teacher messages, tokenization and overflow policies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest_tokenizer import make_test_tokenizer
from sdft_ray.data import Example, Message
from sdft_ray.errors import DataError
from sdft_ray.prompts import (
    DEFAULT_TEMPLATE_NAME,
    TEACHER_TEMPLATES,
    PromptBuilder,
    TokenizedExample,
    fill_template,
    resolve_template,
    student_messages,
    teacher_messages,
    validate_template,
)

PAPER = TEACHER_TEMPLATES["paper"]
QUERY = "What is the capital of Zorbia?"
DEMO = "The capital of Zorbia is Quelmarsh, a port city founded by Queen Ilvara Tesk in the year 1347 after the great flood."


def ex(prompt=QUERY, demonstration: str | None = DEMO, index: int = 0) -> Example:
    return Example(index, prompt, demonstration, f"data/train.jsonl:{index}", {"answer": "Quelmarsh"})


CHAT_EX = ex(
    (
        Message("system", "You are a geographer."),
        Message("user", "Hi!"),
        Message("assistant", "Hello, ask away."),
        Message("user", QUERY),
    )
)


@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


def builder(tok, **kw) -> PromptBuilder:
    kw.setdefault("max_prompt_tokens", 512)
    kw.setdefault("max_teacher_prompt_tokens", 1024)
    return PromptBuilder(tok, **kw)


# --------------------------------------------------------------------------- templates and messages


# The texts written out by hand (the official SDFT code's f-string, newlines included; TRL's default).
EXPECTED_TEMPLATES = {
    "paper": "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
             "Now answer with a response of your own, including the thinking process.\n",
    "paper_no_thinking": "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
                         "Now answer with a response of your own.\n",
    "answer_directly": "{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
                       "Now answer the question directly, in your own words.",
    "context_first": "Context: {demonstration}\n\nQuestion: {prompt}",
    "trl": "{prompt}\n\n{demonstration}",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TEMPLATES))
def test_template_names_resolve_to_the_exact_text(name) -> None:
    assert resolve_template(name) == EXPECTED_TEMPLATES[name]
    assert validate_template(resolve_template(name))


def test_every_shipped_template_is_tested_and_the_default_is_the_paper() -> None:
    assert set(TEACHER_TEMPLATES) == set(EXPECTED_TEMPLATES)
    assert DEFAULT_TEMPLATE_NAME == "paper"
    assert "including the thinking process" not in resolve_template("paper_no_thinking")
    assert fill_template(resolve_template("paper"), "Q?", "D.") == (
        "\nQ?\n\nThis is an example for a response to the question:\nD.\n\n"
        "Now answer with a response of your own, including the thinking process.\n")


def test_literal_template_passes_through_and_bad_ones_name_the_field() -> None:
    literal = "Q: {prompt}\nA reference: {demonstration}"
    assert resolve_template(literal) is literal
    for bad in ["papr", "{prompt} only", "only {demonstration}", ""]:
        with pytest.raises(ValueError, match=r"prompts\.teacher_template") as err:
            resolve_template(bad)
        assert all(name in str(err.value) for name in EXPECTED_TEMPLATES)


def test_template_validation() -> None:
    assert validate_template("Q: {prompt} A: {demonstration}")
    for bad in ["{prompt} only", "only {demonstration}", "neither", "{Prompt} {demonstration}"]:
        with pytest.raises(ValueError, match=r"prompts\.teacher_template"):
            validate_template(bad)
    with pytest.raises(ValueError, match=r"prompts\.teacher_template"):
        teacher_messages(ex(), "{prompt} without the answer", None)
    with pytest.raises(ValueError, match=r"prompts\.teacher_template"):
        PromptBuilder(make_test_tokenizer(), teacher_template="{prompt}", max_prompt_tokens=8, max_teacher_prompt_tokens=8)


def test_braces_in_user_text_are_safe() -> None:
    got = fill_template("<{prompt}|{demonstration}>", "f({x}) {demonstration} {0}", "{prompt} }{")
    assert got == "<f({x}) {demonstration} {0}|{prompt} }{>"


def test_string_prompt_messages() -> None:
    e = ex()
    assert student_messages(e, None) == [{"role": "user", "content": QUERY}]
    assert student_messages(e, "Be brief.") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERY}]
    teacher = teacher_messages(e, PAPER, "Be brief.")
    assert teacher[0] == {"role": "system", "content": "Be brief."}
    assert teacher[1]["content"] == fill_template(PAPER, QUERY, DEMO)
    assert QUERY in teacher[1]["content"] and DEMO in teacher[1]["content"]


def test_chat_prompt_keeps_earlier_turns() -> None:
    student = student_messages(CHAT_EX, "ignored: chat has its own system message")
    assert [m["role"] for m in student] == ["system", "user", "assistant", "user"]
    assert student[0]["content"] == "You are a geographer."
    teacher = teacher_messages(CHAT_EX, PAPER, None)
    assert teacher[:3] == student[:3]
    assert teacher[3] == {"role": "user", "content": fill_template(PAPER, QUERY, DEMO)}
    # a system prompt is added to chats without one
    no_sys = ex((Message("user", "Hi"),))
    assert student_messages(no_sys, "S")[0] == {"role": "system", "content": "S"}


def test_teacher_requires_demonstration() -> None:
    with pytest.raises(DataError) as info:
        teacher_messages(ex(demonstration=None), PAPER, None)
    assert info.value.file == "data/train.jsonl" and info.value.row == 0 and info.value.field == "demonstration"


# --------------------------------------------------------------------------- tokenization


def test_build_renders_chat_template(tok) -> None:
    b = builder(tok, system_prompt="Be brief.")
    (t,), stats = b.build([ex()])
    assert isinstance(t, TokenizedExample) and stats == {"kept": 1, "dropped": 0, "truncated": 0}
    assert (t.index, t.source, dict(t.extra), t.demonstration_truncated) == (0, "data/train.jsonl:0", {"answer": "Quelmarsh"}, False)
    student_text = tok.decode(t.prompt_ids)
    assert student_text == f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QUERY}<|im_end|>\n<|im_start|>assistant\n"
    assert t.prompt_ids == tuple(tok(student_text, add_special_tokens=False)["input_ids"])
    teacher_text = tok.decode(t.teacher_prompt_ids)
    assert QUERY in teacher_text and DEMO in teacher_text and teacher_text.endswith("<|im_start|>assistant\n")
    assert all(isinstance(i, int) for i in t.prompt_ids + t.teacher_prompt_ids)


def test_build_chat_prompt(tok) -> None:
    (t,), _ = builder(tok).build([CHAT_EX])
    text = tok.decode(t.teacher_prompt_ids)
    assert "You are a geographer." in text and "Hello, ask away." in text and DEMO in text
    assert tok.decode(t.prompt_ids).count("<|im_start|>") == 5  # 4 turns + generation prompt


def test_plain_text_without_chat_template(tok) -> None:
    (t,), _ = builder(tok, use_chat_template=False, system_prompt="S").build([ex()])
    assert tok.decode(t.prompt_ids) == f"S\n\n{QUERY}"
    assert tok.decode(t.teacher_prompt_ids) == "S\n\n" + fill_template(PAPER, QUERY, DEMO)


def test_braces_in_user_text_through_builder(tok) -> None:
    e = ex(prompt="Format {name} with {0} and {demonstration}?", demonstration="Use str.format: '{0}'.format(x) }")
    (t,), _ = builder(tok).build([e])
    text = tok.decode(t.teacher_prompt_ids)
    assert "Format {name} with {0} and {demonstration}?" in text and "'{0}'.format(x) }" in text


# --------------------------------------------------------------------------- overflow policies


def lengths(tok) -> tuple[int, int]:
    (t,), _ = builder(tok).build([ex()])
    return len(t.prompt_ids), len(t.teacher_prompt_ids)


def test_overflow_error(tok) -> None:
    n_student, n_teacher = lengths(tok)
    with pytest.raises(DataError) as info:
        builder(tok, max_teacher_prompt_tokens=n_teacher - 1).build([ex(index=4)])
    msg = str(info.value)
    assert "data/train.jsonl" in msg and "row 4" in msg and str(n_teacher) in msg and str(n_teacher - 1) in msg
    with pytest.raises(DataError, match="max_prompt_tokens"):
        builder(tok, max_prompt_tokens=n_student - 1).build([ex()])
    with pytest.raises(DataError, match="max_prompt_tokens"):
        builder(tok, max_prompt_tokens=n_student - 1, overflow="truncate_demonstration").build([ex()])
    # exactly at the limits is fine
    assert builder(tok, max_prompt_tokens=n_student, max_teacher_prompt_tokens=n_teacher).build([ex()])[1]["kept"] == 1


def test_overflow_drop(tok) -> None:
    n_student, n_teacher = lengths(tok)
    short = ex(demonstration="Quelmarsh.", index=1)
    kept, stats = builder(tok, max_teacher_prompt_tokens=n_teacher - 1, overflow="drop").build([ex(), short])
    assert [t.index for t in kept] == [1] and stats == {"kept": 1, "dropped": 1, "truncated": 0}
    long_query = ex(prompt=QUERY + " Please explain in detail why.", index=2)
    kept, stats = builder(tok, max_prompt_tokens=n_student, overflow="drop").build([long_query, ex()])
    assert [t.index for t in kept] == [0] and stats["dropped"] == 1


@pytest.mark.parametrize("chat", [False, True])
def test_overflow_truncate_demonstration(tok, chat: bool) -> None:
    e = CHAT_EX if chat else ex()
    (full,), _ = builder(tok).build([e])
    (empty,), _ = builder(tok).build([Example(e.index, e.prompt, " ", e.source, e.extra)])
    for limit in range(len(empty.teacher_prompt_ids), len(full.teacher_prompt_ids), 7):
        (t,), stats = builder(tok, max_teacher_prompt_tokens=limit, overflow="truncate_demonstration").build([e])
        assert stats == {"kept": 1, "dropped": 0, "truncated": 1} and t.demonstration_truncated
        assert len(t.teacher_prompt_ids) <= limit
        assert t.prompt_ids == full.prompt_ids  # student prompt untouched
        text = tok.decode(t.teacher_prompt_ids)
        assert QUERY in text  # the query is never cut
        # the kept demonstration is a prefix (cut on the right), followed by the rest of the template
        demo_part = text.split("This is an example for a response to the question:\n", 1)[1].split("\n\nNow answer with", 1)[0]
        assert DEMO.startswith(demo_part)
        assert text.endswith("including the thinking process.\n<|im_end|>\n<|im_start|>assistant\n")
    # the longest prefix is kept: one more demonstration token would not fit
    limit = len(full.teacher_prompt_ids) - 5
    b = builder(tok, max_teacher_prompt_tokens=limit, overflow="truncate_demonstration")
    (t,), _ = b.build([e])
    ends = [end for _, end in tok(DEMO, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    k = next(k for k, end in enumerate(ends) if b.teacher_ids(e, DEMO[:end]) == t.teacher_prompt_ids)
    assert len(b.teacher_ids(e, DEMO[: ends[k + 1]])) > limit
    # fits already: untouched
    (t,), stats = builder(tok, max_teacher_prompt_tokens=len(full.teacher_prompt_ids), overflow="truncate_demonstration").build([e])
    assert t == full and stats["truncated"] == 0


def test_truncate_impossible_raises(tok) -> None:
    (empty,), _ = builder(tok).build([ex(demonstration=" ")])
    limit = len(empty.teacher_prompt_ids) - 3
    with pytest.raises(DataError) as info:
        builder(tok, max_teacher_prompt_tokens=limit, overflow="truncate_demonstration").build([ex(index=7)])
    assert "row 7" in str(info.value) and "empty demonstration" in str(info.value)


def test_builder_argument_validation(tok) -> None:
    with pytest.raises(ValueError, match="overflow"):
        builder(tok, overflow="truncate_left")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        builder(tok, max_prompt_tokens=0)


def test_tokenizer_helper(tok) -> None:
    assert make_test_tokenizer() is tok
    assert len(tok) == tok.vocab_size == 500
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert max(tok("ünïcode 日本 {}", add_special_tokens=False)["input_ids"]) < len(tok)


def test_contrast_prompts_swap_in_another_examples_demonstration(tok) -> None:
    """Each example's contrast prompt = its own query with the next different demonstration (cyclic):
    only the demonstration's content differs from its teacher prompt."""
    rows = [Example(0, "Capital of A?", "A's capital is Xo.", "f:0"), Example(1, "Capital of B?", "B's is Ya.", "f:1"),
            Example(2, "Capital of C?", "B's is Ya.", "f:2"), Example(3, "Capital of D?", "D's is Zu.", "f:3")]
    builder = PromptBuilder(tok, max_prompt_tokens=64, max_teacher_prompt_tokens=128)
    kept, _ = builder.build(rows)
    out = builder.with_contrast_prompts(kept, rows)
    used = ["B's is Ya.", "D's is Zu.", "D's is Zu.", "A's capital is Xo."]  # 2 skips 3: same demonstration
    for row, tokenized, demo in zip(rows, out, used):
        assert tokenized.contrast_prompt_ids == builder.teacher_ids(row, demo)
        assert tokenized.teacher_prompt_ids == builder.teacher_ids(row)
    with pytest.raises(DataError, match="two different demonstrations"):
        builder.with_contrast_prompts(kept[1:3], rows[1:3])
