"""Pure scoring functions for evaluation, and the unbiased pass@k estimator.

Every metric has the signature ``score(response, reference, **options) -> float`` with a
result in ``[0, 1]``; a response the metric cannot parse scores 0, never raises. Text
metrics accept a list of acceptable references (aliases) and return the best score.
:func:`get_metric` looks a metric up by name in :data:`METRICS` and binds its options.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "METRICS",
    "REGEX_PRESETS",
    "Scorer",
    "contains",
    "exact_match",
    "extract_choice",
    "extract_tool_call",
    "get_metric",
    "multiple_choice",
    "normalize_text",
    "pass_at_k",
    "regex",
    "tool_call",
]

Scorer = Callable[[str, Any], float]

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_PUNCT = re.compile(  # keeps decimal points and a minus sign that starts a number
    r"(?:(?<!\d)\.|\.(?!\d)|-(?!\d)|(?<=\w)-|[" + re.escape(string.punctuation.replace(".", "").replace("-", ""))
    + r"“”‘’«»–—…])")


def normalize_text(text: str) -> str:
    """Lower-case, strip accents, punctuation (keeping decimal points and minus signs, dropping
    thousands separators), the articles a/an/the, and collapse whitespace: ``"The  Eiffel-Tower!"`` ->
    ``"eiffel tower"``, ``"1,000.5"`` -> ``"1000.5"``."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = _PUNCT.sub(" ", _THOUSANDS.sub("", text))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _aliases(reference: Any) -> list[str]:
    if isinstance(reference, str):
        return [reference]
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return [str(reference)]
    if isinstance(reference, Sequence) and reference and all(isinstance(r, (str, int, float)) for r in reference):
        return [str(r) for r in reference]
    raise TypeError(f"reference must be a string, a number or a non-empty list of them, got {reference!r}")


def _as_number(text: str) -> float | None:
    return float(text) if _NUMBER.fullmatch(text) else None


def _same(a: str, b: str) -> bool:
    """Normalised equality; numbers compare by value (``"3.50"`` equals ``"3.5"``)."""
    na, nb = normalize_text(a), normalize_text(b)
    if na == nb:
        return True
    xa, xb = _as_number(na), _as_number(nb)
    return xa is not None and xb is not None and math.isclose(xa, xb, rel_tol=0, abs_tol=1e-9)


def exact_match(response: str, reference: Any) -> float:
    """1.0 when the normalised response equals the (any) normalised reference."""
    return float(any(_same(response, ref) for ref in _aliases(reference)))


def contains(response: str, reference: Any) -> float:
    """Lenient match: 1.0 when a normalised reference occurs in the normalised response as whole
    words (``"4"`` is found in ``"2 + 2 = 4."`` but not in ``"14"``); a numeric reference also
    matches a number of the same value (``"100"`` in ``"100.0 degrees"``)."""
    words = normalize_text(response).split()
    haystack = f" {' '.join(words)} "
    numbers = {x for x in map(_as_number, words) if x is not None}
    for needle in map(normalize_text, _aliases(reference)):
        value = _as_number(needle)
        if (needle and f" {needle} " in haystack) or (value is not None and value in numbers):
            return 1.0
    return 0.0


REGEX_PRESETS: dict[str, str] = {
    "answer": r"\b(?i:answer)\b\s*(?i:is)?\s*[:=]?\s*(.+?)\s*(?:$|\n)",  # "Answer: X" / "the answer is X"
    "last_number": r"-?\d[\d,]*(?:\.\d+)?",  # the last number in the response
    "boxed": r"\\boxed\{([^{}]*)\}",  # LaTeX \boxed{X}
}


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(REGEX_PRESETS.get(pattern, pattern))


def regex(response: str, reference: Any, *, pattern: str = "answer", which: str = "last") -> float:
    """Extract the answer with ``pattern`` (a regex or a :data:`REGEX_PRESETS` name; the first
    group that matched if it has groups, else the whole match; the ``which`` = ``"last"``/``"first"`` match), then
    :func:`exact_match` it against the reference. No match scores 0."""
    if which not in ("first", "last"):
        raise ValueError(f"regex: which must be 'first' or 'last', got {which!r}")
    matches = list(_compile(pattern).finditer(response))
    if not matches:
        return 0.0
    match = matches[-1] if which == "last" else matches[0]
    # the first group that took part in the match (alternatives: "(a)|(b)"), else the whole match
    extracted = next((g for g in match.groups() if g is not None), "") if match.re.groups else match.group(0)
    return exact_match(extracted or "", reference)


def extract_choice(response: str, choices: str = "ABCDE") -> str | None:
    """The letter chosen in ``response``, or None when there is none or it is ambiguous.

    In order: the last explicit statement ("Answer: B", "the answer is (B)", "option B"),
    a letter opening the response ("(B) ...", "B.", "B)", "b)", "B:" or just "B"), else the only
    distinct parenthesised letter "(B)". Letters outside parentheses must be upper-case so
    that the article "a" is never read as a choice.
    """
    letters = re.escape(choices.upper())
    low = re.escape(choices.lower())
    stated = re.findall(
        rf"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*(?i:option\s*)?(?:\(([{letters}{low}])\)|([{letters}])\b)",
        response)
    if stated:
        return "".join(stated[-1]).upper()
    opening = re.match(rf"\s*(?:\(([{letters}{low}])\)|([{letters}])(?:[.):]|\s*$)|([{low}])\))", response)
    if opening:
        return "".join(opening.groups("")).upper()
    bracketed = {m.upper() for m in re.findall(rf"\(([{letters}{low}])\)", response)}
    return bracketed.pop() if len(bracketed) == 1 else None


