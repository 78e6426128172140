"""Evaluation metrics: each with a right, a wrong and a malformed answer; pass@k; task YAML."""

from __future__ import annotations

import math

import pytest

from sdft_ray.errors import ConfigError
from sdft_ray.evaluation.metrics import (
    METRICS,
    contains,
    exact_match,
    extract_choice,
    extract_tool_call,
    get_metric,
    multiple_choice,
    normalize_text,
    pass_at_k,
    regex,
    tool_call,
)
from sdft_ray.evaluation.tasks import EvalTask, load_tasks

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel-Tower!", "eiffel tower"),
    ("An apple, a pear.", "apple pear"),
    ("  Zürich\n", "zurich"),
    ("1,000.5 dollars.", "1000.5 dollars"),
    ("It is -3.5.", "it is -3.5"),
    ("twenty-four", "twenty four"),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


# ----------------------------------------------------------------------------- exact_match


def test_exact_match_right_wrong_malformed():
    assert exact_match("  The Paris. ", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0  # extra words: not exact
    assert exact_match("London", "Paris") == 0.0
    assert exact_match("", "Paris") == 0.0
    assert exact_match("}{!!", "Paris") == 0.0


def test_exact_match_aliases_and_numbers():
    assert exact_match("seven", ["7", "seven"]) == 1.0
    assert exact_match("3.50", "3.5") == 1.0
    assert exact_match("1,000", 1000) == 1.0
    assert exact_match("-5", "5") == 0.0
    with pytest.raises(TypeError):
        exact_match("x", None)


# ----------------------------------------------------------------------------- contains


def test_contains_right_wrong_malformed():
    assert contains("I believe the capital is PARIS, of course.", "Paris") == 1.0
    assert contains("The capital is London.", "Paris") == 0.0
    assert contains("<|im_end|>\x00 ###", "Paris") == 0.0
    assert contains("", "Paris") == 0.0


def test_contains_whole_words_and_numbers():
    assert contains("2 + 2 = 4.", "4") == 1.0
    assert contains("It is 14.", "4") == 0.0  # not a substring match
    assert contains("Parisian food", "Paris") == 0.0
    assert contains("approximately 100.0 degrees", "100") == 1.0
    assert contains("It is -18 degrees", "18") == 0.0
    assert contains("It was Leonardo da Vinci.", ["Leonardo", "da Vinci"]) == 1.0
    assert contains("The founder was Greror Brilek.", "greror brilek") == 1.0


# ----------------------------------------------------------------------------- regex


def test_regex_answer_preset_right_wrong_malformed():
    assert regex("Let me think. 6 * 7 = 42.\nAnswer: 42", "42") == 1.0
    assert regex("so the answer is Paris.", "paris") == 1.0
    assert regex("Answer: 41", "42") == 0.0
    assert regex("42", "42") == 0.0  # no "Answer:" to extract from
    assert regex("I answered nothing", "nothing") == 0.0  # "answer" must be a whole word


def test_regex_last_number_and_custom_pattern():
    assert regex("3 apples and 1,000 pears", "1000", pattern="last_number") == 1.0
    assert regex("3 apples and 1,000 pears", "3", pattern="last_number") == 0.0
    assert regex("3 apples and 1,000 pears", "3", pattern="last_number", which="first") == 1.0
    assert regex("no digits here", "3", pattern="last_number") == 0.0
    assert regex(r"so \boxed{12}", "12", pattern="boxed") == 1.0
    assert regex("<ans>Oslo</ans>", "oslo", pattern=r"<ans>(.*?)</ans>") == 1.0
    with pytest.raises(ValueError, match="which"):
        regex("x", "x", which="middle")


# ----------------------------------------------------------------------------- multiple_choice


@pytest.mark.parametrize("response", [
    "(B)", "B", "B.", "B) Paris", "b) paris", "Answer: B", "The answer is B.", "the answer is (b)",
    "I think the correct answer is: B because...", "Option B", "After some thought, (B) fits best.",
])
def test_multiple_choice_forms(response):
    assert extract_choice(response) == "B"
    assert multiple_choice(response, "B") == 1.0


def test_multiple_choice_right_wrong_malformed():
    assert multiple_choice("The answer is C.", "C") == 1.0
    assert multiple_choice("The answer is C.", "B") == 0.0
    assert multiple_choice("A good question; I am not sure.", "A") == 0.0  # the article is no choice
    assert multiple_choice("(A), not (B).", "A") == 1.0  # opens with the letter
    assert multiple_choice("It could be (A) or (B).", "A") == 0.0  # ambiguous
    assert multiple_choice("a dog", "A") == 0.0
    assert multiple_choice("The answer is F", "B") == 0.0  # not a choice
    assert multiple_choice("", "B") == 0.0


def test_multiple_choice_reference_forms():
    assert multiple_choice("Answer: A", 0) == 1.0
    assert multiple_choice("Answer: D", "d") == 1.0
    assert multiple_choice("Answer: C", "C", choices="ABC") == 1.0
    assert multiple_choice("Answer: D", "A", choices="ABC") == 0.0
    with pytest.raises(ValueError):
        multiple_choice("A", "Z")
    with pytest.raises(ValueError):
        multiple_choice("A", 7)


# ----------------------------------------------------------------------------- tool_call

REF = {"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}


def test_tool_call_right():
    assert tool_call('{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}', REF) == 1.0
    fenced = 'Sure!\n```json\n{"name": "get_weather", "arguments": {"unit": "celsius", "city": "Lisbon"}}\n```\nDone.'
    assert tool_call(fenced, REF) == 1.0
    prose = 'I will call {"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}} now.'
    assert tool_call(prose, REF) == 1.0
    as_string = '{"name": "get_weather", "arguments": "{\\"city\\": \\"Lisbon\\", \\"unit\\": \\"celsius\\"}"}'
    assert tool_call(as_string, REF) == 1.0
    assert tool_call('{"name": "f", "arguments": {"x": 2.0}}', {"name": "f", "arguments": {"x": 2}}) == 1.0


def test_tool_call_wrong_and_partial():
    wrong_args = '{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "fahrenheit"}}'
    assert tool_call(wrong_args, REF) == 0.5
    assert tool_call(wrong_args, REF, partial=0.0) == 0.0
    missing_arg = '{"name": "get_weather", "arguments": {"city": "Lisbon"}}'
    assert tool_call(missing_arg, REF) == 0.5
    assert tool_call('{"name": "f", "arguments": {"x": true}}', {"name": "f", "arguments": {"x": 1}}) == 0.5
    other = '{"name": "book_table", "arguments": {"city": "Lisbon", "unit": "celsius"}}'
    assert tool_call(other, REF) == 0.0


def test_tool_call_malformed():
    assert tool_call('{"name": "get_weather", "arguments": {"city": "Lisbon"', REF) == 0.0  # truncated
    assert tool_call("get_weather(city='Lisbon', unit='celsius')", REF) == 0.0
    assert tool_call('{"arguments": {"city": "Lisbon"}}', REF) == 0.0  # no name
    assert tool_call('{"name": "get_weather", "arguments": [1, 2]}', REF) == 0.0
    assert tool_call("", REF) == 0.0
    assert extract_tool_call("{{{{") is None


def test_tool_call_reference_forms():
    text = '{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}'
    assert tool_call(text, text) == 1.0  # reference as JSON text
    with pytest.raises(ValueError):
        tool_call(text, {"arguments": {}})
    with pytest.raises(ValueError):
        tool_call(text, REF, partial=2)


# ----------------------------------------------------------------------------- pass@k


def _brute_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 5), (10, 8, 5),
                                     (20, 0, 10), (20, 20, 1), (200, 7, 100)])
