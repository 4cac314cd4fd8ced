"""The built-in "sentiment" task: short product, film and restaurant reviews.

Prompts are review openings ("Honestly, the pizza was"); demonstrations continue them with a
positive, a negative or a neutral remark in equal shares, so the SFT reference is about neutral
on average and RL towards VADER's compound score has room to move it.  Everything is drawn from a
seeded ``random.Random``, so the same seed always gives the same corpus.
"""

from __future__ import annotations

import random

SUBJECTS = {
    "restaurant": ["pizza", "pasta", "burger", "soup", "salad", "service", "waiter", "dessert", "coffee",
                   "curry", "breakfast", "menu", "kitchen", "steak", "bread", "sushi"],
    "film": ["movie", "film", "plot", "ending", "soundtrack", "acting", "script", "sequel", "director",
             "cast", "story", "finale"],
    "product": ["phone", "laptop", "camera", "battery", "screen", "keyboard", "headset", "charger",
                "blender", "vacuum", "printer", "speaker", "watch", "backpack"],
    "hotel": ["hotel", "room", "bed", "pool", "staff", "lobby", "view", "shower"],
}

LEADS = ["", "Honestly, ", "Overall, ", "To be fair, ", "In my opinion, ", "Last week ", "Frankly, ",
         "All in all, ", "So far ", "I have to say "]
VERBS = ["was", "is", "felt", "seemed"]

POSITIVE = ["great", "excellent", "wonderful", "amazing", "fantastic", "lovely", "superb", "delightful",
            "brilliant", "perfect", "charming", "impressive", "enjoyable", "beautiful"]
NEGATIVE = ["terrible", "awful", "horrible", "disappointing", "bad", "boring", "dreadful", "poor",
            "annoying", "ugly", "painful", "useless", "miserable", "broken"]
NEUTRAL = ["average", "ordinary", "standard", "typical", "small", "large", "quiet", "simple", "plain",
           "normal", "new", "old", "brief", "long"]

POSITIVE_TAILS = ["I would happily come back.", "Highly recommended!", "I loved every minute of it.",
                  "Worth every penny.", "It made me smile.", "My friends enjoyed it too.",
                  "I am very happy with it.", "Best choice I made this year.", "A real pleasure."]
NEGATIVE_TAILS = ["Sadly, I will never return.", "What a waste of money.", "Not worth it at all.",
                  "I regret buying it.", "It ruined my evening.", "Avoid it if you can.",
                  "I am very unhappy with it.", "Worst choice I made this year.", "A real disappointment."]
NEUTRAL_TAILS = ["It is what it is.", "Nothing more to say.", "I might try it again sometime.",
                 "It was about what I expected.", "Some people may buy it.", "It comes in a box.",
                 "The price was as listed.", "I went there on a Tuesday.", "Make of that what you will."]

LABELS = ("positive", "negative", "neutral")
_WORDS = {"positive": (POSITIVE, POSITIVE_TAILS), "negative": (NEGATIVE, NEGATIVE_TAILS),
          "neutral": (NEUTRAL, NEUTRAL_TAILS)}


def _subject(rng: random.Random) -> str:
    domain = rng.choice(sorted(SUBJECTS))
    return rng.choice(SUBJECTS[domain])


def make_prompt(rng: random.Random) -> str:
    """One review opening, e.g. ``"Honestly, the pizza was"``."""
    lead = rng.choice(LEADS)
    article = "the" if lead else "The"
    return f"{lead}{article} {_subject(rng)} {rng.choice(VERBS)}"


def make_response(rng: random.Random, label: str) -> str:
    """A continuation of a prompt with the given sentiment label (it starts with a space)."""
    adjectives, tails = _WORDS[label]
    first, second = rng.sample(adjectives, 2)
    style = rng.random()
    if style < 0.4:
        body = f" {first} and {second}."
    elif style < 0.7:
        body = f" really {first}."
    else:
        body = f" {first}, and the {_subject(rng)} was {second}."
    return f"{body} {rng.choice(tails)}"


HAS_ANSWERS = False
# Preference order of the labels: a positive continuation beats a neutral one, which beats a negative one.
RANK = {"positive": 2, "neutral": 1, "negative": 0}


def prompts(count: int, seed: int) -> list[dict]:
    """``count`` prompt records (duplicates possible; the prepare stage deduplicates)."""
    rng = random.Random(f"sentiment-prompts-{seed}")
    return [{"prompt": make_prompt(rng)} for _ in range(count)]


def demonstrations(count: int, seed: int) -> list[dict]:
    """``count`` (prompt, response, label) demonstrations with labels in equal shares."""
    rng = random.Random(f"sentiment-demos-{seed}")
    rows = []
    for index in range(count):
        label = LABELS[index % len(LABELS)]
        rows.append({"prompt": make_prompt(rng), "response": make_response(rng, label), "label": label})
    rng.shuffle(rows)
    return rows


def preferences(count: int, seed: int) -> list[dict]:
    """``count`` (prompt, chosen, rejected) pairs: two continuations of one prompt with different labels,
    the more positive one chosen (positive > neutral > negative), label pairs in equal shares."""
    rng = random.Random(f"sentiment-preferences-{seed}")
    label_pairs = [("positive", "negative"), ("positive", "neutral"), ("neutral", "negative")]
    rows = []
    for index in range(count):
        better, worse = label_pairs[index % len(label_pairs)]
        prompt = make_prompt(rng)
        rows.append({"prompt": prompt, "chosen": make_response(rng, better), "rejected": make_response(rng, worse)})
    rng.shuffle(rows)
    return rows


def reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """VADER's compound sentiment score of each response, in [−1, 1]."""
    from rlhf_core.phases.scoring import vader_scores

    return vader_scores(responses)