def multiple_choice(response: str, reference: Any, *, choices: str = "ABCDE") -> float:
    """1.0 when the letter :func:`extract_choice` finds equals the reference letter (a letter,
    or an int index: 0 -> "A"); unparseable or ambiguous answers score 0."""
    if isinstance(reference, int) and not isinstance(reference, bool):
        if not 0 <= reference < len(choices):
            raise ValueError(f"multiple_choice: reference index {reference} is outside choices {choices!r}")
        reference = choices[reference]
    if not isinstance(reference, str) or reference.strip().upper() not in choices.upper():
        raise ValueError(f"multiple_choice: reference must be one of {choices!r} or an index, got {reference!r}")
    return float(extract_choice(response, choices) == reference.strip().upper())


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def _as_call(obj: Any) -> dict[str, Any] | None:
    """``{"name": str, "arguments": dict}`` from a parsed object (``arguments`` may also be a JSON
    string, or be called ``parameters``; an OpenAI ``{"function": {...}}`` wrapper is unwrapped)."""
    if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values that, unlike ``==``, tells ``true`` from ``1`` (``2`` equals ``2.0``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def extract_tool_call(text: str) -> dict[str, Any] | None:
    """The first JSON function call in ``text`` (inside ```json fences or with prose around it),
    as ``{"name", "arguments"}``; None when there is no well-formed one."""
    decoder = json.JSONDecoder()
    for chunk in [*_FENCE.findall(text), text]:
        for start in (i for i, ch in enumerate(chunk) if ch == "{"):
            try:
                obj, _ = decoder.raw_decode(chunk, start)
            except (ValueError, RecursionError):
                continue
            call = _as_call(obj)
            if call is not None:
                return call
    return None


def tool_call(response: str, reference: Any, *, partial: float = 0.5) -> float:
    """1.0 when the response's JSON call has the reference's ``name`` and exactly its
    ``arguments``; ``partial`` when only the name matches; 0 for another function or no
    well-formed call. ``reference`` is a ``{"name", "arguments"}`` dict or its JSON text."""
    if not 0.0 <= partial <= 1.0:
        raise ValueError(f"tool_call: partial must be in [0, 1], got {partial!r}")
    ref = _as_call(json.loads(reference) if isinstance(reference, str) else reference)
    if ref is None:
        raise ValueError(f"tool_call: reference must be a {{'name', 'arguments'}} object, got {reference!r}")
    call = extract_tool_call(response)
    if call is None or call["name"] != ref["name"]:
        return 0.0
    return 1.0 if _json_equal(call["arguments"], ref["arguments"]) else float(partial)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): the chance that at least one of ``k`` samples drawn
    without replacement from ``n`` samples, ``c`` of them correct, is correct."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k: {name} must be an int, got {value!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1)))


METRICS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "regex": regex,
    "multiple_choice": multiple_choice,
    "tool_call": tool_call,
}


def metric_options(name: str) -> dict[str, Any]:
    """The options of metric ``name`` and their defaults."""
    params = inspect.signature(METRICS[name]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_options(name: str, options: Mapping[str, Any]) -> None:
    """Reject option values the metric would only fail on at scoring time."""
    if name == "regex":
        pattern, which = options.get("pattern", "answer"), options.get("which", "last")
        if not isinstance(pattern, str):
            raise ValueError(f"metric 'regex': pattern must be a string, got {pattern!r}")
        try:
            _compile(pattern)
        except re.error as e:
            raise ValueError(f"metric 'regex': invalid pattern {pattern!r}: {e}") from None
        if which not in ("first", "last"):
            raise ValueError(f"metric 'regex': which must be 'first' or 'last', got {which!r}")
    if name == "multiple_choice":
        choices = options.get("choices", "ABCDE")
        if not isinstance(choices, str) or not re.fullmatch(r"[A-Z]+", choices):
            raise ValueError(f"metric 'multiple_choice': choices must be upper-case letters, got {choices!r}")
    if name == "tool_call":
        partial = options.get("partial", 0.5)
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 <= partial <= 1:
            raise ValueError(f"metric 'tool_call': partial must be a number in [0, 1], got {partial!r}")


def get_metric(name: str, options: Mapping[str, Any] | None = None) -> Scorer:
    """``score(response, reference)`` for metric ``name`` with ``options`` bound; raises
    ValueError for an unknown metric or option, or an invalid option value."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    options = dict(options or {})
    allowed = metric_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"metric {name!r} has no option(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
    _check_options(name, options)
    return functools.partial(METRICS[name], **options) if options else METRICS[name]
