#!/usr/bin/env python
"""Generate the bundled evaluation tasks (deterministic, offline).

* ``data/tool_calls/{train,eval}.jsonl`` -- a new skill with a checkable format: answer a
  user request by replying with one JSON call to one of three fictional API functions
  described in the prompt. Eval rows use held-out cities/restaurants and amounts; half of
  them use the training phrasings (``kind: seen_phrasing``), half new ones (``new_phrasing``).
* ``data/prior/eval.jsonl`` -- very easy general-knowledge questions that the base model
  (SmolLM2-135M-Instruct) already answers: a forgetting probe, scored with ``contains``.

See ``data/tool_calls/README.md`` and ``data/prior/README.md``.

    python scripts/make_eval_tasks.py [--out data] [--seed 20261]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOOLS_DESCRIPTION = """You can call these functions:
- get_weather(city: string, unit: "celsius" | "fahrenheit"): current weather in a city. Use "celsius" unless the user asks for Fahrenheit.
- convert_currency(amount: number, from: string, to: string): convert money. Currencies are three-letter ISO codes such as "USD", "EUR" or "JPY".
- book_table(restaurant: string, people: integer, time: string): reserve a restaurant table. time is 24-hour "HH:MM".

Reply with a single JSON object of the form {"name": "<function>", "arguments": {...}} and nothing else."""

TRAIN_CITIES = ["Lisbon", "Oslo", "Nairobi", "Toronto", "Madrid", "Seoul", "Cairo", "Dublin", "Lima", "Vienna",
                "Mumbai", "Sydney", "Chicago", "Prague", "Bangkok", "Helsinki", "Athens", "Denver"]
EVAL_CITIES = ["Zurich", "Hanoi", "Bogota", "Warsaw", "Marseille", "Osaka", "Accra", "Glasgow", "Santiago", "Perth"]
CURRENCIES = [("US dollars", "USD"), ("euros", "EUR"), ("Japanese yen", "JPY"), ("British pounds", "GBP"),
              ("Swiss francs", "CHF"), ("Canadian dollars", "CAD"), ("Australian dollars", "AUD"),
              ("Indian rupees", "INR"), ("Mexican pesos", "MXN"), ("Swedish kronor", "SEK")]
TRAIN_RESTAURANTS = ["Luigi's Trattoria", "The Copper Kettle", "Sakura House", "Blue Fig", "Casa Lupita",
                     "The Old Mill", "Golden Lotus", "Harbor Grill", "Le Petit Jardin", "Spice Route"]
EVAL_RESTAURANTS = ["Olive & Thyme", "The Red Lantern", "Nordic Table", "Mama Rosa's", "Saffron Lounge",
                    "The Salty Pier"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]

WEATHER = {
    "seen": [
        "What's the weather like in {city} right now?",
        "Can you check the current weather in {city}?",
        "I'm heading to {city} today. How is the weather there?",
        "Tell me the weather in {city} in Fahrenheit.",
        "What is the temperature in {city}? Please give it in Fahrenheit.",
        "Weather in {city}, in degrees Celsius please.",
    ],
    "new": [
        "Is it cold in {city} at the moment?",
        "Look up today's conditions in {city} for me, Fahrenheit please.",
        "Do I need an umbrella in {city} right now?",
        "How warm is it in {city}? I only understand Fahrenheit.",
    ],
}
CURRENCY = {
    "seen": [
        "How much is {amount} {src} in {dst}?",
        "Convert {amount} {src} to {dst}.",
        "I have {amount} {src}. What is that in {dst}?",
        "Please change {amount} {src} into {dst}.",
    ],
    "new": [
        "If I exchange {amount} {src}, how many {dst} will I get?",
        "What would {amount} {src} be worth in {dst}?",
        "My bill says {amount} {src}; how much is that in {dst}?",
    ],
}
BOOKING = {
    "seen": [
        "Book a table at {restaurant} for {people} at {time}.",
        "Reserve a table for {people} people at {restaurant}, {time}.",
        "Can you get us a table at {restaurant} at {time}? We are {people}.",
        "I'd like a reservation at {restaurant} for {people} at {time}.",
    ],
    "new": [
        "We're a party of {people} and want to eat at {restaurant} at {time}. Sort it out please.",
        "Grab me a table at {restaurant} for {time}, {people} of us.",
        "Please make a booking: {restaurant}, {time}, {people} guests.",
    ],
}


def _spoken_time(hour: int, minute: int, rng: random.Random) -> str:
    """A time as people say it: "7:30 pm", "8 pm", "19:30"."""
    if rng.random() < 0.25:
        return f"{hour:02d}:{minute:02d}"
    h12 = hour % 12 or 12
    suffix = rng.choice(["pm", "p.m.", "PM"]) if hour >= 12 else rng.choice(["am", "a.m.", "AM"])
    return f"{h12} {suffix}" if minute == 0 else f"{h12}:{minute:02d} {suffix}"


def _weather(template: str, cities: list[str], rng: random.Random) -> tuple[str, dict]:
    city = rng.choice(cities)
    unit = "fahrenheit" if "Fahrenheit" in template else "celsius"
    return template.format(city=city), {"name": "get_weather", "arguments": {"city": city, "unit": unit}}


def _currency(template: str, _: list[str], rng: random.Random) -> tuple[str, dict]:
    (src_name, src), (dst_name, dst) = rng.sample(CURRENCIES, 2)
    amount: float | int = rng.choice([rng.randint(2, 2000), rng.randint(2, 400) + 0.5, rng.randint(1, 99) * 100])
    text = f"{amount:,}" if isinstance(amount, int) and amount >= 1000 and rng.random() < 0.5 else str(amount)
    prompt = template.format(amount=text, src=src_name, dst=dst_name)
    return prompt, {"name": "convert_currency", "arguments": {"amount": amount, "from": src, "to": dst}}


def _booking(template: str, restaurants: list[str], rng: random.Random) -> tuple[str, dict]:
    restaurant, people = rng.choice(restaurants), rng.randint(2, 12)
    hour, minute = rng.choice([12, 13, 18, 19, 20, 21, 11, 17]), rng.choice([0, 0, 15, 30, 45])
    people_text = NUMBER_WORDS[people] if rng.random() < 0.5 else str(people)
    prompt = template.format(restaurant=restaurant, people=people_text, time=_spoken_time(hour, minute, rng))
    prompt = prompt.replace("..", ".")  # "at 5 p.m.." -> "at 5 p.m."
    call = {"name": "book_table", "arguments": {"restaurant": restaurant, "people": people,
                                                "time": f"{hour:02d}:{minute:02d}"}}
    return prompt, call


SKILLS = [(WEATHER, _weather, TRAIN_CITIES, EVAL_CITIES), (CURRENCY, _currency, [], []),
          (BOOKING, _booking, TRAIN_RESTAURANTS, EVAL_RESTAURANTS)]


def tool_call_rows(seed: int, train_per_tool: int = 50, eval_per_tool: int = 20) -> tuple[list[dict], list[dict]]:
    """Training rows (prompt, demonstration, reference, function) and eval rows (prompt,
    reference, kind, function); all prompts are distinct."""
    rng = random.Random(seed)
    train, evals, used = [], [], set()

    def fresh(template: str, names: list[str]) -> tuple[str, dict]:
        """A request never generated before (so no duplicates and no train/eval overlap)."""
        user, call = make(template, names, rng)
        while user in used:
            user, call = make(template, names, rng)
        used.add(user)
        return user, call

    for templates, make, train_names, eval_names in SKILLS:
        for i in range(train_per_tool):
            user, call = fresh(templates["seen"][i % len(templates["seen"])], train_names)
            train.append({"prompt": f"{TOOLS_DESCRIPTION}\n\nUser request: {user}", "demonstration": json.dumps(call),
                          "reference": call, "function": call["name"]})
        for i in range(eval_per_tool):
            kind = "seen_phrasing" if i % 2 == 0 else "new_phrasing"
            phrasings = templates["seen" if kind == "seen_phrasing" else "new"]
            user, call = fresh(phrasings[(i // 2) % len(phrasings)], eval_names)
            evals.append({"prompt": f"{TOOLS_DESCRIPTION}\n\nUser request: {user}", "reference": call,
                          "kind": kind, "function": call["name"]})
    rng.shuffle(train)
    return train, evals


# (question, acceptable answers, kind); every one answered correctly by greedy SmolLM2-135M-Instruct.
PRIOR = [
    ("What is the capital of France?", ["Paris"], "geography"),
    ("What is the capital of Japan?", ["Tokyo"], "geography"),
    ("What is the capital of Germany?", ["Berlin"], "geography"),
    ("What is the capital of the United Kingdom?", ["London"], "geography"),
    ("What is the capital of Russia?", ["Moscow"], "geography"),
    ("What is the capital of Canada?", ["Ottawa"], "geography"),
    ("What is the capital of Egypt?", ["Cairo"], "geography"),
    ("What is the capital of China?", ["Beijing"], "geography"),
    ("What is the capital of Australia?", ["Canberra"], "geography"),
    ("What is the capital of South Korea?", ["Seoul"], "geography"),
    ("What is the capital of India?", ["New Delhi", "Delhi"], "geography"),
    ("What is the largest ocean on Earth?", ["Pacific"], "geography"),
    ("Which ocean lies between Europe and North America?", ["Atlantic"], "geography"),
    ("What is the longest river in Africa?", ["Nile"], "geography"),
    ("Which planet is known as the Red Planet?", ["Mars"], "science"),
    ("What is the chemical formula of water?", ["H2O"], "science"),
    ("What gas do humans need to breathe to survive?", ["oxygen"], "science"),
    ("What is the chemical symbol for gold?", ["Au"], "science"),
    ("What is the largest mammal on Earth?", ["blue whale"], "science"),
    ("What is the boiling point of water in degrees Celsius?", ["100"], "science"),
    ("What organ pumps blood through the human body?", ["heart"], "science"),
    ("What do plants need from the Sun to make food?", ["light", "sunlight"], "science"),
    ("What is 2 + 2?", ["4", "four"], "arithmetic"),
    ("What is 1 + 1?", ["2", "two"], "arithmetic"),
    ("What is 6 + 6?", ["12", "twelve"], "arithmetic"),
    ("What is 10 + 10?", ["20", "twenty"], "arithmetic"),
    ("What is 100 divided by 10?", ["10", "ten"], "arithmetic"),
    ("How many days are in a week?", ["7", "seven"], "everyday"),
    ("How many hours are in a day?", ["24", "twenty-four"], "everyday"),
    ("How many sides does a triangle have?", ["3", "three"], "everyday"),
    ("What color is the sky on a clear day?", ["blue"], "everyday"),
    ("What is the opposite of hot?", ["cold"], "everyday"),
    ("What is the opposite of up?", ["down"], "everyday"),
    ("What is the opposite of day?", ["night"], "everyday"),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"], "culture"),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"], "culture"),
    ("What is the primary language spoken in the United States?", ["English"], "culture"),
    ("What language is spoken in France?", ["French"], "culture"),
    ("Who developed the theory of relativity?", ["Einstein"], "culture"),
    ("Who was the first person to walk on the Moon?", ["Armstrong"], "culture"),
    ("What is the currency of Japan?", ["yen"], "culture"),
]


def prior_rows() -> list[dict]:
    return [{"prompt": q, "answer": a if len(a) > 1 else a[0], "kind": kind} for q, a, kind in PRIOR]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows):4d} rows to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data"))
    parser.add_argument("--seed", type=int, default=20261)
    args = parser.parse_args(argv)
    out = Path(args.out)
    train, evals = tool_call_rows(args.seed)
    _write(out / "tool_calls" / "train.jsonl", train)
    _write(out / "tool_calls" / "eval.jsonl", evals)
    _write(out / "prior" / "eval.jsonl", prior_rows())


if __name__ == "__main__":
    main()
