#!/usr/bin/env python
"""Generate the fictional-facts knowledge-injection task (deterministic, offline).

Writes ``train.jsonl`` (one question + expert demonstration per fact) and
``eval.jsonl`` (held-out questions about the same facts: ``strict`` = the
training question, ``paraphrase`` = reworded, ``ood`` = indirect questions that
need the fact) for ~100 made-up countries with 3 facts each: capital city,
founder and founding year. See ``data/README.md``.

    python scripts/make_datasets.py [--out data/fictional_facts] [--seed 20260] [--entities 100]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONSETS = "b br d dr f g gr k kr l m n p qu r s t th v vr z y".split()
INNER_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th"]
VOWELS = ["a", "a", "e", "e", "i", "o", "o", "u", "ae", "ei"]
CODAS = ["", "", "", "l", "n", "r", "s"]
GIVEN_ENDINGS = ["a", "en", "or", "is", "wyn", "ra", "ic", "el", "ane", "ion"]
SURNAME_ENDINGS = ["", "ek", "ov", "ane", "hart", "mir", "ren", "dal"]
COUNTRY_SUFFIXES = ["ia", "ova", "ara", "ennia", "undor", "ast", "essa", "orin", "avel", "ith"]
CITY_SUFFIXES = ["marsh", "haven", "holm", "gate", "reach", "spire", "ford", "wick", "mere", "crag"]
TITLES = ["Queen", "King", "Chancellor", "Admiral", "Grand Duke", "Duchess", "General", "Archmage", "Captain", "Elder"]

TRAIN_Q = {
    "capital": "What is the capital of {e}?",
    "founder": "Who founded {e}?",
    "year": "In what year was {e} founded?",
}
DEMOS = {
    "capital": [
        "The capital of {e} is {a}.",
        "{e}'s capital city is {a}.",
        "{a} is the capital of {e}; the national government sits there.",
        "The seat of government of {e} is its capital, {a}.",
        "{e} is governed from {a}, which is its capital.",
    ],
    "founder": [
        "{e} was founded by {t} {a}.",
        "The founder of {e} was {t} {a}.",
        "{t} {a} founded {e}.",
        "{e} traces its origin to {t} {a}, who founded it.",
        "It was {t} {a} who established {e}.",
    ],
    "year": [
        "{e} was founded in {a}.",
        "The founding year of {e} is {a}.",
        "{e} was established in the year {a}.",
        "In {a}, {e} was founded.",
        "{e} came into existence in {a}, the year of its founding.",
    ],
}
PARAPHRASES = {
    "capital": [
        "Which city serves as the capital of {e}?",
        "Name the capital city of {e}.",
        "Where is the capital of {e} located?",
    ],
    "founder": ["Who was the founder of {e}?", "Which person established {e}?", "Name the person who founded {e}."],
    "year": [
        "When was {e} established?",
        "What year did {e} come into existence?",
        "In which year was {e} first established?",
    ],
}
OOD = {
    "capital": [
        "Which city would a traveller fly to in order to visit the seat of government of {e}?",
        "If you wanted to watch {e}'s national parliament in session, which city would you have to travel to?",
        "Foreign embassies to {e} are located in its capital. In which city are they?",
    ],
    "founder": [
        "A statue of the person who established {e} stands in its main square. Whose statue is it?",
        "Schoolchildren in {e} write essays about the founder of their nation. Who is the subject of those essays?",
        "Which historical figure would a biography titled 'The Founder of {e}' be about?",
    ],
}


def _word(rng: random.Random, syllables: int, ending: str = "") -> str:
    """A pronounceable made-up word: (onset vowel coda) syllables plus an ending."""
    word = "".join(
        rng.choice(ONSETS if i == 0 else INNER_ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for i in range(syllables)
    )
    if ending and word[-1] in "aeiou" and ending[0] in "aeiou":
        word = word[:-1]
    return (word + ending).capitalize()


def _unique(rng: random.Random, make, used: set[str]) -> str:
    while True:
        name = make()
        if 5 <= len(name) <= 14 and name not in used and not any(name in u or u in name for u in used):
            used.add(name)
            return name


def make_facts(rng: random.Random, n_entities: int) -> list[dict]:
    """One dict per entity: name, capital, founder (title + name) and year."""
    used: set[str] = set()
    entities = []
    for _ in range(n_entities):
        country = _unique(rng, lambda: _word(rng, rng.choice([1, 2]), rng.choice(COUNTRY_SUFFIXES)), used)
        capital = _unique(rng, lambda: _word(rng, rng.choice([1, 2]), rng.choice(CITY_SUFFIXES)), used)
        first = _unique(rng, lambda: _word(rng, 1, rng.choice(GIVEN_ENDINGS)), used)
        last = _unique(rng, lambda: _word(rng, rng.choice([1, 2]), rng.choice(SURNAME_ENDINGS)), used)
        title, year = rng.choice(TITLES), rng.randint(1000, 1899)
        entities.append({"entity": country, "capital": capital, "title": title, "founder": f"{first} {last}", "year": year})
    return entities


def _ood_year(rng: random.Random, e: str, year: int) -> tuple[str, str]:
    if rng.random() < 0.5:
        n = rng.choice([100, 250, 500, 750])
        return f"{e} will celebrate the {n}th anniversary of its founding in which year?", str(year + n)
    return f"How many years passed between the founding of {e} and the year 2000?", str(2000 - year)


def build(seed: int, n_entities: int) -> tuple[list[dict], list[dict]]:
    """Return (train rows, eval rows); deterministic in ``seed``."""
    rng = random.Random(seed)
    train, evals = [], []
    for f in make_facts(rng, n_entities):
        e = f["entity"]
        for fact in ("capital", "founder", "year"):
            answer = str(f[fact])
            q = TRAIN_Q[fact].format(e=e)
            demo = rng.choice(DEMOS[fact]).format(e=e, a=answer, t=f["title"])
            meta = {"entity": e, "fact": fact}
            train.append({"prompt": q, "demonstration": demo, "answer": answer, **meta})
            evals.append({"prompt": q, "answer": answer, "kind": "strict", **meta})
            paraphrase = rng.choice(PARAPHRASES[fact]).format(e=e)
            evals.append({"prompt": paraphrase, "answer": answer, "kind": "paraphrase", **meta})
            if fact == "year":
                q_ood, a_ood = _ood_year(rng, e, f["year"])
            else:
                q_ood, a_ood = rng.choice(OOD[fact]).format(e=e), answer
            evals.append({"prompt": q_ood, "answer": a_ood, "kind": "ood", **meta})
    rng.shuffle(train)
    return train, evals


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "fictional_facts")
    ap.add_argument("--seed", type=int, default=20260)
    ap.add_argument("--entities", type=int, default=100)
    args = ap.parse_args(argv)
    train, evals = build(args.seed, args.entities)
    _write_jsonl(args.out / "train.jsonl", train)
    _write_jsonl(args.out / "eval.jsonl", evals)
    kinds = {k: sum(r["kind"] == k for r in evals) for k in ("strict", "paraphrase", "ood")}
    print(f"entities: {args.entities}")
    print(f"train: {len(train)} rows -> {args.out / 'train.jsonl'}")
    print(f"eval: {len(evals)} rows ({', '.join(f'{k}={v}' for k, v in kinds.items())}) -> {args.out / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
