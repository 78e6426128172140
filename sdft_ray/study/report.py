"""The study's outputs: raw rows, paired tests, the verdict, ``summary.md`` and two plots.

Raw rows (``out_dir``; JSONL, and CSV for spreadsheets):

    results     one row per evaluated model x task x kind: n, correct (full credit), score,
                Wilson 95 % interval, finished share, mean response tokens, length drift vs base
    questions   one row per evaluated model x question: score, finished, tokens (JSONL: + response)
    prior_kl    one row per model x prior prompt: KL(base || model), NLL of the base answer, tokens
    runs        one row per training run: arm, variant, lr, seed, steps, wall times, load average,
                headline metrics
    phase0      the teacher check: per template (and the student) and kind: accuracy, interval,
                finished share; the gate's outcome per template
    tests       paired tests: base vs each setting, SFT vs SDFT settings, the curriculum
    training    per training step: loss, grad norm, rollout length, finished share, ...
    verdict.json, runtimes.json, summary.md, frontier.png, curriculum.png
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.evaluation.stats import mcnemar_exact, mean_interval, wilcoxon_paired, wilson_interval
from sdft_ray.study.verdict import INCONCLUSIVE, NOT_APPLICABLE, Setting, Verdict, decide

if TYPE_CHECKING:
    from sdft_ray.study.run import ModelRecord, StudyRunner

__all__ = ["plot_curriculum", "plot_frontier", "write_report", "write_tables"]

TAG_COLUMNS = ("run", "phase", "arm", "variant", "lr", "seed")
FACTS_TRAINED, FACTS_CONTROL = "facts_trained", "facts_control"


def _write(out: Path, name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = (),
           csv_drop: Sequence[str] = ()) -> None:
    atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
    keys = [c for c in columns if any(c in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys) - set(csv_drop))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, restval="", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in keys})
    atomic_write_text(out / f"{name}.csv", buffer.getvalue())


# ---- per-record numbers ----------------------------------------------------------------------


def _correct(record: ModelRecord, task: str, kind: str) -> tuple[int, int]:
    picked = [s for s in record.samples if s["task"] == task and (kind == "all" or s["kind"] == kind)]
    return sum(s["score"] >= 1.0 for s in picked), len(picked)


def result_rows(record: ModelRecord, base: ModelRecord | None) -> list[dict[str, Any]]:
    base_tokens = {(r["task"], r["kind"]): r.get("mean_response_tokens") for r in (base.rows if base else [])}
    out = []
    for r in record.rows:
        k, n = _correct(record, r["task"], r["kind"])
        low, high = wilson_interval(k, n)
        row = {**record.tags, "task": r["task"], "kind": r["kind"], "metric": r["metric"], "n": n, "correct": k,
               "score": r["score"], "accuracy": k / n if n else math.nan, "low": low, "high": high,
               "finished_fraction": r.get("finished_fraction"), "mean_response_tokens": r.get("mean_response_tokens")}
        ref = base_tokens.get((r["task"], r["kind"]))
        if ref is not None and record is not base:
            row["length_drift"] = r["mean_response_tokens"] - ref
        out.append(row)
    return out


def _accuracy(record: ModelRecord, task: str, kind: str) -> float:
    k, n = _correct(record, task, kind)
    return k / n if n else math.nan


def headline(record: ModelRecord, base: ModelRecord) -> dict[str, Any]:
    """The numbers every run table shows (accuracy = full-credit share)."""
    out: dict[str, Any] = {}
    for task, kind, name in ((FACTS_TRAINED, "strict", "trained_strict"), (FACTS_TRAINED, "paraphrase", "trained_paraphrase"),
                             (FACTS_TRAINED, "ood", "trained_ood"), (FACTS_CONTROL, "all", "control_all"),
                             ("prior", "all", "prior"), ("tool_calls", "all", "tools")):
        k, n = _correct(record, task, kind)
        if n:
            low, high = wilson_interval(k, n)
            out.update({name: k / n, f"{name}_low": low, f"{name}_high": high, f"{name}_n": n})
    prior = next((r for r in record.rows if r["task"] == "prior" and r["kind"] == "all"), None)
    base_prior = next((r for r in base.rows if r["task"] == "prior" and r["kind"] == "all"), None)
    if prior is not None:
        out["prior_finished"] = prior.get("finished_fraction")
        if base_prior is not None:
            out["prior_length_drift"] = prior["mean_response_tokens"] - base_prior["mean_response_tokens"]
    if record.kl:
        out.update(mean_interval([r["kl"] for r in record.kl]).as_dict("prior_kl"))
        out.pop("prior_kl_n")
        out["prior_nll"] = float(np.mean([r["nll"] for r in record.kl]))
    return out


# ---- settings (arm x lr over seeds) and paired tests ----------------------------------------------


def _setting_runs(records: Sequence[ModelRecord]) -> dict[tuple[str, float], list[ModelRecord]]:
    groups: dict[tuple[str, float], list[ModelRecord]] = {}
    for r in records:
        if r.phase == "phase1":
            groups.setdefault((r.arm, r.lr), []).append(r)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in groups.items()}


def _pooled(runs: Sequence[ModelRecord], task: str, kind: str) -> list[bool]:
    return [x for r in runs for x in (r.all_outcomes(task) if kind == "all" else r.outcomes(task, kind))]


def _mean_kl(runs: Sequence[ModelRecord]) -> list[float]:
    return [float(np.mean(v)) for v in zip(*(r.kl_values() for r in runs))]


def _test_row(comparison: str, a: str, b: str, measure: str, test: Any, mean_a: float, mean_b: float) -> dict[str, Any]:
    return {"comparison": comparison, "a": a, "b": b, "measure": measure, **test.as_dict(), "mean_a": mean_a,
            "mean_b": mean_b}


def settings_of(records: Sequence[ModelRecord], base: ModelRecord) -> list[Setting]:
    """Every phase-1 (arm, lr) over its seeds, in the order of ``records``, for the decision
    rules: strict outcomes pooled seed-major, paired with the base model's; per-prompt prior KL
    averaged over the seeds."""
    return [Setting(arm, runs[0].variant, lr, tuple(_pooled(runs, FACTS_TRAINED, "strict")),
                    tuple(_pooled([base] * len(runs), FACTS_TRAINED, "strict")), tuple(_mean_kl(runs)))
            for (arm, lr), runs in _setting_runs(records).items()]


ACCURACY_MEASURES = ((FACTS_TRAINED, "strict"), (FACTS_TRAINED, "all"), (FACTS_CONTROL, "all"), ("prior", "all"))


def paired_tests(records: Sequence[ModelRecord], base: ModelRecord,
                 chains: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Exact McNemar tests on accuracy (pooled over seeds, paired by seed and question) and
    Wilcoxon signed-rank tests on per-prompt prior KL (mean over seeds)."""
    groups = _setting_runs(records)
    name = {k: f"{k[0]} lr={k[1]:g}" for k in groups}
    rows = []
    for key, runs in groups.items():
        for task, kind in ACCURACY_MEASURES:
            a = _pooled([base] * len(runs), task, kind)
            b = _pooled(runs, task, kind)
            if a and len(a) == len(b):
                rows.append(_test_row("base vs setting", "base", name[key], f"{task}/{kind} accuracy",
                                      mcnemar_exact(a, b), float(np.mean(a)), float(np.mean(b))))
    variant = {key: runs[0].variant for key, runs in groups.items()}
    for s_key in [k for k in groups if variant[k] == "sft"]:
        for d_key in [k for k in groups if variant[k] != "sft"]:
            sft_runs, sdft_runs = groups[s_key], groups[d_key]
            if [r.seed for r in sft_runs] != [r.seed for r in sdft_runs]:
                continue  # pairs need the same seeds
            for task, kind in ((FACTS_TRAINED, "strict"), ("prior", "all")):
                a, b = _pooled(sft_runs, task, kind), _pooled(sdft_runs, task, kind)
                rows.append(_test_row("SFT vs SDFT", name[s_key], name[d_key], f"{task}/{kind} accuracy",
                                      mcnemar_exact(a, b), float(np.mean(a)), float(np.mean(b))))
            a, b = _mean_kl(sft_runs), _mean_kl(sdft_runs)
            rows.append(_test_row("SFT vs SDFT", name[s_key], name[d_key], "prior KL(base||model) per prompt",
                                  wilcoxon_paired(a, b), float(np.mean(a)), float(np.mean(b))))
    after = {c["variant"]: _record(records, c["after"]) for c in chains}
    for c in chains:
        model = after[c["variant"]]
        for task in ("tool_calls", "prior"):
            a, b = base.all_outcomes(task), model.all_outcomes(task)
            if a and len(a) == len(b):
                rows.append(_test_row("curriculum: base vs after", "base", model.run, f"{task}/all accuracy",
                                      mcnemar_exact(a, b), float(np.mean(a)), float(np.mean(b))))
        start = _record(records, c["start"])
        a, b = start.outcomes(FACTS_TRAINED, "strict"), model.outcomes(FACTS_TRAINED, "strict")
        rows.append(_test_row("curriculum: before vs after", start.run, model.run, f"{FACTS_TRAINED}/strict accuracy",
                              mcnemar_exact(a, b), float(np.mean(a)), float(np.mean(b))))
    if "sft" in after and "sdft" in after:
        s, d = after["sft"], after["sdft"]
        for task in ("tool_calls", "prior"):
            a, b = s.all_outcomes(task), d.all_outcomes(task)
            rows.append(_test_row("curriculum: SFT vs SDFT", s.run, d.run, f"{task}/all accuracy", mcnemar_exact(a, b),
                                  float(np.mean(a)), float(np.mean(b))))
        rows.append(_test_row("curriculum: SFT vs SDFT", s.run, d.run, "prior KL(base||model) per prompt",
                              wilcoxon_paired(s.kl_values(), d.kl_values()), float(np.mean(s.kl_values())),
                              float(np.mean(d.kl_values()))))
    return rows


