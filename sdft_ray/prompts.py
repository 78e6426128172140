"""Student and teacher prompts for SDFT, and their tokenization with a length policy.

The student sees only the query; the teacher sees the query and the
demonstration through a template (by default the SDFT paper's). For chat
prompts, only the teacher's last user turn is rewritten; earlier turns are kept.

``prompts.teacher_template`` names a template of :data:`TEACHER_TEMPLATES` or is a literal
template; :func:`resolve_template` turns either into the text (the config keeps the name).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sdft_ray.data import Example
from sdft_ray.errors import DataError

__all__ = [
    "DEFAULT_TEMPLATE_NAME",
    "TEACHER_TEMPLATES",
    "Overflow",
    "PromptBuilder",
    "TokenizedExample",
    "fill_template",
    "resolve_template",
    "student_messages",
    "teacher_messages",
    "validate_template",
]

_PAPER_PREFIX = "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"

#: Teacher user turns by name (``prompts.teacher_template``); each has ``{prompt}`` and ``{demonstration}``.
TEACHER_TEMPLATES: dict[str, str] = {
    # The official SDFT code's template verbatim (its f-string starts and ends with a newline).
    "paper": _PAPER_PREFIX + "Now answer with a response of your own, including the thinking process.\n",
    # The same without the invitation to write out a thinking process (the framing it causes at small sizes).
    "paper_no_thinking": _PAPER_PREFIX + "Now answer with a response of your own.\n",
    # Terse: asks for the answer itself, in the model's own words, with no invitation to frame it.
    "answer_directly": "{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
                       "Now answer the question directly, in your own words.",
    # The demonstration first, as retrieved context, then the question (an oracle-RAG style prompt).
    "context_first": "Context: {demonstration}\n\nQuestion: {prompt}",
    # TRL's SDFTTrainer default (teacher_prompt_template="{prompt}\n\n{privileged_context}").
    "trl": "{prompt}\n\n{demonstration}",
}
DEFAULT_TEMPLATE_NAME = "paper"
Overflow = Literal["error", "drop", "truncate_demonstration"]
_PLACEHOLDER = re.compile(r"\{(prompt|demonstration)\}")


def validate_template(template: str) -> str:
    """Return ``template`` if it contains both ``{prompt}`` and ``{demonstration}``, else raise ValueError."""
    if not isinstance(template, str):
        raise ValueError(f"prompts.teacher_template must be a string, got {type(template).__name__}")
    missing = ", ".join(p for p in ("{prompt}", "{demonstration}") if p not in template)
    if missing:
        raise ValueError(f"prompts.teacher_template must contain both {{prompt}} and {{demonstration}}; missing {missing}")
    return template


def resolve_template(name_or_text: str) -> str:
    """The template text for a :data:`TEACHER_TEMPLATES` name, or ``name_or_text`` itself when it is a
    literal template (with both placeholders); anything else is a ValueError naming
    ``prompts.teacher_template`` and the known names."""
    if isinstance(name_or_text, str) and name_or_text in TEACHER_TEMPLATES:
        return TEACHER_TEMPLATES[name_or_text]
    try:
        return validate_template(name_or_text)
    except ValueError:
        missing = ", ".join(p for p in ("{prompt}", "{demonstration}") if p not in str(name_or_text))
        raise ValueError(f"prompts.teacher_template: {name_or_text!r} is neither a template name "
                         f"({', '.join(TEACHER_TEMPLATES)}) nor a literal template (missing {missing})") from None


def fill_template(template: str, prompt: str, demonstration: str) -> str:
    """Substitute the placeholders in one pass: braces (or placeholders) in the values stay literal."""
    values = {"prompt": prompt, "demonstration": demonstration}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _where(example: Example) -> tuple[str, int | None]:
    file, _, row = example.source.rpartition(":")
    return (file, int(row)) if file and row.isdigit() else (example.source, None)


def student_messages(example: Example, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The student's chat: ``[system?] + user(prompt)``, or the example's own chat.

    ``system_prompt`` is prepended unless the chat already starts with a system message.
    """
    if isinstance(example.prompt, str):
        messages = [{"role": "user", "content": example.prompt}]
    else:
        messages = [{"role": m.role, "content": m.content} for m in example.prompt]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def teacher_messages(
    example: Example,
    template: str = TEACHER_TEMPLATES[DEFAULT_TEMPLATE_NAME],
    system_prompt: str | None = None,
    *,
    demonstration: str | None = None,
) -> list[dict[str, str]]:
    """The teacher's chat: the student's, with the last user turn filled into ``template``.

    ``demonstration`` overrides ``example.demonstration`` (used for truncation).
    """
    validate_template(template)
    demo = example.demonstration if demonstration is None else demonstration
    if demo is None:
        file, row = _where(example)
        raise DataError(file, "a demonstration is required to build the teacher prompt", row=row, field="demonstration")
    messages = student_messages(example, system_prompt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last] = {"role": "user", "content": fill_template(template, messages[last]["content"], demo)}
    return messages


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of the student prompt and the teacher prompt of one example."""

    index: int
    source: str
    prompt_ids: tuple[int, ...]
    teacher_prompt_ids: tuple[int, ...]
    demonstration_truncated: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    contrast_prompt_ids: tuple[int, ...] | None = None  # the teacher prompt with another example's demonstration


class PromptBuilder:
    """Renders and tokenizes student/teacher prompts and enforces length limits.

    Prompts are rendered with the tokenizer's chat template (with the generation
    prompt) and tokenized without adding special tokens. Without a chat template
    (or with ``use_chat_template=False``) the message contents are joined with
    blank lines (``self.use_chat_template`` then reads False). ``overflow``
    decides what happens to a too-long teacher prompt: ``"error"`` raises
    :class:`DataError`, ``"drop"`` skips the example and
    ``"truncate_demonstration"`` keeps the longest token prefix of the
    demonstration that fits (the query is never cut). A too-long *student*
    prompt is dropped under ``"drop"`` and an error otherwise.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        teacher_template: str = TEACHER_TEMPLATES[DEFAULT_TEMPLATE_NAME],
        system_prompt: str | None = None,
        use_chat_template: bool = True,
        max_prompt_tokens: int,
        max_teacher_prompt_tokens: int,
        overflow: Overflow = "error",
    ) -> None:
        if overflow not in ("error", "drop", "truncate_demonstration"):
            raise ValueError(f"overflow must be 'error', 'drop' or 'truncate_demonstration', got {overflow!r}")
        limits = {"max_prompt_tokens": max_prompt_tokens, "max_teacher_prompt_tokens": max_teacher_prompt_tokens}
        for name, value in limits.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.tokenizer = tokenizer
        self.teacher_template = validate_template(teacher_template)
        self.system_prompt = system_prompt
        self.use_chat_template = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.max_prompt_tokens = max_prompt_tokens
        self.max_teacher_prompt_tokens = max_teacher_prompt_tokens
        self.overflow = overflow

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for ``messages`` (ending where the assistant's answer starts)."""
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def encode(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
        """Token ids of :meth:`render` (no special tokens added beyond the template's)."""
        return tuple(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])

    def student_ids(self, example: Example) -> tuple[int, ...]:
        """Token ids of the student prompt."""
        return self.encode(student_messages(example, self.system_prompt))

    def teacher_ids(self, example: Example, demonstration: str | None = None) -> tuple[int, ...]:
        """Token ids of the teacher prompt (optionally with a replacement demonstration)."""
        messages = teacher_messages(example, self.teacher_template, self.system_prompt, demonstration=demonstration)
        return self.encode(messages)

    def _demonstration_prefixes(self, demo: str) -> tuple[int, Callable[[int], str]]:
        """Token count of ``demo`` and a function: k -> text of its first k tokens."""
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        enc = self.tokenizer(demo, add_special_tokens=False, return_offsets_mapping=fast)
        ids, offsets = enc["input_ids"], enc.get("offset_mapping") if fast else None
        if offsets is None:
            return len(ids), lambda k: self.tokenizer.decode(ids[:k], skip_special_tokens=False)
        ends = [0]  # character end of each token prefix: cuts the original text, no decode artefacts
        for _, end in offsets:
            ends.append(max(ends[-1], end))
        return len(ids), lambda k: demo[: ends[k]]

    def _truncate(self, example: Example) -> tuple[int, ...]:
        """Teacher ids with the longest demonstration token prefix that fits (binary search)."""
        assert example.demonstration is not None
        limit = self.max_teacher_prompt_tokens
        best = self.teacher_ids(example, "")
        if len(best) > limit:
            file, row = _where(example)
            raise DataError(
                file,
                f"teacher prompt is {len(best)} tokens even with an empty demonstration, over "
                f"max_teacher_prompt_tokens={limit}; the query is never truncated",
                row=row,
                field="prompt",
            )
        n_tokens, prefix = self._demonstration_prefixes(example.demonstration)
        lo, hi = 0, n_tokens  # invariant: prefix(lo) fits, prefix(hi) (the full text) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ids = self.teacher_ids(example, prefix(mid))
            if len(ids) <= limit:
                lo, best = mid, ids
            else:
                hi = mid
        return best

    def fitted_teacher_ids(self, example: Example) -> tuple[int, ...]:
        """Teacher ids of one example within ``max_teacher_prompt_tokens``: too long is an error
        under ``overflow='error'``, otherwise the demonstration is cut (for contexts made during the
        run, e.g. SDPO's feedback, where an example can no longer be dropped)."""
        ids = self.teacher_ids(example)
        if len(ids) <= self.max_teacher_prompt_tokens:
            return ids
        if self.overflow == "error":
            file, row = _where(example)
            raise DataError(file, f"teacher prompt is {len(ids)} tokens, over max_teacher_prompt_tokens="
                                  f"{self.max_teacher_prompt_tokens} (prompts.overflow='error'; use "
                                  "'truncate_demonstration')", row=row, field="demonstration")
        return self._truncate(example)

    def with_contrast_prompts(self, tokenized: Sequence[TokenizedExample], examples: Sequence[Example]
                              ) -> list[TokenizedExample]:
        """Give every kept example a contrast prompt: its query with the demonstration of the next
        kept example (cyclic) whose demonstration differs - a fixed derangement, so the template's
        framing is the same on both sides and only the demonstration's content differs."""
        by_index = {ex.index: ex for ex in examples}
        kept = [by_index[t.index] for t in tokenized]
        out = []
        for i, (tok, ex) in enumerate(zip(tokenized, kept)):
            other = next((kept[(i + j) % len(kept)] for j in range(1, len(kept))
                          if kept[(i + j) % len(kept)].demonstration != ex.demonstration), None)
            if other is None:
                raise DataError(ex.source.rpartition(":")[0] or ex.source, "a contrast prompt needs at least two "
                                "different demonstrations in the data", field="demonstration")
            contrast = self.fitted_teacher_ids(dataclasses.replace(ex, demonstration=other.demonstration))
            out.append(dataclasses.replace(tok, contrast_prompt_ids=contrast))
        return out

    def build(self, examples: Iterable[Example]) -> tuple[list[TokenizedExample], dict[str, int]]:
        """Tokenize ``examples``; returns the kept ones and ``{"kept", "dropped", "truncated"}`` counts."""
        out: list[TokenizedExample] = []
        stats = {"kept": 0, "dropped": 0, "truncated": 0}
        for ex in examples:
            file, row = _where(ex)
            prompt_ids = self.student_ids(ex)
            if len(prompt_ids) > self.max_prompt_tokens:
                if self.overflow == "drop":
                    stats["dropped"] += 1
                    continue
                detail = f"student prompt is {len(prompt_ids)} tokens, over max_prompt_tokens={self.max_prompt_tokens}"
                raise DataError(file, detail, row=row, field="prompt")
            teacher_ids = self.teacher_ids(ex)
            truncated = False
            if len(teacher_ids) > self.max_teacher_prompt_tokens:
                if self.overflow == "drop":
                    stats["dropped"] += 1
                    continue
                if self.overflow == "error":
                    raise DataError(
                        file,
                        f"teacher prompt is {len(teacher_ids)} tokens, over max_teacher_prompt_tokens="
                        f"{self.max_teacher_prompt_tokens} (overflow='error'; use 'drop' or 'truncate_demonstration')",
                        row=row,
                        field="demonstration",
                    )
                teacher_ids = self._truncate(ex)
                truncated = True
                stats["truncated"] += 1
            out.append(TokenizedExample(ex.index, ex.source, prompt_ids, teacher_ids, truncated, dict(ex.extra)))
            stats["kept"] += 1
        return out, stats