def test_pass_at_k_matches_combinatorics(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_properties():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(10, 0, 10) == 0.0 and pass_at_k(10, 1, 10) == 1.0
    values = [pass_at_k(16, 4, k) for k in range(1, 17)]
    assert all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("n, c, k, error", [
    (0, 0, 1, ValueError), (5, 6, 1, ValueError), (5, -1, 1, ValueError), (5, 2, 0, ValueError),
    (5, 2, 6, ValueError), (5.0, 2, 1, TypeError), (5, True, 1, TypeError),
])
def test_pass_at_k_validation(n, c, k, error):
    with pytest.raises(error):
        pass_at_k(n, c, k)


# ----------------------------------------------------------------------------- registry


def test_registry_and_options():
    assert set(METRICS) == {"exact_match", "contains", "regex", "multiple_choice", "tool_call"}
    assert get_metric("contains")("Paris!", "paris") == 1.0
    score = get_metric("regex", {"pattern": "last_number"})
    assert score("it is 12", "12") == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        get_metric("bleu")
    with pytest.raises(ValueError, match="no option"):
        get_metric("contains", {"pattern": "x"})
    with pytest.raises(ValueError, match="invalid pattern"):
        get_metric("regex", {"pattern": "(unclosed"})
    with pytest.raises(ValueError, match="which"):
        get_metric("regex", {"which": "middle"})
    with pytest.raises(ValueError, match="choices"):
        get_metric("multiple_choice", {"choices": ""})
    with pytest.raises(ValueError, match="partial"):
        get_metric("tool_call", {"partial": -1})


def test_every_metric_scores_in_unit_interval():
    refs = {"exact_match": "x", "contains": "x", "regex": "x", "multiple_choice": "A",
            "tool_call": {"name": "f", "arguments": {}}}
    for name, ref in refs.items():
        for response in ["", "x", "Answer: A", '{"name": "f", "arguments": {}}', "\x00{[(", "é" * 500]:
            assert 0.0 <= get_metric(name)(response, ref) <= 1.0


# ----------------------------------------------------------------------------- tasks


def test_eval_task_defaults_and_validation():
    task = EvalTask("t", "data/prior/eval.jsonl", num_samples=4)
    assert task.k == (1, 4) and task.metric == "contains"
    assert EvalTask("t", "x.jsonl").k == ()
    assert EvalTask("t", "x.jsonl", num_samples=8, k=[4, 1, 4]).k == (1, 4)
    with pytest.raises(ConfigError, match="field 'k'") as err:
        EvalTask("t", "x.jsonl", num_samples=2, k=(5,))
    assert err.value.field == "k"
    with pytest.raises(ConfigError, match="field 'metric'"):
        EvalTask("t", "x.jsonl", metric="bleu")
    with pytest.raises(ConfigError, match="field 'metric_options'"):
        EvalTask("t", "x.jsonl", metric="tool_call", metric_options={"partial": 3})
    with pytest.raises(ConfigError, match="field 'max_new_tokens'"):
        EvalTask("t", "x.jsonl", max_new_tokens=0)
    with pytest.raises(ConfigError, match="field 'top_p'"):
        EvalTask("t", "x.jsonl", top_p=1.5)


def test_load_tasks_from_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "defaults: {max_new_tokens: 12}\n"
        "tasks:\n"
        "  - {name: one, path: data/prior/eval.jsonl}\n"
        "  - {name: two, path: data/tool_calls/eval.jsonl, metric: tool_call, reference_column: reference,\n"
        "     max_new_tokens: 30, num_samples: 4, k: [1, 2]}\n")
    (tmp_path / "b.yml").write_text("name: three\npath: x.jsonl\nmetric: regex\nmetric_options: {pattern: boxed}\n")
    tasks = load_tasks(tmp_path)
    assert [t.name for t in tasks] == ["one", "two", "three"]
    assert tasks[0].max_new_tokens == 12 and tasks[1].max_new_tokens == 30 and tasks[1].k == (1, 2)
    assert tasks[2].metric_options == {"pattern": "boxed"}
    assert tasks[0].resolved_path().is_file()


