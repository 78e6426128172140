"""output.show_answers: the base model's and the trained model's greedy answers side by side,
checked against transformers' own greedy generation, one prompt at a time."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from conftest_tokenizer import make_test_tokenizer
from sdft_ray.answers import AnswerPair, answer_pairs, format_answers, show_answers
from sdft_ray.errors import ConfigError


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A second tiny model, other weights (stands for the trained student)."""
    from sdft_ray.models import build_random_model

    return build_random_model(tmp_path_factory.mktemp("other_model"), make_test_tokenizer(), seed=7,
                              initializer_range=0.3)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _hf_greedy(folder, question: str, max_new_tokens: int) -> str:
    """Independent oracle: the chat-templated question, transformers' generate, no batching."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_answers_are_each_models_greedy_answers(tiny_model_dir, other_model_dir, tiny_data, tmp_path, single_thread):
    prior = _write(tmp_path / "prior.jsonl", [{"question": "Name a colour.", "answer": "red"},
                                              {"question": "What is two plus two?"},
                                              {"question": "never shown"}])
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run",
                      output={"show_answers": {"trained": 2, "prior": 2, "prior_path": str(prior),
                                               "prompt_column": "question", "max_new_tokens": 6}})
    pairs = answer_pairs(cfg, tiny_model_dir, other_model_dir)
    questions = [json.loads(line)["prompt"] for line in tiny_data.read_text().splitlines()[:2]]
    questions += ["Name a colour.", "What is two plus two?"]
    assert [(p.group, p.question) for p in pairs] == [("trained", q) for q in questions[:2]] + \
        [("prior", q) for q in questions[2:]]
    for p, q in zip(pairs, questions):
        assert p.before == _hf_greedy(tiny_model_dir, q, 6)
        assert p.after == _hf_greedy(other_model_dir, q, 6)
    assert pairs[0].before != pairs[0].after  # two different models: the comparison shows something
    # references: the tiny data has none; the prior file's first row has one
    assert [p.reference for p in pairs] == [None, None, "red", None]
    assert pairs[2].before_correct is False and pairs[3].after_correct is None


def test_an_answer_containing_its_reference_is_marked_correct(tiny_model_dir, tiny_data, tmp_path, single_thread):
    question = "Name a colour."
    answer = _hf_greedy(tiny_model_dir, question, 6)
    word = next(w for w in answer.split() if w.isalnum())  # a whole word of the model's own answer
    prior = _write(tmp_path / "prior.jsonl", [{"prompt": question, "answer": word},
                                              {"prompt": question, "answer": "zzqx"}])
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run",
                      output={"show_answers": {"prior": 2, "prior_path": str(prior), "max_new_tokens": 6}})
    pairs = answer_pairs(cfg, tiny_model_dir, tiny_model_dir)
    assert [(p.before_correct, p.after_correct) for p in pairs] == [(True, True), (False, False)]


def test_show_answers_writes_the_file_and_skips_without_a_checkpoint(tiny_model_dir, other_model_dir, tiny_data,
                                                                      tmp_path, single_thread):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    (checkpoint).mkdir(parents=True)
    (checkpoint / "student").symlink_to(other_model_dir, target_is_directory=True)
    cfg = tiny_config(tiny_model_dir, tiny_data, tmp_path / "run",
                      output={"show_answers": {"trained": 1, "max_new_tokens": 4}})
    text = show_answers(cfg, {"latest_checkpoint": str(checkpoint)})
    saved = json.loads((tmp_path / "run" / "answers.json").read_text())
    assert len(saved) == 1 and saved[0]["after"] == _hf_greedy(other_model_dir, saved[0]["question"], 4)
    assert text.splitlines()[0].startswith("Answers before -> after training") and saved[0]["question"] in text
    assert show_answers(cfg, {"latest_checkpoint": None}) is None
    off = tiny_config(tiny_model_dir, tiny_data, tmp_path / "off")
    assert show_answers(off, {"latest_checkpoint": str(checkpoint)}) is None


def test_format_marks_and_cuts():
    pairs = [AnswerPair("trained", "Capital of Zorbia?", "Quelmarsh", "I do not know.", "It is Quelmarsh.",
                        False, True),
             AnswerPair("prior", "Say " + "a" * 300, None, "x", "y", None, None)]
    lines = format_answers(pairs, 64, width=40).splitlines()
    assert lines[1] == "[trained] Capital of Zorbia?  (reference: Quelmarsh)"
    assert lines[2] == "  before: I do not know.  [wrong]" and lines[3] == "  after:  It is Quelmarsh.  [correct]"
    assert lines[4] == "[prior] Say " + "a" * 33 + "..." and lines[5] == "  before: x"


def test_prior_answers_need_a_file(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="show_answers.prior_path"):
        tiny_config(tiny_model_dir, tiny_data, tmp_path, output={"show_answers": {"prior": 3}})
