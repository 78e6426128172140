"""The probe: every number it reports against an independent computation on the tiny model, the
verdict rules on hand-made summaries, the gate and the CLI."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FACTS, tiny_config
from sdft_ray.errors import ConfigError
from sdft_ray.evaluation.metrics import normalize_text
from sdft_ray.probe import ProbeReport, choose_rows, gate_run, run_probe
from sdft_ray.probe_summary import (
    FRAMING_DOMINATES,
    ICL_TOO_WEAK,
    OK,
    TRUNCATION_DOMINATES,
    Answer,
    AnswerStats,
    DivergenceStats,
    LengthStats,
    Opening,
    ProbeSummary,
    Verdict,
    answer_stats,
    copies_demonstration,
    decide,
    divergence_stats,
    length_stats,
    top_openings,
)

# The paper's teacher turn, written out by hand (not read from sdft_ray.prompts).
PAPER = ("\n{q}\n\nThis is an example for a response to the question:\n{d}\n\n"
         "Now answer with a response of your own, including the thinking process.\n")
MAX_NEW = 6


# --------------------------------------------------------------------------- pure summaries by hand


def ans(n_tokens: int, finished: bool, text: str = "", correct: float | None = None) -> Answer:
    return Answer(token_ids=list(range(n_tokens)), text=text, finished=finished, correct=correct)


def test_length_stats_by_hand():
    # lengths sorted 1 3 5 8: p50 = 2nd smallest (ceil(0.5*4)=2) = 3, p90 = ceil(3.6) = 4th = 8
    stats = length_stats([ans(5, True), ans(1, True), ans(8, False), ans(3, True)])
    assert stats == LengthStats(n=4, finished_share=0.75, mean=4.25, p50=3, p90=8, max=8)
    assert length_stats([ans(7, False)]) == LengthStats(1, 0.0, 7.0, 7, 7, 7)


def test_accuracy_counts_only_rows_with_a_reference():
    stats = answer_stats([ans(1, True, correct=1.0), ans(1, True, correct=0.0), ans(1, True), ans(1, True, correct=1.0)])
    assert stats.accuracy == pytest.approx(2 / 3) and stats.n_references == 3
    assert answer_stats([ans(1, True)]).accuracy is None


def test_divergence_shares_by_hand():
    div = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5]]  # total 11
    shifts = [[0.0, 5.0, 0.4, 1.0], [0.0, 0.0]]
    # row 0: largest shift 5, small = below 0.5 -> positions 0 and 2; row 1: no shift at all -> all small
    s = divergence_stats(div, shifts, skip=3, window=8, aggregation="sequence_mean")
    assert s.tokens == 6 and s.total == 11 and s.mean_per_token == pytest.approx(11 / 6)
    assert s.share_first == {3: pytest.approx(7 / 11), 8: pytest.approx(1.0)}
    assert s.masked_share == pytest.approx(7 / 11)
    assert s.demonstration_independent_share == pytest.approx((1 + 3 + 0.5 + 0.5) / 11)
    assert s.first_shift_position == 1  # row 0 at position 1; row 1 never
    assert s.loss == pytest.approx(4.0)  # row 0 keeps position 3 only; row 1 keeps nothing (left out)
    assert s.by_position == pytest.approx([0.75, 1.25, 3.0, 4.0])
    assert s.shift_by_position == pytest.approx([0.0, 2.5, 0.4, 1.0])
    t = divergence_stats(div, None, skip=1, window=2, aggregation="token_mean")
    assert t.loss == pytest.approx((2 + 3 + 4 + 0.5) / 4)
    assert t.share_first == {1: pytest.approx(1.5 / 11), 2: pytest.approx(4 / 11)}
    assert t.demonstration_independent_share is None and t.first_shift_position is None


def test_copies_demonstration_and_openings_by_hand():
    q, d = "What is the capital of Zorbia?", "The capital of Zorbia is Quelmarsh."
    assert copies_demonstration("It is Quelmarsh!", d, q) is True
    assert copies_demonstration("The capital of Zorbia is unknown.", d, q) is False  # only the query's words
    assert copies_demonstration("Yes", "Yes.", "Is it?") is None  # nothing informative to copy
    assert top_openings(["ab", "cd", "ab", "x"]) == [Opening("ab", 2, 0.5), Opening("cd", 1, 0.25), Opening("x", 1, 0.25)]


# --------------------------------------------------------------------------- the verdict rules


def summary(*, student_acc=0.0, teacher_acc=0.9, finished=1.0, independent=0.2, first8=0.3, copy=None,
            teacher_p90=20, teacher_finished=1.0, first_position=5.0) -> ProbeSummary:
    def stats(acc, lengths):
        return AnswerStats(acc, 0 if acc is None else 10, lengths)

    ok_lengths = LengthStats(10, 1.0, 10.0, 10, 12, 12)
    return ProbeSummary(
        student_greedy=stats(student_acc, ok_lengths),
        student_sampled=stats(student_acc, LengthStats(10, finished, 10.0, 10, 12, 12)),
        teacher_greedy=stats(teacher_acc, ok_lengths),
        teacher_sampled=stats(teacher_acc, LengthStats(10, teacher_finished, 10.0, 10, teacher_p90, 40)),
        divergence=DivergenceStats(tokens=10, total=5.0, mean_per_token=0.5, loss=0.4, share_first={3: 0.1, 8: first8},
                                   masked_share=0.1, demonstration_independent_share=independent,
                                   first_shift_position=first_position, by_position=[], shift_by_position=None),
        teacher_openings_greedy=[], teacher_openings_sampled=[], teacher_copy_share=copy, student_copy_share=None)


def verdict(s: ProbeSummary, template: str = "paper") -> Verdict:
    return decide(s, template=template, max_new_tokens=40, skip=3, window=8)


def test_ok_when_every_rule_passes():
    v = verdict(summary())
    assert v.name == OK and v.ok and v.findings == [] and v.recommendations == []
    assert verdict(summary(student_acc=None, teacher_acc=None, copy=0.6)).name == OK  # no references: copying


@pytest.mark.parametrize("student_acc, teacher_acc, copy", [
    (0.0, 0.4, None),     # teacher below 50 %
    (0.5, 0.65, None),    # only 15 points over the student
    (None, None, 0.4),    # no references: too few answers use their demonstration
])
def test_in_context_learning_too_weak(student_acc, teacher_acc, copy):
    v = verdict(summary(student_acc=student_acc, teacher_acc=teacher_acc, copy=copy))
    assert v.name == ICL_TOO_WEAK and len(v.findings) == 1
    assert [(r.key, r.value) for r in v.recommendations] == [("prompts.teacher_template", "answer_directly")]
    assert verdict(summary(student_acc=0.5, teacher_acc=0.75)).name == OK  # 25 points over: enough


def test_truncation_dominates_and_the_suggested_length():
    v = verdict(summary(finished=0.8, teacher_p90=37))
    assert v.name == TRUNCATION_DOMINATES
    assert [(r.key, r.value) for r in v.recommendations] == [("rollout.max_new_tokens", 48)]  # 37 -> 48
    # the teacher's answers are cut off too: their length is unknown, double the limit
    v = verdict(summary(finished=0.8, teacher_finished=0.5))
    assert [(r.key, r.value) for r in v.recommendations] == [("rollout.max_new_tokens", 80)]
    assert verdict(summary(finished=0.9)).name == OK  # 90 % finishing is enough


def test_framing_dominates():
    v = verdict(summary(independent=0.6))
    assert v.name == FRAMING_DOMINATES
    assert [(r.key, r.value) for r in v.recommendations] == [("loss.skip_first_tokens", 5),
                                                             ("prompts.teacher_template", "answer_directly")]
    v = verdict(summary(independent=0.6, first_position=2.0), template="answer_directly")
    assert [(r.key, r.value) for r in v.recommendations] == [("prompts.teacher_template", "context_first")]
    # no demonstration (no shift measured): the share in the first 8 tokens decides
    v = verdict(summary(independent=None, first_position=None, first8=0.7))
    assert v.name == FRAMING_DOMINATES and v.recommendations[0].value == 8
    assert verdict(summary(independent=None, first_position=None, first8=0.5)).name == OK


def test_every_failing_rule_is_listed_and_the_first_names_the_verdict():
    v = verdict(summary(teacher_acc=0.1, finished=0.2, independent=0.9))
    assert v.name == ICL_TOO_WEAK and len(v.findings) == 3
    assert [r.key for r in v.recommendations] == ["prompts.teacher_template", "rollout.max_new_tokens",
                                                  "loss.skip_first_tokens"]
    assert verdict(summary(finished=0.2, independent=0.9)).name == TRUNCATION_DOMINATES


def test_choose_rows_is_a_deterministic_sorted_sample():
    rows = choose_rows(300, 32, seed=0)
    assert rows == sorted(set(rows)) and len(rows) == 32 and all(0 <= r < 300 for r in rows)
    assert rows == choose_rows(300, 32, seed=0) and rows != choose_rows(300, 32, seed=1)
    assert choose_rows(5, 32, seed=0) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- the tiny model, by hand


def write_data(path: Path, answers: list[str] | None = None, n: int = 6) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            country, capital = FACTS[i]
            row = {"prompt": f"What is the capital of {country}?", "demonstration": f"The capital of {country} is {capital}.",
                   "answer": capital if answers is None else answers[i]}
            fh.write(json.dumps(row) + "\n")
    return path


def probe_config(model_dir, data, out, **sections):
    sections.setdefault("rollout", {})
    sections["rollout"] = {"max_new_tokens": MAX_NEW, "batch_size": 4, **sections["rollout"]}
    sections.setdefault("teacher", {"micro_batch_size": 3})  # padded micro-batches of unequal lengths
    return tiny_config(model_dir, data, out, **sections)


@pytest.fixture(scope="module")
def probed(tiny_model_dir, tmp_path_factory, single_thread):
    folder = tmp_path_factory.mktemp("probe")
    cfg = probe_config(tiny_model_dir, write_data(folder / "facts.jsonl"), folder / "run")
    lines: list[str] = []
    return cfg, run_probe(cfg, num_examples=5, echo=lines.append), lines


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny model in float64 and float32, its tokenizer, and per-position log-probs by a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model64 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    model32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def ids(user_turn: str) -> list[int]:
        text = tok.apply_chat_template([{"role": "user", "content": user_turn}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logprobs(prompt: list[int], response: list[int]) -> torch.Tensor:
        """[T, V] float64: log-probs predicting each response token, one unpadded sequence."""
        logits = model64(torch.tensor([prompt + response])).logits[0]
        return logits[len(prompt) - 1: len(prompt) - 1 + len(response)].log_softmax(-1)

    @torch.no_grad()
    def greedy(prompt: list[int]) -> list[int]:
        out: list[int] = []
        for _ in range(MAX_NEW):
            nxt = int(model32(torch.tensor([prompt + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
        return out

    return tok, ids, logprobs, greedy


def kl_loop(p_logp: torch.Tensor, q_logp: torch.Tensor) -> list[float]:
    """KL(p || q) per position, a float64 loop over positions."""
    out = []
    for t in range(p_logp.shape[0]):
        p, lp, lq = p_logp[t].exp().tolist(), p_logp[t].tolist(), q_logp[t].tolist()
        out.append(math.fsum(pi * (a - b) for pi, a, b in zip(p, lp, lq) if pi > 0))
    return out


def by_hand(rows, reference):
    """Per row: the divergence and the shift, from plain forwards of the hand-built prompts."""
    tok, ids, logprobs, _ = reference
    demos = {r.index: r.demonstration for r in rows}
    out = []
    for r in rows:
        response = r.student_sampled.token_ids
        student = logprobs(ids(r.prompt), response)
        teacher = logprobs(ids(PAPER.format(q=r.prompt, d=r.demonstration)), response)
        other = logprobs(ids(PAPER.format(q=r.prompt, d=demos[r.other_index])), response)
        out.append((kl_loop(teacher, student), kl_loop(teacher, other)))
    return out


def test_rows_prompts_and_greedy_answers(probed, reference):
    cfg, report, lines = probed
    tok, ids, _, greedy = reference
    rows = report.rows
    indices = [r.index for r in rows]
    assert len(rows) == 5 and indices == sorted(set(indices)) and all(0 <= i < 6 for i in indices)
    assert report.settings["rows"] == indices and report.settings["teacher_template"] == "paper"
    data = [json.loads(x) for x in Path(cfg.data.path).read_text().splitlines()]
    others = [r.other_index for r in rows]
    assert sorted(others) == indices and all(o != i for o, i in zip(others, indices))  # a derangement
    for r in rows:
        assert (r.prompt, r.demonstration, r.reference) == (data[r.index]["prompt"], data[r.index]["demonstration"],
                                                            data[r.index]["answer"])
        assert r.student_greedy.token_ids == greedy(ids(r.prompt))
        assert r.teacher_greedy.token_ids == greedy(ids(PAPER.format(q=r.prompt, d=r.demonstration)))
        for a in (r.student_greedy, r.student_sampled, r.teacher_greedy, r.teacher_sampled):
            assert 1 <= len(a.token_ids) <= MAX_NEW
            assert a.finished == (a.token_ids[-1] == tok.eos_token_id)
            assert tok.eos_token_id not in a.token_ids[:-1]
            assert a.text == tok.decode(a.token_ids, skip_special_tokens=True).strip()
    assert any("student sampled 4/5" in line for line in lines) and any("5/5" in line for line in lines)  # progress


def test_divergence_and_shift_match_a_float64_loop(probed, reference):
    _, report, _ = probed
    for r, (divergence, shift) in zip(report.rows, by_hand(report.rows, reference)):
        assert len(r.divergence) == len(r.student_sampled.token_ids)
        assert r.divergence == pytest.approx(divergence, rel=1e-4, abs=1e-5)
        assert r.shift == pytest.approx(shift, rel=1e-4, abs=1e-5)
        assert max(shift) > 0.01  # the demonstration matters to this teacher: the check is not vacuous


def test_summary_numbers_by_hand(probed, reference):
    _, report, _ = probed
    rows, s = report.rows, report.summary
    hand = by_hand(rows, reference)
    divs = [d for d, _ in hand]
    total = math.fsum(x for d in divs for x in d)
    d = s.divergence
    assert d.tokens == sum(len(x) for x in divs) and d.total == pytest.approx(total, rel=1e-4)
    assert d.share_first[3] == pytest.approx(math.fsum(x for dd in divs for x in dd[:3]) / total, rel=1e-4)
    assert d.share_first[8] == pytest.approx(1.0)  # every answer is at most 6 tokens
    assert d.masked_share == d.share_first[3]
    kept = [dd[3:] for dd in divs if len(dd) > 3]
    assert d.loss == pytest.approx(statistics.fmean(statistics.fmean(k) for k in kept), rel=1e-4)
    small_mass = 0.0
    for dd, (_, shift) in zip(divs, hand):
        top = max(shift)
        small_mass += math.fsum(x for x, sh in zip(dd, shift) if sh < 0.1 * top)
    assert d.demonstration_independent_share == pytest.approx(small_mass / total, rel=1e-3, abs=1e-4)
    assert d.by_position[0] == pytest.approx(statistics.fmean(dd[0] for dd in divs), rel=1e-4)
    for name in ("student_greedy", "student_sampled", "teacher_greedy", "teacher_sampled"):
        answers = [getattr(r, name) for r in rows]
        lengths = sorted(len(a.token_ids) for a in answers)
        got = getattr(s, name).lengths
        assert got.finished_share == sum(a.finished for a in answers) / 5
        assert (got.mean, got.p50, got.p90, got.max) == (sum(lengths) / 5, lengths[2], lengths[4], lengths[4])
    tok = reference[0]
    for answers, got in (("teacher_greedy", s.teacher_openings_greedy), ("teacher_sampled", s.teacher_openings_sampled)):
        openings = Counter(tok.decode(getattr(r, answers).token_ids[:3]) for r in rows)
        assert [(o.text, o.count, o.share) for o in got] == [(t, c, c / 5) for t, c in openings.most_common(5)]
    copied = [any(w in normalize_text(r.teacher_greedy.text).split() for w in normalize_text(r.demonstration).split()
                  if len(w) >= 4 and w not in normalize_text(r.prompt).split()) for r in rows]
    assert s.teacher_copy_share == sum(copied) / 5


def test_accuracy_against_references_counted_by_hand(probed, tiny_model_dir, tmp_path):
    """References copied from half the teacher's greedy answers: those rows (and only rows whose answer
    has that word) count as correct."""
    cfg, first, _ = probed
    answers = ["zzqqxx"] * 6
    for j, r in enumerate(first.rows):
        words = [w for w in normalize_text(r.teacher_greedy.text).split() if w.isalpha()]
        if j % 2 == 0 and words:
            answers[r.index] = words[0]
    cfg2 = probe_config(tiny_model_dir, write_data(tmp_path / "refs.jsonl", answers), tmp_path / "run")
    report = run_probe(cfg2, num_examples=5, echo=lambda _: None)
    assert [r.index for r in report.rows] == [r.index for r in first.rows]
    for name in ("student_greedy", "student_sampled", "teacher_greedy", "teacher_sampled"):
        hits = [answers[r.index] in normalize_text(getattr(r, name).text).split() for r in report.rows]
        stats = getattr(report.summary, name)
        assert stats.accuracy == sum(hits) / 5 and stats.n_references == 5
    assert report.summary.teacher_greedy.accuracy >= sum(a != "zzqqxx" for a in answers) / 5 > 0


def test_the_loss_alpha_is_the_configured_divergence(tiny_model_dir, tmp_path, reference):
    """Reverse KL (alpha 1) is KL(student || teacher), per position."""
    cfg = probe_config(tiny_model_dir, write_data(tmp_path / "f.jsonl"), tmp_path / "run", loss={"alpha": 1.0})
    report = run_probe(cfg, num_examples=2, echo=lambda _: None)
    _, ids, logprobs, _ = reference
    for r in report.rows:
        response = r.student_sampled.token_ids
        student = logprobs(ids(r.prompt), response)
        teacher = logprobs(ids(PAPER.format(q=r.prompt, d=r.demonstration)), response)
        assert r.divergence == pytest.approx(kl_loop(student, teacher), rel=1e-4, abs=1e-5)


def test_json_holds_every_number_printed(probed):
    cfg, report, _ = probed
    path = Path(cfg.output.dir) / "probe.json"
    assert report.path == str(path)
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(report.to_dict(), default=str))
    assert saved["verdict"]["name"] == report.verdict.name and len(saved["rows"]) == 5
    assert saved["rows"][0]["divergence"] == report.rows[0].divergence


def test_a_reference_the_metric_cannot_read_is_a_data_error(tiny_model_dir, tmp_path):
    from sdft_ray.errors import DataError

    data = write_data(tmp_path / "f.jsonl")
    rows = data.read_text().splitlines()
    rows[1] = json.dumps({**json.loads(rows[1]), "answer": {"city": "Tirrik"}})
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        run_probe(probe_config(tiny_model_dir, data, tmp_path / "run"), num_examples=6, echo=lambda _: None)
    assert err.value.row == 1 and err.value.field == "answer" and "f.jsonl" in str(err.value)


# --------------------------------------------------------------------------- the gate


def test_gate_off_does_nothing(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import sdft_ray.probe

    monkeypatch.setattr(sdft_ray.probe, "run_probe", lambda *a, **k: pytest.fail("the probe must not run"))
    assert gate_run(tiny_config(tiny_model_dir, tiny_data, tmp_path)) is None


def test_gate_warn_logs_and_error_raises_before_ray(tiny_model_dir, tiny_data, tmp_path, monkeypatch, caplog):
    import sdft_ray.runner

    def no_ray(cfg):
        raise AssertionError("Ray started")

    monkeypatch.setattr(sdft_ray.runner, "init_ray", no_ray)
    # Two new tokens: the tiny model's samples never finish, so the verdict cannot be ok.
    warn = tiny_config(tiny_model_dir, tiny_data, tmp_path / "w", rollout={"max_new_tokens": 2}, loss={"skip_first_tokens": 1},
                       probe={"gate": "warn", "num_examples": 3})
    with caplog.at_level(logging.WARNING, logger="sdft_ray"), pytest.raises(AssertionError, match="Ray started"):
        sdft_ray.runner.train(warn)  # the probe ran and warned, then training went on to start Ray
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe verdict")]
    assert len(logged) == 1 and "rollout.max_new_tokens" in logged[0]
    assert (tmp_path / "w" / "probe.json").is_file()
    error = tiny_config(tiny_model_dir, tiny_data, tmp_path / "e", rollout={"max_new_tokens": 2}, loss={"skip_first_tokens": 1},
                        probe={"gate": "error", "num_examples": 3})
    with pytest.raises(ConfigError) as err:
        sdft_ray.runner.train(error)
    assert err.value.field == "probe.gate" and "probe.gate" in str(err.value)
    assert json.loads((tmp_path / "e" / "probe.json").read_text())["verdict"]["name"] in str(err.value)


def test_gate_error_passes_an_ok_verdict(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import sdft_ray.probe

    fine = ProbeReport(settings={}, summary=None, verdict=Verdict(OK), rows=[], seconds=0.0)
    monkeypatch.setattr(sdft_ray.probe, "run_probe", lambda *a, **k: fine)
    assert gate_run(tiny_config(tiny_model_dir, tiny_data, tmp_path, probe={"gate": "error"})) is fine


# --------------------------------------------------------------------------- the command line


def test_cli_prints_the_table_and_writes_the_json(tiny_model_dir, tiny_data, tmp_path, capsys):
    from sdft_ray.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)}, "data": {"path": str(tiny_data)},
                                      "rollout": {"max_new_tokens": 4}, "output": {"dir": str(tmp_path / "run")}}))
    out = tmp_path / "report.json"
    assert main(["probe", str(config), "--num-examples", "3", "--out", str(out),
                 "--set", "prompts.teacher_template=trl"]) == 0
    printed = capsys.readouterr()
    saved = json.loads(out.read_text())
    assert "teacher greedy" in printed.out and "verdict: " + saved["verdict"]["name"] in printed.out
    assert "share in the first 3 tokens" in printed.out and "openings" in printed.out
    assert "probe: student greedy 3/3" in printed.err  # progress on stderr
    assert len(saved["rows"]) == 3 and saved["settings"]["teacher_template"] == "trl"
    assert saved["settings"]["teacher_template_text"] == "{prompt}\n\n{demonstration}"


@pytest.mark.parametrize("args, field", [
    (["--set", "probe.gate=sometimes"], "probe.gate"),
    (["--num-examples", "1"], "probe.num_examples"),
    (["--set", "prompts.teacher_template=papr"], "prompts.teacher_template"),
    (["--set", "algorithm.variant=sft"], "algorithm.variant"),  # no teacher to probe
])
def test_cli_bad_value_names_the_field(args, field, capsys):
    from sdft_ray.cli import main

    assert main(["probe", *args]) == 2
    assert field in capsys.readouterr().err