@pytest.mark.parametrize("body, match", [
    ("tasks:\n  - {name: a, path: x.jsonl, metrc: contains}\n", r"tasks\[0\]\.metrc: unknown field"),
    ("tasks:\n  - {name: a}\n", r"tasks\[0\]\.path: missing required field"),
    ("tasks:\n  - {name: a, path: x.jsonl, num_samples: 2, k: [3]}\n", r"tasks\[0\]\.k: pass@3 needs"),
    ("tasks:\n  - {name: a, path: x.jsonl}\n  - {name: b, path: x.jsonl, metric: nope}\n",
     r"tasks\[1\]\.metric: unknown metric 'nope'"),
    ("tasks:\n  - {name: a, path: x.jsonl}\n  - {name: a, path: y.jsonl}\n", "duplicate task name 'a'"),
    ("tasks: [1]\n", r"tasks\[0\]: expected a task mapping"),
    ("tasks:\n  - {name: a, path: x.jsonl}\nextra: 1\n", "unknown top-level key 'extra'"),
    ("tasks: [\n", "invalid YAML"),
    ("42\n", "expected a mapping"),
])
def test_load_tasks_errors_name_the_field(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as err:
        load_tasks(path)
    assert str(path) in str(err.value)


def test_bundled_eval_configs_load():
    tasks = {t.name: t for t in load_tasks("configs/eval")}
    assert {"fictional_facts", "tool_calls", "prior"} <= set(tasks)
    for task in tasks.values():
        assert task.resolved_path().is_file(), task.path
    with pytest.raises(ConfigError, match="not found"):
        load_tasks("configs/eval/nope.yaml")
