"""Checkpoint evaluation: engine parity with ``model.generate``, result files, pass@k."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdft_ray.data import load_examples
from sdft_ray.engines import Generation, SamplingSpec, make_engine
from sdft_ray.evaluation import EvalTask, evaluate_checkpoint, pass_at_k, write_results
from sdft_ray.evaluation.runner import RESULT_COLUMNS, evaluate_with_actors
from sdft_ray.models import load_tokenizer, stop_token_ids
from sdft_ray.prompts import PromptBuilder

PROMPTS = [
    ("What is the capital of Zorbia?", "Quelmarsh", "strict"),
    ("Who founded Velandor? Please explain why.", "Tirrik", "paraphrase"),
    ("Name the capital.", "Nimbrel", "strict"),
    ("In which year was the town founded, and by whom? Think step by step.", "1200", "ood"),
    ("Explain.", "two", "ood"),
]


@pytest.fixture(scope="module")
def tiny_task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "tiny.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "kind": k}) + "\n" for p, a, k in PROMPTS))
    return path


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return make_engine("hf", str(tiny_model_dir), "float32", batch_size=2)


def _prompt_ids(tokenizer, path: Path, system_prompt: str | None = None) -> list[tuple[int, ...]]:
    builder = PromptBuilder(tokenizer, system_prompt=system_prompt, max_prompt_tokens=4096,
                            max_teacher_prompt_tokens=4096)
    return [builder.student_ids(ex) for ex in load_examples(path, require_demonstration=False)]


def _reference_greedy(tiny_model_dir, prompts, max_new_tokens: int) -> list[list[int]]:
    """Plain ``transformers`` greedy decoding, one unpadded prompt at a time."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    stops = stop_token_ids(tokenizer, model.generation_config)
    out = []
    for ids in prompts:
        x = torch.tensor([list(ids)])
        with torch.no_grad():
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)
        new = seq[0, x.shape[1]:].tolist()
        end = next((t + 1 for t, tok in enumerate(new) if tok in stops), len(new))
        out.append(new[:end])
    return out


# ----------------------------------------------------------------------------- (a) engine parity


def test_greedy_engine_matches_model_generate(tiny_model_dir, tiny_task_file, hf_engine):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = _prompt_ids(tokenizer, tiny_task_file)
    expected = _reference_greedy(tiny_model_dir, prompts, max_new_tokens=12)
    assert any(len(e) > 1 for e in expected)
    spec = SamplingSpec(max_new_tokens=12, greedy=True)
    unbatched = make_engine("hf", str(tiny_model_dir), "float32", batch_size=1).generate(prompts, spec)
    assert [g.token_ids.tolist() for g in unbatched] == expected
    batched = hf_engine.generate(prompts, spec)  # left-padded batches of 2
    assert [g.token_ids.tolist() for g in batched] == expected

    # The full evaluation path decodes exactly those tokens (greedy is the default).
    samples: list[dict] = []
    task = EvalTask("tiny", str(tiny_task_file), max_new_tokens=12, kind_column="kind")
    evaluate_checkpoint(tiny_model_dir, task, engine=hf_engine, samples=samples)
    decoded = [tokenizer.decode(e, skip_special_tokens=True).strip() for e in expected]
    assert [s["response"] for s in samples] == decoded
    assert [s["reference"] for s in samples] == [a for _, a, _ in PROMPTS]


def test_evaluate_checkpoint_builds_engine_and_uses_system_prompt(tiny_model_dir, tiny_task_file, tmp_path):
    # A sdft-ray checkpoint directory (student/ inside) resolves to its student.
    ckpt = tmp_path / "step-00000002"
    shutil.copytree(tiny_model_dir, ckpt / "student")
    task = EvalTask("tiny", str(tiny_task_file), max_new_tokens=6, system_prompt="Answer briefly.")
    samples: list[dict] = []
    rows = evaluate_checkpoint(ckpt, [task], batch_size=4, samples=samples, limit=3)
    assert [r["n"] for r in rows] == [3] and rows[0]["kind"] == "all"
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = _prompt_ids(tokenizer, tiny_task_file, system_prompt="Answer briefly.")[:3]
    expected = _reference_greedy(tiny_model_dir, prompts, max_new_tokens=6)
    assert [s["response"] for s in samples] == [tokenizer.decode(e, skip_special_tokens=True).strip()
                                                for e in expected]


