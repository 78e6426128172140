"""The fact log-likelihood (sdft_ray/evaluation/knowledge.py, sdft_ray/study/fact_likelihood.py).

Span positions are checked against hand-decoded tokens; log-probabilities against a float64 loop
that feeds one unpadded prefix at a time; the summary against hand-worked numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sdft_ray.evaluation.knowledge import FactProbe, answer_token_logprobs, answer_token_span
from sdft_ray.evaluation.stats import difference_interval
from sdft_ray.study.fact_likelihood import summarize


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, single_thread):
    from sdft_ray.models import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir, "float32").eval(), load_tokenizer(tiny_model_dir)


def test_span_covers_exactly_the_answer_tokens(tiny):
    _, tok = tiny
    text = "The capital of Zorbia is Quelmarsh, said Quelmarsh's mayor."
    ids, (first, end) = answer_token_span(tok, text, "Quelmarsh")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    # the last occurrence; the decoded span is the answer (with at most the leading space of its word)
    assert tok.decode(ids[first:end]).strip() == "Quelmarsh"
    assert tok.decode(ids[:first]).rstrip().endswith("said")
    assert tok.decode(ids[end:]).startswith("'s")


def test_span_refuses_an_answer_not_in_the_text(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="'186' does not occur in 'The founding year of Daeldorin is 1814.'"):
        answer_token_span(tok, "The founding year of Daeldorin is 1814.", "186")
    with pytest.raises(ValueError, match="'Rome' does not occur in 'Romeo was here.' \\(as a whole word\\)"):
        answer_token_span(tok, "Romeo was here.", "Rome")
    ids, (first, end) = answer_token_span(tok, "Romeo left Rome.", "Rome")
    assert tok.decode(ids[first:end]).strip() == "Rome" and tok.decode(ids[end:]) == "."


def _chat(tok, question):
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def test_token_logprobs_match_a_float64_loop(tiny):
    model, tok = tiny
    cases = [("What is the capital of Zorbia?", "The capital of Zorbia is Quelmarsh.", "Quelmarsh"),
             ("Who founded Brosponia?", "Brosponia was founded by Thawyn Vrelgamir in a long year.", "Thawyn Vrelgamir"),
             ("Year?", "1723", "1723")]  # the answer is the whole response: its first token follows the prompt
    probes = []
    for question, demo, answer in cases:
        ids, span = answer_token_span(tok, demo, answer)
        probes.append(FactProbe(_chat(tok, question), tuple(ids), span))
    got = answer_token_logprobs(model, probes, tok.pad_token_id, batch_size=2)  # padded batches of unequal length

    ref_model = copy.deepcopy(model).double()
    for probe, values in zip(probes, got):
        expected = []
        for t in range(*probe.span):
            prefix = torch.tensor([list(probe.prompt_ids) + list(probe.response_ids[:t])])
            with torch.no_grad():
                logp = ref_model(input_ids=prefix).logits[0, -1].log_softmax(-1)
            expected.append(float(logp[probe.response_ids[t]]))
        assert len(values) == probe.span[1] - probe.span[0]
        assert values == pytest.approx(expected, abs=2e-4)


def test_a_span_outside_the_response_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"probe 0: span \(2, 9\) is not within its 3 response tokens"):
        answer_token_logprobs(model, [FactProbe((1, 2), (5, 6, 7), (2, 9))], tok.pad_token_id)


def test_welch_difference_matches_the_formula_by_hand():
    a, b = [1.0, 2.0, 4.0, 7.0], [0.0, 1.0, 1.0]
    got, p = difference_interval(a, b)
    # by hand: means 3.5 and 2/3; variances 7 and 1/3; se^2 = 7/4 + 1/9; Welch-Satterthwaite df
    va, vb = 7.0 / 4, (1.0 / 3) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    from scipy.stats import t as student_t

    half = student_t.ppf(0.975, df) * math.sqrt(va + vb)
    assert got.mean == pytest.approx(3.5 - 2 / 3)
    assert (got.low, got.high) == pytest.approx((3.5 - 2 / 3 - half, 3.5 - 2 / 3 + half))
    stat = (3.5 - 2 / 3) / math.sqrt(va + vb)
    assert p == pytest.approx(2 * student_t.sf(stat, df))
    assert math.isnan(difference_interval([1.0], [2.0, 3.0])[0].low)


def _row(model, group, index, entity, kind, logprob, first):
    return {"model": model, "group": group, "index": index, "entity": entity, "fact": "capital", "kind": kind,
            "logprob": logprob, "first": first, "rest": logprob - first}


def test_summary_trained_minus_control_and_facts_as_units():
    rows = []
    for model, gain in (("base", 0.0), ("sdft", 1.0)):
        # two trained facts (A, B) and two control facts (C, D), two questions each
        for index, (group, entity, kind, lp) in enumerate([
                ("trained", "A", "strict", -30.0), ("trained", "A", "paraphrase", -28.0),
                ("trained", "B", "strict", -20.0), ("trained", "B", "paraphrase", -22.0)]):
            bump = {"A": 4.0, "B": 2.0}[entity] * gain + (1.0 if kind == "paraphrase" else 0.0) * gain
            rows.append(_row(model, group, index, entity, kind, lp + bump, -5.0 + gain))
        for index, (entity, kind, lp) in enumerate([("C", "strict", -25.0), ("C", "paraphrase", -26.0),
                                                    ("D", "strict", -24.0), ("D", "paraphrase", -23.0)]):
            rows.append(_row(model, "control", index, entity, kind, lp + 0.5 * gain, -6.0))
    by = {(s["model"], s["kind"]): s for s in summarize(rows)}
    strict = by[("sdft", "strict")]
    # trained strict gains: A +4, B +2 -> mean 3; control +0.5 -> trained minus control 2.5
    assert strict["trained_logprob_delta"] == pytest.approx(3.0)
    assert strict["control_logprob_delta"] == pytest.approx(0.5)
    assert strict["logprob_trained_minus_control"] == pytest.approx(2.5)
    # the first token moved +1 on trained facts, 0 on control; the rest carries the remainder
    assert strict["first_trained_minus_control"] == pytest.approx(1.0)
    assert strict["rest_trained_minus_control"] == pytest.approx(1.5)
    # kind "all": one unit per fact (mean over its questions), not per question
    pooled = by[("sdft", "all")]
    assert pooled["trained_n"] == 2 and pooled["control_n"] == 2
    # A: (+4, +5) -> 4.5; B: (+2, +3) -> 2.5; mean 3.5
    assert pooled["trained_logprob_delta"] == pytest.approx(3.5)
    assert by[("base", "all")]["logprob_trained_minus_control"] == 0.0


def test_cached_scores_follow_new_weights_at_the_same_path(tiny, tmp_path):
    """A study rerun retrains a changed run into the same folder: the cache must not answer for
    the old weights (it is keyed by the weights files, not only the folder's path)."""
    from pathlib import Path

    from sdft_ray.study.fact_likelihood import _scores

    model, tok = tiny
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ids, span = answer_token_span(tok, "The capital of Zorbia is Quelmarsh.", "Quelmarsh")
    probes = [FactProbe(_chat(tok, "What is the capital of Zorbia?"), tuple(ids), span)]
    cache = Path(tmp_path / "cache.json")
    first = _scores(str(folder), probes, cache, "float32", 4)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.5)
    changed.save_pretrained(folder)  # the retrained run, same path
    second = _scores(str(folder), probes, cache, "float32", 4)
    expected = answer_token_logprobs(changed, probes, tok.pad_token_id)
    assert second[0] == pytest.approx(expected[0], abs=1e-5) and second[0] != pytest.approx(first[0], abs=1e-3)
