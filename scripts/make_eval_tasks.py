#!/usr/bin/env python
"""Generate the bundled evaluation tasks (deterministic, offline).

* ``data/tool_calls/{train,eval}.jsonl`` -- a new skill with a checkable format: answer a
  user request by replying with one JSON call to one of three fictional API functions
  described in the prompt. Eval rows use held-out cities/restaurants and amounts; half of
  them use the training phrasings (``kind: seen_phrasing``), half new ones (``new_phrasing``).
* ``data/prior/eval.jsonl`` -- 236 easy general-knowledge questions in six kinds (geography, science,
  arithmetic, language, everyday, culture), most of which the base model (SmolLM2-135M-Instruct)
  answers: a forgetting probe, scored with ``contains``.

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


# (question, acceptable answers, kind). The first 41 were kept from a larger list because greedy
# SmolLM2-135M-Instruct answers every one of them (32 new tokens).
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


# Added for the science study (issue 11): >= 200 questions in six kinds, written by hand before the
# base model was run on them (not filtered by its answers; data/prior/README.md gives its accuracy).
PRIOR_MORE = [
    # geography
    ("What is the capital of Italy?", ["Rome"], "geography"),
    ("What is the capital of Spain?", ["Madrid"], "geography"),
    ("What is the capital of Portugal?", ["Lisbon"], "geography"),
    ("What is the capital of Greece?", ["Athens"], "geography"),
    ("What is the capital of Ireland?", ["Dublin"], "geography"),
    ("What is the capital of Norway?", ["Oslo"], "geography"),
    ("What is the capital of Sweden?", ["Stockholm"], "geography"),
    ("What is the capital of Brazil?", ["Brasilia"], "geography"),
    ("What is the capital of Argentina?", ["Buenos Aires"], "geography"),
    ("What is the capital of Mexico?", ["Mexico City"], "geography"),
    ("What is the capital of Thailand?", ["Bangkok"], "geography"),
    ("What is the capital of Kenya?", ["Nairobi"], "geography"),
    ("What is the capital of Turkey?", ["Ankara"], "geography"),
    ("What is the capital of Austria?", ["Vienna"], "geography"),
    ("What is the capital of Poland?", ["Warsaw"], "geography"),
    ("What is the capital of the Netherlands?", ["Amsterdam"], "geography"),
    ("What is the capital of Belgium?", ["Brussels"], "geography"),
    ("What is the capital of Peru?", ["Lima"], "geography"),
    ("What is the capital of Cuba?", ["Havana"], "geography"),
    ("What is the capital of Vietnam?", ["Hanoi"], "geography"),
    ("What is the largest continent?", ["Asia"], "geography"),
    ("What is the largest hot desert in the world?", ["Sahara"], "geography"),
    ("What is the tallest mountain in the world?", ["Everest"], "geography"),
    ("On which continent is Egypt?", ["Africa"], "geography"),
    ("On which continent is Brazil?", ["South America"], "geography"),
    ("In which country is the Eiffel Tower?", ["France"], "geography"),
    ("In which country are the pyramids of Giza?", ["Egypt"], "geography"),
    ("Which river flows through London?", ["Thames"], "geography"),
    ("Which river flows through Paris?", ["Seine"], "geography"),
    ("In which country is the city of Rome?", ["Italy"], "geography"),
    ("How many continents are there on Earth?", ["7", "seven"], "geography"),
    ("What is the largest country in the world by area?", ["Russia"], "geography"),
    ("In which country is the Great Wall?", ["China"], "geography"),
    ("In which country is the city of Sydney?", ["Australia"], "geography"),
    ("Which ocean lies along the west coast of the United States?", ["Pacific"], "geography"),
    ("Which country is directly north of the United States?", ["Canada"], "geography"),
    # science
    ("What is the chemical symbol for sodium?", ["Na"], "science"),
    ("What is the chemical symbol for iron?", ["Fe"], "science"),
    ("What is the chemical symbol for silver?", ["Ag"], "science"),
    ("Which planet do humans live on?", ["Earth"], "science"),
    ("What is the closest star to the Earth?", ["Sun"], "science"),
    ("What is the largest planet in our solar system?", ["Jupiter"], "science"),
    ("Which planet is closest to the Sun?", ["Mercury"], "science"),
    ("What sweet food do bees make?", ["honey"], "science"),
    ("What is water called when it is frozen solid?", ["ice"], "science"),
    ("Which gas do plants take in from the air to make food?", ["carbon dioxide", "CO2"], "science"),
    ("How many legs does a spider have?", ["8", "eight"], "science"),
    ("How many legs does an insect have?", ["6", "six"], "science"),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"], "science"),
    ("What force pulls objects toward the ground?", ["gravity"], "science"),
    ("What is the hardest natural substance?", ["diamond", "diamonds"], "science"),
    ("Which organs do humans use to breathe?", ["lungs", "lung"], "science"),
    ("Which part of the body do we use to see?", ["eyes", "eye"], "science"),
    ("Which part of the body do we use to hear?", ["ears", "ear"], "science"),
    ("Which organ in the head controls the body and thinking?", ["brain"], "science"),
    ("What does a caterpillar turn into?", ["butterfly", "butterflies", "moth"], "science"),
    ("Which gas makes up most of the Earth's air?", ["nitrogen"], "science"),
    ("What is the center of an atom called?", ["nucleus"], "science"),
    ("What is the Earth's natural satellite called?", ["Moon"], "science"),
    ("How many bones are in the adult human body?", ["206"], "science"),
    ("To which class of animals do whales belong?", ["mammals", "mammal", "mammalia"], "science"),
    ("What is the process by which plants make food from sunlight called?", ["photosynthesis"], "science"),
    ("Which metal is liquid at room temperature?", ["mercury"], "science"),
    ("What do we call animals that eat only plants?", ["herbivores", "herbivore", "herbivorous"], "science"),
    ("What color is chlorophyll?", ["green"], "science"),
    ("What is the largest organ of the human body?", ["skin"], "science"),
    ("Which planet is famous for its large rings?", ["Saturn"], "science"),
    ("What is the boiling point of water in degrees Fahrenheit?", ["212"], "science"),
    # arithmetic (no answer appears in its own question, so an echoed question never scores)
    ("What is 3 + 4?", ["7", "seven"], "arithmetic"),
    ("What is 5 + 3?", ["8", "eight"], "arithmetic"),
    ("What is 9 + 1?", ["10", "ten"], "arithmetic"),
    ("What is 7 + 8?", ["15", "fifteen"], "arithmetic"),
    ("What is 12 + 5?", ["17", "seventeen"], "arithmetic"),
    ("What is 20 + 30?", ["50", "fifty"], "arithmetic"),
    ("What is 50 + 50?", ["100", "one hundred"], "arithmetic"),
    ("What is 8 + 8?", ["16", "sixteen"], "arithmetic"),
    ("What is 11 + 11?", ["22", "twenty-two"], "arithmetic"),
    ("What is 15 + 15?", ["30", "thirty"], "arithmetic"),
    ("What is 1000 + 1000?", ["2000", "two thousand"], "arithmetic"),
    ("What is 9 - 3?", ["6", "six"], "arithmetic"),
    ("What is 10 - 4?", ["6", "six"], "arithmetic"),
    ("What is 15 - 5?", ["10", "ten"], "arithmetic"),
    ("What is 100 - 1?", ["99", "ninety-nine"], "arithmetic"),
    ("What is 20 - 8?", ["12", "twelve"], "arithmetic"),
    ("What is 3 times 3?", ["9", "nine"], "arithmetic"),
    ("What is 2 times 5?", ["10", "ten"], "arithmetic"),
    ("What is 4 times 5?", ["20", "twenty"], "arithmetic"),
    ("What is 6 times 7?", ["42", "forty-two"], "arithmetic"),
    ("What is 10 times 10?", ["100", "one hundred"], "arithmetic"),
    ("What is 5 times 5?", ["25", "twenty-five"], "arithmetic"),
    ("What is 7 multiplied by 8?", ["56", "fifty-six"], "arithmetic"),
    ("What is 12 divided by 3?", ["4", "four"], "arithmetic"),
    ("What is 20 divided by 4?", ["5", "five"], "arithmetic"),
    ("What is 18 divided by 2?", ["9", "nine"], "arithmetic"),
    ("What is half of 10?", ["5", "five"], "arithmetic"),
    ("What is half of 100?", ["50", "fifty"], "arithmetic"),
    ("What is 3 squared?", ["9", "nine"], "arithmetic"),
    ("What is the square root of 16?", ["4", "four"], "arithmetic"),
    ("What number comes right after 99?", ["100", "one hundred"], "arithmetic"),
    # language: word meaning, opposites, plurals, past tenses, names for young animals and trades
    ("What is the opposite of big?", ["small", "little", "tiny"], "language"),
    ("What is the opposite of fast?", ["slow"], "language"),
    ("What is the opposite of happy?", ["sad", "unhappy"], "language"),
    ("What is the opposite of young?", ["old"], "language"),
    ("What is the opposite of open?", ["closed", "close", "shut"], "language"),
    ("What is the opposite of left?", ["right"], "language"),
    ("What is the opposite of wet?", ["dry"], "language"),
    ("What is the opposite of full?", ["empty"], "language"),
    ("What is the opposite of always?", ["never"], "language"),
    ("What is the opposite of win?", ["lose"], "language"),
    ("What is the opposite of love?", ["hate"], "language"),
    ("What is the opposite of early?", ["late"], "language"),
    ("What is the plural of child?", ["children"], "language"),
    ("What is the plural of mouse?", ["mice"], "language"),
    ("What is the plural of foot?", ["feet"], "language"),
    ("What is the plural of tooth?", ["teeth"], "language"),
    ("What is the plural of woman?", ["women"], "language"),
    ("What is the past tense of go?", ["went"], "language"),
    ("What is the past tense of eat?", ["ate"], "language"),
    ("What is the past tense of see?", ["saw"], "language"),
    ("What is the past tense of run?", ["ran"], "language"),
    ("What is a baby cat called?", ["kitten", "kitty"], "language"),
    ("What is a baby dog called?", ["puppy", "pup"], "language"),
    ("What is a young sheep called?", ["lamb"], "language"),
    ("What is a baby cow called?", ["calf"], "language"),
    ("What is another word for large?", ["big", "huge", "enormous", "giant", "gigantic", "massive", "vast"], "language"),
    ("What is another word for happy?", ["joyful", "glad", "cheerful", "content", "delighted", "pleased", "joyous"],
     "language"),
    ("What do you call a person who flies an airplane?", ["pilot"], "language"),
    ("What do you call a doctor who treats animals?", ["vet", "veterinarian", "veterinary"], "language"),
    ("What do you call a person who cooks food in a restaurant?", ["chef", "cook"], "language"),
    ("What do you call a person who writes books?", ["author", "writer", "novelist"], "language"),
    ("What does the word 'enormous' mean?", ["very large", "very big", "huge", "large", "big"], "language"),
    ("How many letters are in the English alphabet?", ["26", "twenty-six"], "language"),
    ("What is the comparative form of good?", ["better"], "language"),
    ("What is the superlative form of good?", ["best"], "language"),
    ("Which word means the same as 'begin'?", ["start", "commence"], "language"),
    # everyday
    ("How many days are in a year?", ["365"], "everyday"),
    ("How many months are in a year?", ["12", "twelve"], "everyday"),
    ("How many minutes are in an hour?", ["60", "sixty"], "everyday"),
    ("How many seconds are in a minute?", ["60", "sixty"], "everyday"),
    ("How many legs does a dog have?", ["4", "four"], "everyday"),
    ("How many wheels does a bicycle have?", ["2", "two"], "everyday"),
    ("How many sides does a square have?", ["4", "four"], "everyday"),
    ("How many fingers are on one human hand?", ["5", "five"], "everyday"),
    ("What color is grass?", ["green"], "everyday"),
    ("What color is fresh snow?", ["white"], "everyday"),
    ("What color is a ripe banana?", ["yellow"], "everyday"),
    ("What color is a stop sign?", ["red"], "everyday"),
    ("What color do you get by mixing blue and yellow?", ["green"], "everyday"),
    ("What color do you get by mixing red and white?", ["pink"], "everyday"),
    ("Which animal says 'meow'?", ["cat", "cats"], "everyday"),
    ("Which animal barks?", ["dog", "dogs"], "everyday"),
    ("What drink do cows produce?", ["milk"], "everyday"),
    ("What do you use to cut paper?", ["scissors"], "everyday"),
    ("What do teachers write with on a blackboard?", ["chalk"], "everyday"),
    ("What is the name of the meal eaten in the morning?", ["breakfast"], "everyday"),
    ("What is the first month of the year?", ["January"], "everyday"),
    ("What is the last month of the year?", ["December"], "everyday"),
    ("Which day comes after Monday?", ["Tuesday"], "everyday"),
    ("Which season comes after winter?", ["spring"], "everyday"),
    ("Where do fish live?", ["water", "sea", "ocean", "oceans", "rivers", "lakes"], "everyday"),
    ("Where do bees live?", ["hive", "hives", "beehive", "beehives"], "everyday"),
    ("What do you use to unlock a door?", ["key", "keys"], "everyday"),
    ("Which kitchen appliance keeps food cold?", ["refrigerator", "fridge"], "everyday"),
    ("Which tool is used to drive nails into wood?", ["hammer"], "everyday"),
    ("What do people use to tell the time?", ["clock", "watch", "clocks", "watches"], "everyday"),
    ("What falls from clouds when it rains?", ["water", "raindrops", "rain", "drops"], "everyday"),
    ("How many players does a soccer team have on the field?", ["11", "eleven"], "everyday"),
    # culture
    ("Who wrote Hamlet?", ["Shakespeare"], "culture"),
    ("Who painted The Starry Night?", ["Van Gogh", "Gogh"], "culture"),
    ("Who was the first President of the United States?", ["Washington"], "culture"),
    ("Who discovered penicillin?", ["Fleming"], "culture"),
    ("Who invented the telephone?", ["Bell"], "culture"),
    ("Who is credited with inventing the light bulb?", ["Edison"], "culture"),
    ("Who composed the Moonlight Sonata?", ["Beethoven"], "culture"),
    ("What is the currency of the United Kingdom?", ["pound", "pounds", "sterling"], "culture"),
    ("What is the currency of the United States?", ["dollar", "dollars"], "culture"),
    ("What currency is used in Germany?", ["euro", "euros"], "culture"),
    ("What language is spoken in Spain?", ["Spanish", "Castilian"], "culture"),
    ("What language is spoken in Germany?", ["German"], "culture"),
    ("What language is spoken in Italy?", ["Italian"], "culture"),
    ("What language is mainly spoken in Brazil?", ["Portuguese"], "culture"),
    ("What language is spoken in Japan?", ["Japanese"], "culture"),
    ("In which sport is a shuttlecock used?", ["badminton"], "culture"),
    ("Who wrote the Harry Potter books?", ["Rowling"], "culture"),
    ("Who wrote Pride and Prejudice?", ["Austen"], "culture"),
    ("What is the famous clock tower in London called?", ["Big Ben"], "culture"),
    ("Which scientist formulated the laws of motion and universal gravitation?", ["Newton"], "culture"),
    ("Who proposed the theory of evolution by natural selection?", ["Darwin"], "culture"),
    ("Which musical instrument has 88 keys?", ["piano"], "culture"),
    ("Who gave the famous 'I have a dream' speech?", ["Martin Luther King", "King"], "culture"),
    ("Which holiday is celebrated on December 25?", ["Christmas"], "culture"),
    ("In which city is the Statue of Liberty?", ["New York"], "culture"),
    ("What was the name of the ship that sank in 1912 after hitting an iceberg?", ["Titanic"], "culture"),
    ("Who was the Greek god of the sea?", ["Poseidon"], "culture"),
    ("Which famous scientist had the first name Albert?", ["Einstein"], "culture"),
]


def prior_rows() -> list[dict]:
    return [{"prompt": q, "answer": a if len(a) > 1 else a[0], "kind": kind} for q, a, kind in PRIOR + PRIOR_MORE]


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