def _record(records: Sequence[ModelRecord], run: str) -> ModelRecord:
    return next(r for r in records if r.run == run)


def verdict(runner: StudyRunner) -> Verdict:
    """The pre-registered verdict; a study without both SFT and SDFT settings (e.g. a lever sweep
    of SDFT arms only) gets ``inconclusive`` with the reason instead of failing after its runs."""
    if not runner.gate_passed:
        return decide(False, [])
    try:
        return decide(True, runner.settings())
    except ValueError as e:
        return Verdict(INCONCLUSIVE, f"the decision rule does not apply: {e}")


# ---- writing ---------------------------------------------------------------------------------


def write_tables(runner: StudyRunner, out: Path) -> None:
    """Raw rows so far (called after every run, so an interrupted study leaves its rows)."""
    out.mkdir(parents=True, exist_ok=True)
    base = getattr(runner, "base", None)
    records = runner.records
    _write(out, "results", [row for r in records for row in result_rows(r, base)],
           (*TAG_COLUMNS, "task", "kind", "n", "correct", "accuracy", "low", "high", "finished_fraction"))
    _write(out, "questions", [{**r.tags, **s} for r in records for s in r.samples],
           (*TAG_COLUMNS, "task", "kind", "index", "score", "finished", "tokens"), csv_drop=("response",))
    _write(out, "prior_kl", [{**r.tags, **k} for r in records if r.kl for k in r.kl],
           (*TAG_COLUMNS, "index", "kind", "tokens", "kl", "nll"))
    if base is not None:
        _write(out, "runs", [{**r.tags, **r.info, **headline(r, base)} for r in records
                             if r.phase in ("phase1", "phase2")], (*TAG_COLUMNS, "steps", "train_s", "eval_s"))
    gate = runner.spec.teacher_check.gate
    phase0 = []
    for g in runner.gate:
        rec = _record(runner.records, f"phase0/{g.label}")
        for kind in ("strict", "paraphrase", "ood", "all"):
            phase0.append(_phase0_row("teacher", g.label, rec, kind, g.passes))
    student = next((r for r in records if r.run == "phase0/student"), None)
    if student is not None:
        phase0 += [_phase0_row("student", "query only", student, kind, None)
                   for kind in ("strict", "paraphrase", "ood", "all")]
    _write(out, "phase0", phase0, ("role", "template", "kind", "n", "correct", "accuracy", "low", "high",
                                   "finished_fraction", "passes"))
    atomic_write_text(out / "gate.json", json.dumps({"gate": gate.model_dump(), "passed": runner.gate_passed,
                                                     "chosen": runner.chosen.label if runner.chosen else None,
                                                     "templates": [g.__dict__ for g in runner.gate]}, indent=1))
    atomic_write_text(out / "training.jsonl", "".join(json.dumps(r) + "\n" for r in runner.training))
    atomic_write_text(out / "runtimes.json", json.dumps(runner.runtimes, indent=1))


