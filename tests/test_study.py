"""The science study (sdft_ray/study/, scripts/run_study.py).

Fast tests: the study files, validation errors, the selection of trained and control facts,
teacher prompts, the pre-registered rules (gate, template choice, best setting, verdict) on
hand-made tables, seed pooling and the progress estimate. The slow test runs
``scripts/run_study.py --quick`` end to end (tiny random Llama, real Ray actors, SFT and SDFT,
two seeds, both phases) and again to check that everything is reused.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sdft_ray.errors import ConfigError
from sdft_ray.study import load_study, study_from_dict
from sdft_ray.study.design import fact_demonstrations, pick_rows, reference_demonstrations, select_facts, teacher_rows
from sdft_ray.study.verdict import Setting, best_setting, check_gate, choose_template, decide

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "configs" / "study" / "quick.yaml"
FULL = REPO / "configs" / "study" / "smollm2.yaml"
FACTS = REPO / "data" / "fictional_facts" / "train.jsonl"


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def _tree(**changes):
    import yaml

    tree = yaml.safe_load(QUICK.read_text(encoding="utf-8"))
    tree["model"] = "unused"
    tree.update(changes)
    return tree


# ---- the study files -------------------------------------------------------------------------


def test_shipped_study_files_validate():
    full = load_study(FULL)
    assert len(full.seeds) >= 2 and len(full.teacher_check.templates) >= 3
    gate = full.teacher_check.gate
    assert (gate.strict, gate.paraphrase, gate.finished) == (0.70, 0.50, 0.90)
    assert full.eval.max_new_tokens >= 96 and full.forgetting.max_new_tokens >= 96
    # issue 11's phase 1: controls, >= 8 samples per fact, SFT and SDFT at >= 2 lrs x >= 2 seeds, EMA 0.01,
    # a frozen-teacher arm and the framing remedy
    assert full.facts.n_train >= 12 and full.facts.n_control >= 12 and full.facts.epochs >= 8
    for name in ("sft", "sdft"):
        assert len(full.arm(name).lrs) >= 2 and len(full.arm_seeds(full.arm(name))) >= 2
    assert full.arm("sdft_frozen").overrides["teacher"]["kind"] == "frozen"
    assert full.arm("sdft_remedy").overrides["loss"]["position_weights"] == "demonstration_shift"
    template = full.teacher_check.templates["paper_no_thinking"]
    cfg = full.run_config(full.arm("sdft"), 5e-5, 1, model_path="m", data_path="d", out_dir="runs/x",
                          template=template, epochs=full.facts.epochs)
    assert cfg.algorithm.variant == "sdft" and cfg.teacher.kind == "ema" and cfg.teacher.ema_rate == 0.01
    assert cfg.schedule.seed == 1 and cfg.schedule.epochs == full.facts.epochs and cfg.schedule.max_steps is None
    assert cfg.prompts.teacher_template == template and cfg.learner.lr == 5e-5
    assert full.facts.epochs * cfg.rollout.num_samples >= 8
    frozen = full.run_config(full.arm("sdft_frozen"), 5e-5, 0, model_path="m", data_path="d", out_dir="o",
                             template=template, epochs=1, stage_overrides=full.curriculum.overrides)
    assert frozen.teacher.kind == "frozen" and frozen.rollout.max_new_tokens == 96
    assert full.variants == ["sft", "sdft"]
    quick = load_study(QUICK, ["seeds=[3]"])
    assert quick.seeds == [3]
    q = quick.run_config(quick.arms[0], 0.01, 3, model_path="m", data_path="d", out_dir="o", template="{prompt} {demonstration}",
                         epochs=1, stage_overrides=quick.curriculum.overrides)
    assert q.data.limit == 4 and q.teacher.kind == "frozen"


def test_a_study_file_extends_another(tmp_path):
    """``extends``: mappings merge key by key into the parent's, lists (arms) replace the parent's;
    a loop is an error naming the field. The shipped lever study keeps issue 11's runs as they were."""
    import yaml

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_tree()), encoding="utf-8")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    arms = [{"name": "only", "variant": "sdft", "lrs": [0.5]}]
    child.write_text(yaml.safe_dump({"extends": "../base.yaml", "eval": {"batch_size": 3}, "arms": arms}),
                     encoding="utf-8")
    spec = load_study(child)
    parent = load_study(base)
    assert [a.name for a in spec.arms] == ["only"] and spec.eval.batch_size == 3
    assert spec.eval.max_new_tokens == parent.eval.max_new_tokens and spec.facts == parent.facts
    base.write_text(yaml.safe_dump({**_tree(), "extends": "sub/child.yaml"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="loops back") as info:
        load_study(child)
    assert info.value.field == "extends"

    levers, study = load_study(REPO / "configs" / "study" / "levers.yaml"), load_study(FULL)
    assert levers.train == study.train and levers.facts == study.facts and levers.seeds == study.seeds
    for arm in study.arms:  # same names, lrs and seeds: the finished runs are reused
        assert set(arm.lrs) <= set(levers.arm(arm.name).lrs)
        assert levers.arm_seeds(levers.arm(arm.name)) == study.arm_seeds(arm)
        assert levers.arm(arm.name).overrides == arm.overrides
    assert len(levers.arm("sft").lrs) >= 3


@pytest.mark.parametrize("change, field", [
    ({"colour": "red"}, "colour"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"arms": [{"name": "a", "variant": "sft", "lrs": [0.0]}]}, "lrs"),
    ({"arms": [{"name": "a", "variant": "sft", "lrs": [1e-3]}, {"name": "a", "variant": "sdft", "lrs": [1e-3]}]},
     "unique"),
    ({"arms": [{"name": "a", "variant": "sft", "lrs": [1e-3], "overrides": {"learner": {"lrr": 1}}}]}, "learner.lrr"),
    ({"train": {"rollout": {"max_new_tokns": 3}}}, "max_new_tokns"),
    ({"teacher_check": {"templates": {"bad": "{prompt} only"}}}, "bad"),
    ({"teacher_check": {"templates": {"a": "{prompt} {demonstration}"}, "gate": {"strict": 1.5}}}, "strict"),
    ({"facts": {"epochs": 1, "min_samples_per_fact": 8}}, "min_samples_per_fact"),
    ({"seeds": [0, 1], "arms": [{"name": "a", "variant": "sft", "lrs": [1e-3], "seeds": [2]}]}, "arms[a].seeds"),
    ({"seeds": [0, 1], "arms": [{"name": "a", "variant": "sft", "lrs": [1e-3], "seeds": [1]}]}, "first one"),
])
def test_bad_study_names_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        study_from_dict(_tree(**change), "quick.yaml")
    assert field in str(err.value)


def test_an_arm_can_run_fewer_seeds():
    spec = study_from_dict(_tree(seeds=[0, 1, 2], arms=[
        {"name": "full", "variant": "sft", "lrs": [1e-3]},
        {"name": "ablation", "variant": "sft", "lrs": [1e-3, 2e-3], "seeds": [2, 0]}]), "quick.yaml")
    assert spec.arm_seeds(spec.arm("full")) == [0, 1, 2]
    assert spec.arm_seeds(spec.arm("ablation")) == [0, 2]  # the study's order


def test_an_arm_can_train_longer_and_is_held_to_the_samples_floor():
    """``arms[].epochs`` sets that arm's passes over the trained facts (its run's schedule.epochs);
    the others keep facts.epochs; the on-policy samples floor is checked with the arm's epochs."""
    tree = _tree(arms=[{"name": "short", "variant": "sdft", "lrs": [1e-3]},
                       {"name": "long", "variant": "sdft", "lrs": [1e-3], "epochs": 40}])
    spec = study_from_dict(tree, "quick.yaml")

    def epochs(name):
        arm = spec.arm(name)
        return spec.run_config(arm, 1e-3, 0, model_path="m", data_path=str(FACTS), out_dir="o", template="paper",
                               epochs=spec.arm_epochs(arm)).schedule.epochs

    assert epochs("short") == spec.facts.epochs and epochs("long") == 40.0
    floor = {**tree["facts"], "epochs": 1, "min_samples_per_fact": 4}
    with pytest.raises(ConfigError,
                       match=r"arms\[short\]: epochs \(the arm's, else facts.epochs\) x rollout.num_samples = 1"):
        study_from_dict({**tree, "facts": floor}, "quick.yaml")
    ok = {**tree, "facts": floor, "arms": [{"name": "long", "variant": "sdft", "lrs": [1e-3], "epochs": 4}]}
    assert study_from_dict(ok, "quick.yaml").arm_epochs(study_from_dict(ok, "quick.yaml").arms[0]) == 4


# ---- data design -----------------------------------------------------------------------------


def test_select_facts_trained_and_controls():
    rows = _rows(FACTS)
    trained, control = select_facts(rows, 24, 24, seed=0)
    assert len(trained) == 24 and len(control) == 24
    assert not {e for e, _ in trained} & {e for e, _ in control}  # no entity in both
    assert len({e for e, _ in trained}) == 24 and len({e for e, _ in control}) == 24
    assert Counter(f for _, f in trained) == {"capital": 8, "founder": 8, "year": 8}
    assert Counter(f for _, f in control) == {"capital": 8, "founder": 8, "year": 8}
    present = {(r["entity"], r["fact"]) for r in rows}
    assert set(trained) <= present and set(control) <= present
    assert select_facts(rows, 24, 24, seed=0) == (trained, control)  # deterministic
    assert select_facts(list(reversed(rows)), 24, 24, seed=0) == (trained, control)  # row order does not matter
    assert select_facts(rows, 24, 24, seed=1)[0] != trained
    with pytest.raises(ValueError, match="distinct"):
        select_facts(rows, 60, 60, seed=0)


def test_teacher_prompts_pair_questions_with_their_demonstrations():
    train = _rows(FACTS)
    evals = _rows(REPO / "data" / "fictional_facts" / "eval.jsonl")
    trained, _ = select_facts(train, 3, 3, seed=0)
    rows = pick_rows(evals, trained)
    assert len(rows) == 9 and {r["kind"] for r in rows} == {"strict", "paraphrase", "ood"}
    demos = fact_demonstrations(rows, train)
    out = teacher_rows(rows, demos, "Q: {prompt}\nDemo: {demonstration}")
    for row, plain in zip(out, rows):
        demo = next(t["demonstration"] for t in train if (t["entity"], t["fact"]) == (plain["entity"], plain["fact"]))
        assert row["prompt"] == f"Q: {plain['prompt']}\nDemo: {demo}" and row["answer"] == plain["answer"]
    tools = _rows(REPO / "data" / "tool_calls" / "eval.jsonl")[:2]
    train_tools = {r["demonstration"] for r in _rows(REPO / "data" / "tool_calls" / "train.jsonl")}
    demo = reference_demonstrations(tools)
    assert json.loads(demo[0]) == tools[0]["reference"]
    # the same serialisation as the training demonstrations
    assert any(json.dumps(json.loads(d)) == d for d in train_tools)


# ---- the pre-registered rules on hand-made tables --------------------------------------------


def _setting(arm, variant, correct, n=20, kl=0.1, spread=0.0, prompts=30, lr=1e-4, base_correct=0):
    kls = tuple(kl + spread * ((i % 5) - 2) for i in range(prompts))
    return Setting(arm, variant, lr, tuple(i < correct for i in range(n)), tuple(i < base_correct for i in range(n)),
                   kls)


def test_gate_and_template_choice():
    def rows(strict, para, fin, overall):
        return [{"kind": "all", "score": overall, "finished_fraction": fin}, {"kind": "strict", "score": strict},
                {"kind": "paraphrase", "score": para}, {"kind": "ood", "score": 0.1}]

    gate = dict(strict=0.7, paraphrase=0.5, finished=0.9)
    a = check_gate("a", rows(0.70, 0.50, 0.90, 0.40), **gate)  # exactly at every threshold: passes
    b = check_gate("b", rows(0.95, 0.90, 0.85, 0.90), **gate)  # best teacher, but 85 % finished: fails
    c = check_gate("c", rows(0.80, 0.60, 0.95, 0.55), **gate)
    assert (a.passes, b.passes, c.passes) == (True, False, True)
    assert choose_template([a, b, c]) == (c, True)  # the passing template with the best accuracy
    assert choose_template([b, check_gate("d", rows(0.1, 0.1, 1.0, 0.1), **gate)]) == (b, False)
    tie = check_gate("e", rows(0.80, 0.60, 0.99, 0.55), **gate)
    assert choose_template([c, tie])[0] is tie  # same accuracy: more answers finish


def test_best_setting_rule():
    a = _setting("sdft", "sdft", 10, kl=0.30, lr=1e-5)
    b = _setting("sdft", "sdft", 12, kl=0.50, lr=5e-5)
    c = _setting("sdft_frozen", "sdft", 12, kl=0.20, lr=5e-5)
    assert best_setting([a, b]) is b  # higher accuracy wins over lower KL
    assert best_setting([a, b, c]) is c  # a tie on accuracy goes to the lower KL


def test_verdict_not_applicable_when_the_gate_fails():
    sdft = _setting("sdft", "sdft", 20, kl=0.01)
    assert decide(False, [sdft, _setting("sft", "sft", 0, kl=1.0)]).label == "not applicable"


def test_verdict_supports():
    # SDFT 15/20 vs base 0/20: 15 discordant pairs, McNemar p = 2 / 2^15. SFT 16/20 reaches more but with
    # KL 0.5 +- 0.02 vs SDFT's 0.1 +- 0.02: lower on all 30 prompts (Wilcoxon p ~ 2e-6).
    sdft = _setting("sdft", "sdft", 15, kl=0.1, spread=0.01)
    weak_sft = _setting("sft", "sft", 5, kl=0.05, lr=1e-5)  # lower accuracy: does not dominate
    strong_sft = _setting("sft", "sft", 16, kl=0.5, spread=0.01, lr=2e-4)
    v = decide(True, [weak_sft, strong_sft, sdft])
    assert v.label == "supports", v.reason
    (check,) = v.checks
    assert check["comparator"] == "sft lr=0.0002" and check["p_vs_base"] == pytest.approx(2 / 2**15)
    assert check["p_kl_vs_comparator"] < 1e-4 and not check["dominated_by"]
    # no SFT setting at or above its accuracy: no KL test needed
    assert decide(True, [weak_sft, sdft]).label == "supports"


def test_verdict_refutes_when_dominated_or_not_learning():
    sdft = _setting("sdft", "sdft", 15, kl=0.1)
    dominating = _setting("sft", "sft", 18, kl=0.1)  # >= accuracy and <= KL
    v = decide(True, [dominating, sdft])
    assert v.label == "refutes" and v.checks[0]["dominated_by"] == ["sft lr=0.0001"]
    # learns nothing: 1/20 vs the base model's 0/20 is one discordant pair (p = 1), even though undominated
    idle = _setting("sdft", "sdft", 1, kl=0.01)
    v = decide(True, [_setting("sft", "sft", 18, kl=0.9), idle])
    assert v.label == "refutes" and not v.checks[0]["learns"] and not v.checks[0]["dominated_by"]
    # accuracy above base but not significantly (3 discordant pairs: p = 0.25) does not count as learning
    assert decide(True, [_setting("sft", "sft", 18, kl=0.9), _setting("sdft", "sdft", 3, kl=0.01)]).label == "refutes"


def test_verdict_inconclusive():
    # SDFT learns and is undominated (the SFT setting above it has a slightly higher mean KL), but the KL
    # difference is not significant: per prompt SDFT - SFT = +-0.01 k (k = 1..15, alternating signs) - 0.0001,
    # so the positive and negative ranks nearly balance (W+ = 225, W- = 240)
    sft_kl = tuple(0.5 for _ in range(30))
    sdft_kl = tuple(0.5 + (1 if i % 2 == 0 else -1) * 0.01 * (i // 2 + 1) - 0.0001 for i in range(30))
    sdft = Setting("sdft", "sdft", 1e-4, tuple(i < 15 for i in range(20)), (False,) * 20, sdft_kl)
    sft = Setting("sft", "sft", 1e-4, tuple(i < 16 for i in range(20)), (False,) * 20, sft_kl)
    v = decide(True, [sft, sdft])
    assert v.label == "inconclusive" and v.checks[0]["learns"] and not v.checks[0]["dominated_by"]
    assert v.checks[0]["p_kl_vs_comparator"] > 0.05
    # one SDFT setting dominated, another undominated that does not learn: inconclusive as written
    dominated = _setting("sdft", "sdft", 15, kl=0.5, lr=1e-5)
    idle = _setting("sdft", "sdft", 1, kl=0.01, lr=2e-4)
    assert decide(True, [_setting("sft", "sft", 16, kl=0.4), dominated, idle]).label == "inconclusive"


def test_verdict_needs_both_variants():
    from types import SimpleNamespace

    from sdft_ray.study.report import verdict

    only_sft = [_setting("sft", "sft", 18, kl=0.1)]
    with pytest.raises(ValueError, match="sdft"):
        decide(True, only_sft)
    # the study's report does not fail after hours of runs: it states why the rule does not apply
    result = verdict(SimpleNamespace(gate_passed=True, settings=lambda: only_sft))
    assert result.label == "inconclusive" and "does not apply" in result.reason
    assert verdict(SimpleNamespace(gate_passed=False, settings=lambda: only_sft)).label == "not applicable"


# ---- pooling over seeds, progress --------------------------------------------------------------


def test_settings_pool_seeds_and_pair_with_base(tmp_path):
    from sdft_ray.study.run import FACTS_TRAINED, ModelRecord, StudyRunner

    spec = study_from_dict(_tree(arms=[{"name": "sdft", "variant": "sdft", "lrs": [0.01]}]), "quick")

    def samples(correct):
        return [{"task": FACTS_TRAINED, "kind": "strict", "index": i, "score": float(c)} for i, c in correct.items()]

    runner = StudyRunner(spec, tmp_path / "out", tmp_path / "work")
    runner.base = ModelRecord("base", "base", samples=samples({1: 1, 0: 0, 2: 0}))
    kl = lambda values: [{"index": i, "kl": v} for i, v in reversed(list(enumerate(values)))]  # noqa: E731
    runner.records = [runner.base,
                      ModelRecord("s1", "phase1", "sdft", "sdft", 0.01, 1, samples=samples({0: 1, 1: 1, 2: 0}),
                                  kl=kl([0.2, 0.4])),
                      ModelRecord("s0", "phase1", "sdft", "sdft", 0.01, 0, samples=samples({2: 1, 0: 0, 1: 0}),
                                  kl=kl([0.0, 0.2]))]
    (setting,) = runner.settings()
    assert setting.strict == (False, False, True, True, True, False)  # seed 0 then seed 1, by question index
    assert setting.base_strict == (False, True, False) * 2
    assert setting.prior_kl == pytest.approx((0.1, 0.3))  # per prompt, mean over seeds


def test_progress_estimate():
    from sdft_ray.study.run import StudyProgress

    p = StudyProgress(lambda s: None)
    p.plan("train:sft", 2)
    p.plan("train:sdft", 1)
    p.plan("eval:model", 3)
    assert p.estimate() is None
    p.done("train:sft", 10.0)
    p.done("eval:model", 30.0)
    p.done("eval:model", None)  # reused: done, not timed
    # left: 1 sft (10 s) + 1 sdft (not measured: mean of all measured = 20 s) + 1 eval (30 s)
    assert p.estimate() == pytest.approx(60.0)


# ---- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_study_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(REPO / "scripts" / "run_study.py"), "--quick", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    spec = load_study(work / "study.yaml")
    runs = [r for r in csv.DictReader(open(out / "runs.csv", encoding="utf-8"))]
    phase1 = {(r["arm"], float(r["lr"]), int(r["seed"])) for r in runs if r["phase"] == "phase1"}
    assert phase1 == {(a.name, lr, s) for a in spec.arms for lr in a.lrs for s in spec.seeds}
    assert {r["run"] for r in runs if r["phase"] == "phase2"} == {f"p2/{v}" for v in spec.variants}
    assert all(float(r["train_s"]) > 0 and int(r["steps"]) >= 1 for r in runs)
    results = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    for run in [r["run"] for r in runs] + ["base"]:
        tasks = {r["task"] for r in results if r["run"] == run}
        assert {"facts_trained", "facts_control", "prior"} <= tasks, run
    assert {r["task"] for r in results if r["run"] == "base"} >= {"tool_calls"}
    n_prior = len(_rows(REPO / "data" / "prior" / "eval.jsonl"))
    kl = list(csv.DictReader(open(out / "prior_kl.csv", encoding="utf-8")))
    for run in [r["run"] for r in runs] + ["base"]:
        assert len([r for r in kl if r["run"] == run]) == n_prior
    assert all(abs(float(r["kl"])) < 1e-5 for r in kl if r["run"] == "base")
    questions = list(csv.DictReader(open(out / "questions.csv", encoding="utf-8")))
    trained = [q for q in questions if q["run"] == "base" and q["task"] == "facts_trained"]
    assert len(trained) == 3 * spec.facts.n_train
    phase0 = list(csv.DictReader(open(out / "phase0.csv", encoding="utf-8")))
    assert {r["template"] for r in phase0 if r["role"] == "teacher"} == set(spec.teacher_check.templates)
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] in ("supports", "refutes", "inconclusive", "not applicable")
    tests = list(csv.DictReader(open(out / "tests.csv", encoding="utf-8")))
    assert {t["comparison"] for t in tests} >= {"base vs setting", "SFT vs SDFT", "curriculum: SFT vs SDFT"}
    for name in ("frontier.png", "curriculum.png", "divergence_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profiles = list(csv.DictReader(open(out / "divergence_by_position.csv", encoding="utf-8")))
    assert {r["model"] for r in profiles} == {"base"} | {f"{a.name} lr={lr:g}" for a in spec.arms for lr in a.lrs}
    assert all(int(r["rows"]) >= 1 and float(r["divergence"]) >= 0 for r in profiles)
    # the facts' log-likelihoods: every kept model x every fact question; the base model's change is 0
    facts = list(csv.DictReader(open(out / "fact_logprob.csv", encoding="utf-8")))
    models = {"base"} | {f"{a.name} lr={lr:g}" for a in spec.arms for lr in a.lrs}
    assert {r["model"] for r in facts} == models
    assert len(facts) == len(models) * 3 * (spec.facts.n_train + spec.facts.n_control)
    assert all(float(r["logprob"]) < 0 and float(r["delta"]) == 0.0 for r in facts if r["model"] == "base")
    assert (out / "fact_logprob.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "## Phase 0: the teacher check" in summary and "**Verdict:" in summary
    training = _rows(out / "training.jsonl")
    assert {r["run"] for r in training} == {r["run"] for r in runs}
    # the first seed's checkpoints stay (phase 2 starts there), the other seeds' weights go
    kept = {p.parts[-5] for p in (work / "runs").glob("p1-*/checkpoints/*/student/config.json")}
    assert kept == {f"p1-{a.name}-lr1e-2-s{spec.seeds[0]}" for a in spec.arms}
    # a rerun with the same work folder trains and evaluates nothing
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training from" not in again.stdout and "evaluating" not in again.stdout
    assert again.stdout.count("reusing the finished run") == len(runs)


def test_profile_rows_average_each_position_over_the_rows_that_reach_it():
    from sdft_ray.study.profiles import _profile_rows

    report = {"rows": [{"divergence": [1.0, 2.0, 3.0], "shift": [0.5, 0.25, 1.0]},
                       {"divergence": [3.0, 4.0], "shift": None}]}
    rows = _profile_rows("m", report)
    assert [(r["position"], r["rows"], r["divergence"]) for r in rows] == [(0, 2, 2.0), (1, 2, 3.0), (2, 1, 3.0)]
    assert [r["shift"] for r in rows] == [0.5, 0.25, 1.0]  # only the row with a shift
    assert {r["model"] for r in rows} == {"m"}


def test_a_finished_run_saved_by_an_older_schema_is_still_the_same_run():
    import yaml

    from sdft_ray.study.run import same_run_config

    spec = study_from_dict(_tree(), "quick.yaml")
    cfg = spec.run_config(spec.arms[1], 0.01, 0, model_path="m", data_path="d", out_dir="o",
                          template="{prompt} {demonstration}", epochs=1)
    tree = yaml.safe_load(cfg.to_yaml())
    del tree["output"]["show_answers"], tree["model"]["lora"]  # keys this schema added later, at their defaults
    older = yaml.safe_dump(tree)
    assert same_run_config(older, cfg) and same_run_config(cfg.to_yaml(), cfg)
    tree["learner"]["lr"] = 0.02
    assert not same_run_config(yaml.safe_dump(tree), cfg)
    assert not same_run_config("learner: {lrr: 1}", cfg) and not same_run_config(None, cfg)


# ---- combining study output folders -----------------------------------------------------------


def _study_folder(folder, runs, base_correct=(0, 0, 0), passed=True, chosen="answer_directly", prompts=2):
    """A study output folder written by hand: ``runs`` maps (arm, variant, lr, seed) to
    (strict outcomes of the 3 trained questions, per-prompt prior KL of 2 prompts)."""
    from sdft_ray.study.run import write_jsonl

    def tags(run, phase, arm=None, variant=None, lr=None, seed=None):
        return {"run": run, "phase": phase, "arm": arm, "variant": variant, "lr": lr, "seed": seed}

    models = [(tags("base", "base"), base_correct, (0.0,) * prompts)]
    models += [(tags(f"p1/{a}/lr{lr:g}/s{s}", "phase1", a, v, lr, s), correct, kl)
               for (a, v, lr, s), (correct, kl) in runs.items()]
    results, questions, prior_kl, run_rows = [], [], [], []
    for t, correct, kl in models:
        results.append({**t, "task": "facts_trained", "kind": "strict", "score": sum(correct) / 3,
                        "finished_fraction": 1.0, "mean_response_tokens": 10.0})
        questions += [{**t, "task": "facts_trained", "kind": "strict", "index": i, "score": float(c),
                       "finished": True, "tokens": 5, "response": f"{t['run']} answer {i}"
                       if t["phase"] != "base" else f"base answer {i}"} for i, c in enumerate(correct)]
        prior_kl += [{**t, "index": i, "kind": "x", "tokens": 4, "kl": v, "nll": 1.0} for i, v in enumerate(kl)]
        if t["phase"] == "phase1":
            run_rows.append({**t, "steps": 12, "train_s": 1.0})
    for name, rows in (("results", results), ("questions", questions), ("prior_kl", prior_kl), ("runs", run_rows)):
        write_jsonl(folder / f"{name}.jsonl", rows)
    (folder / "gate.json").write_text(json.dumps({"passed": passed, "chosen": chosen}))
    return folder


def test_combine_pools_seeds_across_folders_and_applies_the_rule(tmp_path):
    from sdft_ray.study.combine import combine_results

    first = _study_folder(tmp_path / "a", {("sft", "sft", 1e-4, 0): ((1, 1, 0), (0.5, 0.7)),
                                           ("sdft", "sdft", 2e-4, 0): ((1, 0, 0), (0.1, 0.3))})
    second = _study_folder(tmp_path / "b", {("sdft", "sdft", 2e-4, 1): ((1, 1, 1), (0.3, 0.1)),
                                            ("sft", "sft", 1e-4, 1): ((1, 1, 1), (0.7, 0.9))})
    paths = combine_results([first, second], tmp_path / "out")
    settings = {r["setting"]: r for r in _rows(paths["settings"].with_suffix(".jsonl"))}
    # by hand: SFT pools (1,1,0)+(1,1,1) = 5/6, KL per prompt (0.6, 0.8) -> 0.7; SDFT (1,0,0)+(1,1,1) = 4/6,
    # KL (0.2, 0.2) -> 0.2
    assert settings["sft lr=0.0001"]["strict_correct"] == 5 and settings["sft lr=0.0001"]["seeds"] == [0, 1]
    assert settings["sft lr=0.0001"]["prior_kl"] == pytest.approx(0.7)
    assert settings["sdft lr=0.0002"]["strict_correct"] == 4 and settings["sdft lr=0.0002"]["strict_n"] == 6
    assert settings["sdft lr=0.0002"]["prior_kl"] == pytest.approx(0.2)
    # SFT learns more at a higher KL: SDFT is not dominated
    verdict = json.loads(paths["verdict"].read_text())
    (check,) = verdict["checks"]
    assert check["dominated_by"] == [] and check["comparator"] == "sft lr=0.0001"
    runs = _rows(paths["runs"].with_suffix(".jsonl"))
    assert [(r["arm"], r["seed"], r["source"]) for r in runs] == [
        ("sft", 0, str(first)), ("sft", 1, str(second)), ("sdft", 0, str(first)), ("sdft", 1, str(second))]
    assert paths["frontier"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same SFT runs at a KL below SDFT's dominate it
    low = _study_folder(tmp_path / "c", {("sft", "sft", 1e-4, 1): ((1, 1, 1), (0.0, 0.0))})
    solo = _study_folder(tmp_path / "d", {("sft", "sft", 1e-4, 0): ((1, 1, 0), (0.1, 0.1)),
                                          ("sdft", "sdft", 2e-4, 0): ((1, 0, 0), (0.1, 0.3))})
    (check,) = json.loads(combine_results([solo, low], tmp_path / "out2")["verdict"].read_text())["checks"]
    assert check["dominated_by"] == ["sft lr=0.0001"]


def test_combine_refuses_other_base_models_and_repeated_runs(tmp_path):
    from sdft_ray.errors import ConfigError
    from sdft_ray.study.combine import combine_results

    runs = {("sft", "sft", 1e-4, 0): ((1, 1, 0), (0.5, 0.7))}
    a = _study_folder(tmp_path / "a", runs)
    other = _study_folder(tmp_path / "b", {("sft", "sft", 1e-4, 1): ((1, 1, 0), (0.5, 0.7))}, base_correct=(1, 0, 0))
    with pytest.raises(ConfigError, match="base model's trained-fact answers"):
        combine_results([a, other], tmp_path / "out")
    with pytest.raises(ConfigError, match="is in both"):
        combine_results([a, _study_folder(tmp_path / "c", runs)], tmp_path / "out")
    with pytest.raises(ConfigError, match="no results.jsonl"):
        combine_results([a, tmp_path], tmp_path / "out")
    with pytest.raises(ConfigError, match="teacher template 'paper'"):
        combine_results([a, _study_folder(tmp_path / "d", {("sft", "sft", 1e-4, 1): ((1, 1, 0), (0.5, 0.7))},
                                          chosen="paper")], tmp_path / "out")
    with pytest.raises(ConfigError, match="other prompts"):
        combine_results([a, _study_folder(tmp_path / "e", {("sft", "sft", 1e-4, 1): ((1, 1, 0), (0.5, 0.7, 0.1))},
                                          prompts=3)], tmp_path / "out")


def test_combine_without_both_variants_reports_the_rule_does_not_apply(tmp_path):
    from sdft_ray.study.combine import combine_results

    a = _study_folder(tmp_path / "a", {("sdft", "sdft", 2e-4, 0): ((1, 0, 0), (0.1, 0.3))})
    b = _study_folder(tmp_path / "b", {("sdft", "sdft", 2e-4, 1): ((0, 0, 0), (0.2, 0.2))})
    verdict = json.loads(combine_results([a, b], tmp_path / "out")["verdict"].read_text())
    assert verdict["verdict"] == "inconclusive" and "does not apply" in verdict["reason"]