# ----------------------------------------------------------------------------- (b) result files


class ScriptedEngine:
    """An engine object whose sample ``s`` of prompt ``i`` is ``answers[i][s]``."""

    def __init__(self, tokenizer, answers: list[list[str]]):
        self.tokenizer = tokenizer
        self.answers = answers
        self.specs: list[SamplingSpec] = []
        eos = tokenizer.eos_token_id
        self._ids = [[tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in row] for row in answers]

    def generate(self, prompts, sampling: SamplingSpec) -> list[Generation]:
        self.specs.append(sampling)
        n = len(prompts) // len(self._ids)
        assert len(prompts) == n * len(self._ids)
        out = []
        for j in range(len(prompts)):
            ids = np.array(self._ids[j // n][j % n], dtype=np.int64)
            out.append(Generation(ids, np.zeros(len(ids), np.float32), True))
        return out

    def load_weights(self, named_tensors) -> int:
        return 0


def test_rows_and_result_files(tiny_model_dir, tiny_task_file, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    right = [["The capital is Quelmarsh."], ["Tirrik did."], ["London"], ["1200"], ["Two!"]]
    task = EvalTask("facts", str(tiny_task_file), metric="contains", kind_column="kind", max_new_tokens=8)
    samples: list[dict] = []
    rows = evaluate_checkpoint(None, [task], engine=ScriptedEngine(tokenizer, right), samples=samples)
    by_kind = {r["kind"]: r for r in rows}
    assert list(by_kind) == ["all", "ood", "paraphrase", "strict"]
    assert by_kind["all"]["n"] == 5 and by_kind["all"]["score"] == pytest.approx(0.8)
    assert by_kind["strict"]["score"] == 0.5 and by_kind["ood"]["score"] == 1.0
    assert [s["score"] for s in samples] == [1.0, 1.0, 0.0, 1.0, 1.0]

    wrong = [["no"]] * 5
    rows_b = evaluate_checkpoint(None, task, engine=ScriptedEngine(tokenizer, wrong))
    write_results(rows, tmp_path, "step-1", samples=samples)
    paths = write_results(rows_b, tmp_path, "step-2")
    with open(paths["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0])[:len(RESULT_COLUMNS)] == RESULT_COLUMNS
    assert "mean_response_tokens" in table[0]
    assert len(table) == 8  # 2 checkpoints x (all + 3 kinds)
    assert {(r["checkpoint"], r["kind"]) for r in table} >= {("step-1", "all"), ("step-2", "strict")}
    assert float(next(r for r in table if r["checkpoint"] == "step-2" and r["kind"] == "all")["score"]) == 0.0
    lines = [json.loads(x) for x in paths["jsonl"].read_text().splitlines()]
    assert [(r["checkpoint"], r["task"], r["kind"]) for r in lines] == [(r["checkpoint"], r["task"], r["kind"])
                                                                         for r in table]
    assert len((tmp_path / "samples" / "step-1.jsonl").read_text().splitlines()) == 5

    # Re-evaluating a checkpoint replaces its rows instead of duplicating them.
    write_results(rows_b, tmp_path, "step-1")
    with open(paths["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8 and all(float(r["score"]) == 0.0 for r in table if r["kind"] == "all")


def test_tool_call_task_on_bundled_data(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    task = EvalTask("tool_calls", "data/tool_calls/eval.jsonl", metric="tool_call", reference_column="reference",
                    kind_column="kind")
    rows_in = [json.loads(x) for x in Path(task.resolved_path()).read_text().splitlines()[:4]]
    answers = [[json.dumps(rows_in[0]["reference"])],  # right
               [f"```json\n{json.dumps(rows_in[1]['reference'])}\n```"],  # right, fenced
               [json.dumps({"name": rows_in[2]["reference"]["name"], "arguments": {}})],  # partial
               ['{"name": oops']]  # malformed
    rows = evaluate_checkpoint(None, task, engine=ScriptedEngine(tokenizer, answers), limit=4)
    assert rows[0]["kind"] == "all" and rows[0]["score"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)


# ----------------------------------------------------------------------------- (c) pass@k


def test_pass_at_k_with_scripted_samples(tiny_model_dir, tiny_task_file):
    tokenizer = load_tokenizer(tiny_model_dir)
    refs = [a for _, a, _ in PROMPTS]
    correct = [4, 0, 1, 2, 3]  # correct samples (of 4) per prompt
    answers = [[refs[i] if s < c else "wrong" for s in range(4)] for i, c in enumerate(correct)]
    engine = ScriptedEngine(tokenizer, answers)
    task = EvalTask("facts", str(tiny_task_file), num_samples=4, k=(1, 2, 4), kind_column="kind",
                    temperature=0.7, top_p=0.9)
    rows = evaluate_checkpoint(None, task, engine=engine, seed=3)
    spec = engine.specs[-1]
    assert not spec.greedy and spec.temperature == 0.7 and spec.top_p == 0.9 and spec.seed == 3
    overall = rows[0]
    assert overall["num_samples"] == 4 and overall["n"] == 5
    for k in (1, 2, 4):
        assert overall[f"pass@{k}"] == pytest.approx(np.mean([pass_at_k(4, c, k) for c in correct]))
    assert overall["pass@1"] == pytest.approx(overall["score"]) == pytest.approx(sum(correct) / 20)
    assert overall["pass@4"] == pytest.approx(4 / 5)
    strict = next(r for r in rows if r["kind"] == "strict")  # prompts 0 and 2
    assert strict["pass@2"] == pytest.approx((pass_at_k(4, 4, 2) + pass_at_k(4, 1, 2)) / 2)


def test_pass_at_k_sampling_with_tiny_model(tiny_model_dir, tiny_task_file, hf_engine):
    task = EvalTask("tiny", str(tiny_task_file), num_samples=3, max_new_tokens=6)
    first: list[dict] = []
    rows = evaluate_checkpoint(None, task, engine=hf_engine, seed=7, samples=first)
    again: list[dict] = []
    rows_again = evaluate_checkpoint(None, task, engine=hf_engine, seed=7, samples=again)
    assert rows == rows_again and [s["response"] for s in first] == [s["response"] for s in again]
    assert {"pass@1", "pass@3"} <= set(rows[0]) and 0.0 <= rows[0]["pass@1"] <= rows[0]["pass@3"] <= 1.0
    assert len(first) == 15 and [s["sample"] for s in first[:3]] == [0, 1, 2]
    # Sampled, not greedy: the samples of a prompt are not all the same.
    per_prompt = [{s["response"] for s in first if s["index"] == i} for i in range(5)]
    assert any(len(responses) > 1 for responses in per_prompt)


# ----------------------------------------------------------------------------- Ray rollout actors


@pytest.mark.slow
def test_evaluate_with_actors_matches_local_engine(ray_local, tiny_model_dir, tiny_task_file, hf_engine):
    task = EvalTask("tiny", str(tiny_task_file), max_new_tokens=8, kind_column="kind")
    local = evaluate_checkpoint(tiny_model_dir, task, engine=hf_engine)
    remote = evaluate_with_actors(tiny_model_dir, task, num_workers=2, batch_size=2, num_cpus=0.5)
    assert remote == local


def test_bad_references_fail_before_generation(tiny_model_dir, tmp_path):
    from sdft_ray.errors import DataError

    tokenizer = load_tokenizer(tiny_model_dir)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Call it.", "reference": {"name": "f", "arguments": {}}}) + "\n"
                    + json.dumps({"prompt": "Call it.", "reference": "not json"}) + "\n")
    engine = ScriptedEngine(tokenizer, [["x"], ["x"]])
    with pytest.raises(DataError, match="row 1, field 'reference': invalid reference for metric 'tool_call'"):
        evaluate_checkpoint(None, EvalTask("t", str(path), metric="tool_call", reference_column="reference"),
                            engine=engine)
    with pytest.raises(DataError, match="field 'answer': missing reference column"):
        evaluate_checkpoint(None, EvalTask("t", str(path)), engine=engine)
    assert engine.specs == []