def _phase0_row(role: str, template: str, record: ModelRecord, kind: str, passes: bool | None) -> dict[str, Any]:
    task = record.rows[0]["task"]
    k, n = _correct(record, task, kind)
    low, high = wilson_interval(k, n)
    row = next(r for r in record.rows if r["kind"] == kind)
    return {"role": role, "template": template, "kind": kind, "n": n, "correct": k, "accuracy": k / n if n else math.nan,
            "low": low, "high": high, "finished_fraction": row.get("finished_fraction"),
            "mean_response_tokens": row.get("mean_response_tokens"), "passes": passes}


def write_report(runner: StudyRunner, out: Path) -> dict[str, Path]:
    """Tests, verdict, summary and plots (after the last run)."""
    write_tables(runner, out)
    tests = paired_tests(runner.records, runner.base, runner.chains) if hasattr(runner, "base") else []
    _write(out, "tests", tests, ("comparison", "a", "b", "measure", "test", "n", "a_only", "b_only", "p_value"))
    result = verdict(runner)
    atomic_write_text(out / "verdict.json", json.dumps(result.as_dict(), indent=1, default=str))
    paths = {name: out / f"{name}.csv" for name in ("results", "questions", "prior_kl", "runs", "phase0", "tests")}
    paths["verdict"] = out / "verdict.json"
    if any(r.phase == "phase1" for r in runner.records):
        paths["frontier"] = plot_frontier(runner.records, runner.base, out / "frontier.png",
                                          f"{runner.spec.model}: learning vs forgetting, one point per run (seeds "
                                          f"{runner.spec.seeds}); bars: 95 % intervals")
    if runner.chains:
        paths["curriculum"] = plot_curriculum(runner, out / "curriculum.png")
    paths["summary"] = write_summary(runner, tests, result, out / "summary.md")
    return paths


