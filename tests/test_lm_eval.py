"""lm-evaluation-harness task YAMLs rendered over local data (sdft_ray.evaluation.lm_eval)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdft_ray.cli import main
from sdft_ray.errors import ConfigError, DataError
from sdft_ray.evaluation import EvalTask, load_tasks
from sdft_ray.evaluation.lm_eval import convert_lm_eval_task, load_lm_eval_yaml
from sdft_ray.evaluation.tasks import write_task_yaml

REPO = Path(__file__).resolve().parents[1]
GSM8K_STYLE = REPO / "configs/eval/lm_eval/arithmetic_gsm8k_style.yaml"
DATA = REPO / "data/lm_eval_example/test.jsonl"


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_include_is_merged_under_the_task(tmp_path):
    spec = load_lm_eval_yaml(GSM8K_STYLE)
    assert spec["task"] == "arithmetic_gsm8k_style"
    assert spec["doc_to_text"] == "Question: {{question}}\nAnswer:"  # from the base
    assert spec["generation_kwargs"]["max_gen_toks"] == 64  # the including file wins
    assert "include" not in spec


def test_gsm8k_style_task_renders_prompts_references_and_one_task_per_filter(tmp_path):
    tasks = convert_lm_eval_task(GSM8K_STYLE, DATA, tmp_path)
    assert [t.name for t in tasks] == ["arithmetic_gsm8k_style/strict-match", "arithmetic_gsm8k_style/flexible-extract"]
    strict, flexible = tasks
    assert strict.metric == flexible.metric == "regex"
    assert strict.metric_options == {"pattern": r"#### (\-?[0-9\.\,]+)", "which": "first"}
    assert flexible.metric_options["which"] == "last"
    assert strict.max_new_tokens == 64 and strict.stop == ("Question:", "</s>", "<|im_end|>")
    rows = _rows(strict.path)
    assert len(rows) == 12
    assert rows[0] == {"prompt": "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:",
                       "answer": "7"}  # regexes_to_ignore strip the worked solution from the reference
    assert rows[8]["answer"] == "1500" and rows[9]["answer"] == "-6"
    # the written task file loads back to the same tasks
    assert load_tasks(Path(strict.path).with_suffix(".yaml")) == tasks


def test_converted_scorers_on_right_wrong_and_malformed_answers(tmp_path):
    strict, flexible = convert_lm_eval_task(GSM8K_STYLE, DATA, tmp_path)
    ref = _rows(strict.path)[8]["answer"]  # "1500"
    right = "1200 + 300 = 1500 cups.\n#### 1,500"
    assert strict.scorer()(strict.cut(right), ref) == 1.0
    assert flexible.scorer()(flexible.cut(right), ref) == 1.0
    wrong = "1200 + 300 = 1400.\n#### 1400"
    assert strict.scorer()(strict.cut(wrong), ref) == 0.0 and flexible.scorer()(wrong, ref) == 0.0
    malformed = "The total is 1500"  # no "#### N": strict fails, flexible takes the last number
    assert strict.scorer()(malformed, ref) == 0.0 and flexible.scorer()(malformed, ref) == 1.0
    # text after a stop string is not scored
    runaway = "#### 1500\nQuestion: what is 2 + 2?\nAnswer: #### 4"
    assert flexible.scorer()(flexible.cut(runaway), ref) == 1.0
    assert flexible.scorer()(runaway, ref) == 0.0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_multiple_choice_lists_lettered_choices(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"q": "Which is a planet?", "options": ["Moon", "Mars", "Sun"], "label": 1}) + "\n"
                    + json.dumps({"q": "2 + 2?", "options": ["3", "4", "5", "22"], "label": "22"}) + "\n")
    yaml_file = _write(tmp_path / "mc.yaml", "task: mc\noutput_type: multiple_choice\n"
                       "doc_to_text: '{{q}}'\ndoc_to_choice: options\ndoc_to_target: label\n"
                       "metric_list: [{metric: acc}]\n")
    (task,) = convert_lm_eval_task(yaml_file, data, tmp_path / "out")
    rows = _rows(task.path)
    assert rows[0] == {"prompt": "Which is a planet?\nA. Moon\nB. Mars\nC. Sun\n"
                                 "Answer with the letter of the correct choice.", "answer": "B"}
    assert rows[1]["answer"] == "D"  # a target given as the choice's text
    assert task.metric == "multiple_choice" and task.metric_options == {"choices": "ABCD"}
    assert task.scorer()("B. Mars", "B") == 1.0 and task.scorer()("A", "B") == 0.0
    assert task.scorer()("I am not sure", "B") == 0.0


def test_template_choices_and_fewshot(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"a": a, "b": b, "y": str(a + b)}) + "\n" for a, b in [(1, 2), (3, 4), (5, 6)]))
    yaml_file = _write(tmp_path / "t.yaml", "task: add\ndoc_to_text: 'Q: {{a}}+{{b}}='\ndoc_to_target: '{{y}}'\n"
                       "description: \"Add.\\n\"\nnum_fewshot: 2\nfewshot_delimiter: ' | '\n")
    (task,) = convert_lm_eval_task(yaml_file, data, tmp_path / "out", fewshot_data=data, limit=1)
    assert task.metric == "exact_match" and task.name == "add"
    assert _rows(task.path) == [{"prompt": "Add.\nQ: 1+2= 3 | Q: 3+4= 7 | Q: 1+2=", "answer": "3"}]
    with pytest.raises(ConfigError, match="num_fewshot: 2 few-shot examples need fewshot_data"):
        convert_lm_eval_task(yaml_file, data, tmp_path / "out")


@pytest.mark.parametrize(("text", "match"), [
    ("task: x\ndoc_to_text: !function utils.doc_to_text\ndoc_to_target: y\n",
     r"doc_to_text: '!function utils.doc_to_text' is a Python hook"),
    ("task: x\noutput_type: loglikelihood\ndoc_to_text: q\ndoc_to_target: y\n", "output_type: 'loglikelihood' is not supported"),
    ("task: x\ndoc_to_text: q\ndoc_to_target: y\nprocess_docs: !function utils.process\n", "process_docs: not supported"),
    ("task: x\ndoc_to_text: q\ndoc_to_target: y\nmetric_list: [{metric: bleu}]\n", "no supported metric"),
    ("task: x\ndoc_to_text: q\ndoc_to_target: y\nfilter_list: [{name: f, filter: [{function: majority_vote}]}]\n",
     r"filter_list\[0\].filter: filter function 'majority_vote' is not supported"),
    ("task: x\ndoc_to_text: '{{ q '\ndoc_to_target: y\n", "doc_to_text: invalid Jinja template"),
    ("task: x\ndoc_to_target: y\n", "doc_to_text: missing"),
])
def test_unsupported_or_bad_yaml_names_the_key(tmp_path, text, match):
    data = _write(tmp_path / "d.jsonl", json.dumps({"q": "hi", "y": "1"}) + "\n")
    with pytest.raises(ConfigError, match=match) as info:
        convert_lm_eval_task(_write(tmp_path / "t.yaml", text), data, tmp_path / "out")
    assert str(tmp_path / "t.yaml") in str(info.value)


def test_row_missing_a_template_column_names_file_and_line(tmp_path):
    data = _write(tmp_path / "d.jsonl", json.dumps({"q": "a", "y": "1"}) + "\n\n" + json.dumps({"y": "2"}) + "\n")
    yaml_file = _write(tmp_path / "t.yaml", "task: x\ndoc_to_text: 'Q: {{q}}'\ndoc_to_target: '{{y}}'\n")
    with pytest.raises(DataError, match=r"d.jsonl line 3 \(row 1\): template needs a column the row lacks: 'q'"):
        convert_lm_eval_task(yaml_file, data, tmp_path / "out")


def test_task_yaml_round_trip_keeps_every_field(tmp_path):
    tasks = [EvalTask(name="a", path="x.jsonl"),
             EvalTask(name="b", path="y.jsonl", metric="regex", metric_options={"pattern": "last_number"},
                      num_samples=4, k=(1, 4), stop=("\n\n",), kind_column="kind", system_prompt="Be brief.")]
    assert load_tasks(write_task_yaml(tasks, tmp_path / "tasks.yaml")) == tasks


def test_cli_converts_and_evaluates(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "lm"
    assert main(["lm-eval-task", str(GSM8K_STYLE), "--data", str(DATA), "--out", str(out), "--limit", "3"]) == 0
    assert "2 task(s)" in capsys.readouterr().out
    results = tmp_path / "results"
    assert main(["eval", str(tiny_model_dir), str(out / "arithmetic_gsm8k_style.yaml"), "--out", str(results),
                 "--name", "tiny", "--batch-size", "3"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["task"], r["n"]) for r in printed} == {("arithmetic_gsm8k_style/strict-match", 3),
                                                      ("arithmetic_gsm8k_style/flexible-extract", 3)}
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in rows] == ["tiny", "tiny"]
    samples = (results / "samples" / "tiny.jsonl").read_text().splitlines()
    assert len(samples) == 6
    # a bad task file is a clean error, exit code 2
    assert main(["eval", str(tiny_model_dir), str(tmp_path / "missing.yaml"), "--out", str(results)]) == 2
