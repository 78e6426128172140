"""The continual-learning study (sdft_ray/study.py, scripts/run_study.py).

Fast tests: config validation, eval subsets, teacher prompts, stage training subsets, tables
and plots from synthetic results. The slow test runs ``scripts/run_study.py --quick`` end to end
(tiny random Llama, real Ray actors, SFT and SDFT, two curriculum stages).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdft_ray.errors import ConfigError
from sdft_ray.study import (RESULT_COLUMNS, load_study, plot_curriculum, plot_frontier, prepare_study,
                            select_per_kind, study_from_dict, write_summary)

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "configs" / "study" / "quick.yaml"
FULL = REPO / "configs" / "study" / "smollm2.yaml"


def _tree(**changes):
    import yaml

    tree = yaml.safe_load(QUICK.read_text(encoding="utf-8"))
    tree.update(changes)
    return tree


def test_shipped_study_files_validate():
    full = load_study(FULL)
    assert full.methods == ["sft", "sdft"] and full.lrs == [1e-5, 5e-5]
    assert [s.task for s in full.stages] == ["fictional_facts", "tool_calls"]
    cfg = full.run_config("sft", 5e-5, full.stages[0], "some/model", "train.jsonl", Path("runs/x"))
    assert cfg.algorithm.variant == "sft" and cfg.teacher.kind == "frozen" and cfg.learner.lr == 5e-5
    assert cfg.schedule.max_steps == full.stages[0].steps and cfg.model.path == "some/model"
    sdft = full.run_config("sdft", 1e-5, full.stages[1], "m", "d", Path("runs/y"))
    assert sdft.algorithm.variant == "sdft" and sdft.teacher.kind == "ema" and sdft.rollout.max_new_tokens == 64
    assert load_study(QUICK, ["lrs=[0.1, 0.2]"]).lrs == [0.1, 0.2]


@pytest.mark.parametrize("change, field", [
    ({"lrs": [0.0]}, "lrs"),
    ({"methods": []}, "methods"),
    ({"stages": [{"name": "a", "data": "d", "task": "t", "steps": 0}]}, "steps"),
    ({"stages": [{"name": "a", "data": "d", "task": "t", "steps": 1, "epochs": 2}]}, "epochs"),
    ({"colour": "red"}, "colour"),
    ({"train": {"learner": {"lrr": 1}}}, "learner.lrr"),
    ({"teacher": [{"task": "tool_calls"}]}, "teacher"),
])
def test_bad_study_names_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        study_from_dict(_tree(**change), "quick.yaml")
    assert field in str(err.value)


def test_select_per_kind_keeps_file_order():
    rows = [{"k": k, "i": i} for i, k in enumerate("aabbbab")]
    assert [r["i"] for r in select_per_kind(rows, "k", 2)] == [0, 1, 2, 3]
    assert len(select_per_kind(rows, None, 3)) == 3
    assert len(select_per_kind(rows, "k", None)) == len(rows)


def test_prepare_matches_demonstrations_and_training_rows(tmp_path):
    spec = study_from_dict(_tree(model="unused", eval_limit_per_kind=5), "quick")
    prepared = prepare_study(spec, tmp_path)
    evals = {t.name: t for t in prepared.tasks}
    facts = [json.loads(x) for x in Path(evals["fictional_facts"].path).read_text().splitlines()]
    assert len(facts) == 15 and {r["kind"] for r in facts} == {"strict", "paraphrase", "ood"}
    assert evals["fictional_facts"].max_new_tokens == 4
    # stage 1 trains on exactly the facts whose questions are evaluated
    train = [json.loads(x) for x in Path(prepared.stage_data["facts"]).read_text().splitlines()]
    assert {(r["entity"], r["fact"]) for r in train} == {(r["entity"], r["fact"]) for r in facts}
    assert prepared.stage_data["tools"].endswith("data/tool_calls/train.jsonl")
    # teacher prompts: the query, then the matching training demonstration, through the template
    teacher = {t.name: t for t in prepared.teacher_tasks}
    rows = [json.loads(x) for x in Path(teacher["fictional_facts"].path).read_text().splitlines()]
    demos = {(r["entity"], r["fact"]): r["demonstration"]
             for r in map(json.loads, (REPO / "data/fictional_facts/train.jsonl").read_text().splitlines())}
    assert len(rows) == 15 and prepared.teacher_missing["fictional_facts"] == 0
    for row, plain in zip(rows, facts):
        demo = demos[(row["entity"], row["fact"])]
        assert row["prompt"].startswith("\n" + plain["prompt"] + "\n\nThis is an example for a response to the question:\n")
        assert demo in row["prompt"] and row["answer"] == plain["answer"]
    tools = [json.loads(x) for x in Path(teacher["tool_calls"].path).read_text().splitlines()]
    assert all(json.dumps(r["reference"]) in r["prompt"] for r in tools)


def _synthetic_results(spec):
    rows = []
    for method in spec.methods:
        for lr in spec.lrs:
            for stage in range(len(spec.stages) + 1):
                for task in ("fictional_facts", "tool_calls", "prior"):
                    score = 0.1 * stage + (0.2 if method == "sdft" else 0.0) + lr
                    rows.append({"method": method, "lr": lr, "stage": stage,
                                 "stage_name": "base" if stage == 0 else spec.stages[stage - 1].name,
                                 "trained_on": "", "task": task, "kind": "all", "metric": "m", "n": 3,
                                 "score": min(score, 1.0)})
    return rows


def test_plots_and_summary_from_results(tmp_path):
    spec = study_from_dict(_tree(model="unused", lrs=[0.01, 0.05]), "quick")
    results = _synthetic_results(spec)
    teacher = [{"model": "base", "role": "student (query only)", "task": "fictional_facts", "kind": "all",
                "n": 3, "score": 0.0},
               {"model": "base", "role": "teacher (query + demonstration)", "task": "fictional_facts",
                "kind": "all", "n": 3, "score": 0.66}]
    for path in (plot_frontier(results, spec, tmp_path / "f.png"),
                 plot_curriculum(results, spec, tmp_path / "c.png", teacher)):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    text = write_summary(results, teacher, {"runs": [], "evals": []}, spec, tmp_path / "s.md").read_text()
    assert "| sdft | 0.05 | 2: tools |" in text and "66.0" in text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_study_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "run_study.py"), "--quick", "--out", str(out),
                           "--work", str(work)], cwd=REPO, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    spec = load_study(work / "study.yaml")
    with open(out / "results.csv", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[:len(RESULT_COLUMNS)] == list(RESULT_COLUMNS)
    jsonl = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(jsonl) == len(table)
    have = {(r["method"], float(r["lr"]), int(r["stage"]), r["task"]) for r in table if r["kind"] == "all"}
    for method in spec.methods:
        for lr in spec.lrs:
            for stage in range(len(spec.stages) + 1):
                for task in ("fictional_facts", "tool_calls", "prior"):
                    assert (method, lr, stage, task) in have, (method, lr, stage, task)
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in table)
    teacher = list(csv.DictReader(open(out / "teacher.csv", encoding="utf-8")))
    roles = {(r["task"], r["role"]) for r in teacher}
    assert ("fictional_facts", "teacher (query + demonstration)") in roles
    assert ("tool_calls", "teacher (query + demonstration)") in roles
    for name in ("frontier.png", "curriculum.png"):
        assert (out / name).stat().st_size > 0
    training = [json.loads(x) for x in (out / "training.jsonl").read_text().splitlines()]
    assert {(r["method"], r["lr"], r["stage"]) for r in training} == {
        (m, lr, k) for m in spec.methods for lr in spec.lrs for k in range(1, len(spec.stages) + 1)}
    runtimes = json.loads((out / "runtimes.json").read_text())
    assert len(runtimes["runs"]) == len(spec.methods) * len(spec.lrs) * len(spec.stages)
    # a rerun with the same work folder reuses every finished stage (no training)
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "run_study.py"), "--quick", "--out", str(out),
                            "--work", str(work)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert ": training " not in again.stdout and again.stdout.count("reusing") == len(runtimes["runs"])