# ---- plots -----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, folders made), close it; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_frontier(records: Sequence[ModelRecord], base: ModelRecord, path: Path, title: str) -> Path:
    """x = mean prior KL(base || model) (95 % t interval over prompts), y = trained-facts strict
    accuracy (95 % Wilson); one point per phase-1 run (every seed), one colour per arm (SFT arms
    filled, the others hollow), one marker per learning rate of the arm (arms and rates in the
    order of ``records``); the base model at (0, its accuracy)."""
    plt = _plt()
    groups = _setting_runs(records)
    arms = list(dict.fromkeys(arm for arm, _ in groups))
    # one distinct colour per arm (the default cycle repeats after 10), SFT arms filled, others hollow
    palette = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")
    colors = [palette(i % palette.N) for i in range(len(arms))]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    base_acc = _accuracy(base, FACTS_TRAINED, "strict")
    ax.scatter([0.0], [base_acc], marker="*", s=240, color="black", label="base model", zorder=4)
    for (arm, lr), runs in groups.items():
        a = arms.index(arm)
        m = [rate for name, rate in groups if name == arm].index(lr)
        for i, r in enumerate(runs):
            k, n = _correct(r, FACTS_TRAINED, "strict")
            low, high = wilson_interval(k, n)
            kl = mean_interval(r.kl_values())
            y = k / n
            ax.errorbar([kl.mean], [y], xerr=[[kl.mean - kl.low], [kl.high - kl.mean]] if n and not math.isnan(kl.low)
                        else None, yerr=[[y - low], [high - y]], fmt=markers[m % len(markers)],
                        color=colors[a], ecolor=colors[a], alpha=0.85, capsize=2, markersize=7,
                        markerfacecolor=colors[a] if r.variant == "sft" else "none",
                        label=f"{arm} lr={lr:g}" if i == 0 else None)
    ax.set_xlabel("prior-prompt KL(base || model), nats per token (teacher-forced on the base model's answers)")
    ax.set_ylabel("trained facts: strict accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(left=-0.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="filled: SFT", title_fontsize=7)
    ax.set_title(title, fontsize=8)
    return save_figure(fig, path)


def plot_curriculum(runner: StudyRunner, path: Path) -> Path:
    """Per variant's chain (base -> after facts -> after tool calls): accuracy on trained facts
    (strict), tool calls and prior questions (left), prior KL (right); crosses: the tool-call
    teacher with the phase-1 weights that teach stage 2."""
    plt = _plt()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4.6))
    labels = ["base", "after facts", "after tool calls"]
    measures = ((FACTS_TRAINED, "strict", "trained facts (strict)"), ("tool_calls", "all", "tool calls"),
                ("prior", "all", "prior questions"))
    for v, chain in enumerate(runner.chains):
        start, before, after = (_record(runner.records, chain[k]) for k in ("start", "before", "after"))
        stages = [runner.base, start, after]
        for t, (task, kind, label) in enumerate(measures):
            ys = []
            for i, rec in enumerate(stages):
                source = before if (i == 1 and task == "tool_calls") else rec
                ys.append(_accuracy(source, task, kind))
            acc_ax.plot(range(3), ys, linestyle=styles[v % len(styles)], marker="o", color=colors[t % len(colors)],
                        label=f"{label} ({chain['variant']})")
        teacher = _record(runner.records, chain["teacher"])
        acc_ax.scatter([1], [_accuracy(teacher, "tools_teacher", "all")], marker="x", s=80,
                       color=colors[1 % len(colors)], label=f"tool-call teacher, phase-1 weights ({chain['variant']})")
        kls = [0.0, float(np.mean(start.kl_values())), float(np.mean(after.kl_values()))]
        kl_ax.plot(range(3), kls, linestyle=styles[v % len(styles)], marker="o", color="black",
                   label=f"{chain['variant']} ({chain['setting']})")
    for ax in (acc_ax, kl_ax):
        ax.set_xticks(range(3), labels)
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(-0.03, 1.03)
    acc_ax.set_ylabel("accuracy (greedy, full credit)")
    kl_ax.set_ylabel("prior KL(base || model)")
    acc_ax.legend(fontsize=7)
    kl_ax.legend(fontsize=7)
    fig.suptitle(f"{runner.spec.model}: the curriculum from each variant's best phase-1 setting", fontsize=9)
    return save_figure(fig, path)


# ---- summary.md ------------------------------------------------------------------------------


def _pct(x: float | None, low: float | None = None, high: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if low is None or high is None or math.isnan(low):
        return f"{100 * x:.1f}"
    return f"{100 * x:.1f} [{100 * low:.0f}, {100 * high:.0f}]"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.1e}"


def write_summary(runner: StudyRunner, tests: Sequence[Mapping[str, Any]], result: Verdict, path: Path) -> Path:
    spec = runner.spec
    lines = [f"# Study summary ({spec.model})", "",
             f"**Verdict: {result.label}** - {result.reason}.", "",
             "Accuracy in % with 95 % Wilson intervals [low, high] (greedy decoding, full credit); KL = mean over "
             "prior prompts of the per-token KL(base || model) on the base model's own greedy answers, with a 95 % "
             "t interval; n = questions.", ""]
    lines += ["## Phase 0: the teacher check", "",
              f"Gate (fixed in the study file): strict >= {100 * spec.teacher_check.gate.strict:.0f} %, paraphrase >= "
              f"{100 * spec.teacher_check.gate.paraphrase:.0f} %, finished >= "
              f"{100 * spec.teacher_check.gate.finished:.0f} % at the rollout length ({spec.rollout_tokens()} tokens). "
              f"Trained and control facts together.", "",
              "| role | template | strict | paraphrase | ood | finished | passes |", "|---|---|---|---|---|---|---|"]
    for role, label, run in ([("teacher", g.label, f"phase0/{g.label}") for g in runner.gate]
                             + [("student", "query only", "phase0/student")]):
        rec = next((r for r in runner.records if r.run == run), None)
        if rec is None:
            continue
        task = rec.rows[0]["task"]
        cells = []
        for kind in ("strict", "paraphrase", "ood"):
            k, n = _correct(rec, task, kind)
            cells.append(_pct(k / n if n else None, *wilson_interval(k, n)) + f" (n={n})")
        fin = next(r for r in rec.rows if r["kind"] == "all").get("finished_fraction")
        passes = next((g.passes for g in runner.gate if g.label == label), None) if role == "teacher" else None
        lines.append(f"| {role} | {label} | " + " | ".join(cells) + f" | {_pct(fin)} | "
                     + ("-" if passes is None else ("**yes**" if passes else "no")) + " |")
    if runner.chosen is not None:
        lines += ["", f"Phase 1 uses template **{runner.chosen.label}** "
                      f"({'passed' if runner.gate_passed else 'no template passed; the best teacher is used'})."]
    if hasattr(runner, "base"):
        lines += _run_table(runner)
        lines += _setting_table(runner.settings() if any(r.phase == "phase1" for r in runner.records) else [],
                                tests)
    if tests:
        lines += ["", "## Paired tests", "",
                  "Exact McNemar (accuracy; pooled over seeds, paired by seed and question; a_only / b_only = pairs "
                  "only A / only B got right) and Wilcoxon signed-rank (per-prompt prior KL, mean over seeds; a_only / "
                  "b_only = prompts where A's / B's KL is larger).", "",
                  "| comparison | A | B | measure | mean A | mean B | n | a_only | b_only | p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['comparison']} | {t['a']} | {t['b']} | {t['measure']} | {_num(t['mean_a'])} | "
                         f"{_num(t['mean_b'])} | {t['n']} | {t['a_only']} | {t['b_only']} | {_p(t['p_value'])} |")
    if runner.chains:
        lines += _chain_table(runner)
    lines += _verdict_lines(result)
    units = runner.runtimes.get("units", [])
    lines += ["", "## Runtimes", "", f"Total {runner.runtimes.get('total_s', 0):.0f} s in this invocation; "
              f"{len(units)} units run (the rest reused); load average at start "
              f"{runner.runtimes.get('loadavg_start')}, now {runner.runtimes.get('loadavg_now')}."]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _verdict_lines(result: Verdict) -> list[str]:
    lines = ["", "## Verdict", "", f"**{result.label}**: {result.reason}."]
    if result.label != NOT_APPLICABLE and result.checks:
        lines += ["", "| SDFT setting | strict | base | learns (p) | dominated by | comparator | KL vs comparator p |",
                  "|---|---|---|---|---|---|---|"]
        for c in result.checks:
            lines.append(f"| {c['setting']} | {_pct(c['accuracy'])} | {_pct(c['base_accuracy'])} | "
                         f"{'yes' if c['learns'] else 'no'} ({_p(c['p_vs_base'])}) | "
                         f"{', '.join(c['dominated_by']) or '-'} | {c['comparator'] or '-'} | "
                         f"{_p(c['p_kl_vs_comparator']) if 'p_kl_vs_comparator' in c else '-'} |")
    return lines


def _run_table(runner: StudyRunner) -> list[str]:
    base = runner.base
    lines = ["", "## Phase 1: every run", "",
             "| arm | lr | seed | trained strict | trained paraphrase | trained ood | control (all) | prior | "
             "prior finished | prior KL | prior NLL | prior length drift | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [base] + [r for r in runner.records if r.phase == "phase1"]:
        h = headline(r, base)
        cells = [_pct(h.get(n), h.get(f"{n}_low"), h.get(f"{n}_high"))
                 for n in ("trained_strict", "trained_paraphrase", "trained_ood", "control_all", "prior")]
        kl = f"{_num(h.get('prior_kl'))} [{_num(h.get('prior_kl_low'))}, {_num(h.get('prior_kl_high'))}]" \
            if r is not base else "0"
        lines.append(f"| {r.arm or 'base model'} | {'-' if r.lr is None else f'{r.lr:g}'} | "
                     f"{'-' if r.seed is None else r.seed} | " + " | ".join(cells)
                     + f" | {_pct(h.get('prior_finished'))} | {kl} | {_num(h.get('prior_nll'))} | "
                     f"{_num(h.get('prior_length_drift'), 1)} | {r.info.get('train_s', '-')} |")
    return lines


def setting_summary(s: Setting) -> dict[str, Any]:
    """A setting's pooled numbers: strict correct / n with a Wilson interval, mean prior KL with a
    t interval."""
    k, n = int(sum(s.strict)), len(s.strict)
    low, high = wilson_interval(k, n)
    return {"setting": s.name, "arm": s.arm, "variant": s.variant, "lr": s.lr, "strict_n": n, "strict_correct": k,
            "strict": k / n, "strict_low": low, "strict_high": high, **mean_interval(s.prior_kl).as_dict("prior_kl")}


def _setting_table(settings: Sequence[Setting], tests: Sequence[Mapping[str, Any]]) -> list[str]:
    if not settings:
        return []
    p_base = {t["b"]: t["p_value"] for t in tests
              if t["comparison"] == "base vs setting" and t["measure"] == f"{FACTS_TRAINED}/strict accuracy"}
    lines = ["", "## Phase 1: settings (arm x lr, seeds pooled)", "",
             "| setting | variant | trained strict | McNemar p vs base | mean prior KL [95 %] |",
             "|---|---|---|---|---|"]
    for s in map(setting_summary, settings):
        lines.append(f"| {s['setting']} | {s['variant']} | {_pct(s['strict'], s['strict_low'], s['strict_high'])} "
                     f"(n={s['strict_n']}) | {_p(p_base[s['setting']]) if s['setting'] in p_base else '-'} | "
                     f"{_num(s['prior_kl'])} [{_num(s['prior_kl_low'])}, {_num(s['prior_kl_high'])}] |")
    return lines


def _chain_table(runner: StudyRunner) -> list[str]:
    base = runner.base
    lines = ["", "## Phase 2: the curriculum", "",
             "From each variant's best phase-1 setting (highest trained-facts strict accuracy over seeds, ties: lower "
             "prior KL; its first seed's checkpoint). The teacher row is that checkpoint's weights with the "
             "demonstration in context: the teacher that actually teaches the tool-call stage.", "",
             "| variant | from | model | trained strict | tool calls | prior | prior KL |", "|---|---|---|---|---|---|---|"]
    for c in runner.chains:
        teacher = _record(runner.records, c["teacher"])
        k, n = _correct(teacher, "tools_teacher", "all")
        rows = [("base model", base, base),
                ("after facts", _record(runner.records, c["start"]), _record(runner.records, c["before"])),
                ("after tool calls", _record(runner.records, c["after"]), _record(runner.records, c["after"]))]
        for label, rec, tools in rows:
            h = headline(rec, base)
            t = headline(tools, base)
            kl = _num(h.get("prior_kl")) if rec is not base else "0"
            lines.append(f"| {c['variant']} | {c['setting']} | {label} | "
                         f"{_pct(h.get('trained_strict'), h.get('trained_strict_low'), h.get('trained_strict_high'))} | "
                         f"{_pct(t.get('tools'), t.get('tools_low'), t.get('tools_high'))} | "
                         f"{_pct(h.get('prior'), h.get('prior_low'), h.get('prior_high'))} | {kl} |")
        lines.append(f"| {c['variant']} | {c['setting']} | teacher (phase-1 weights + demonstration) | - | "
                     f"{_pct(k / n if n else None, *wilson_interval(k, n))} | - | - |")
    return lines
