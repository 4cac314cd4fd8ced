"""The built-in "arithmetic" task: two-digit addition with a verifiable answer.

Prompts are ``"2 3 + 1 4 ="``: two operands from ``MIN_OPERAND..MAX_OPERAND`` (10..49) whose digits
add without a carry, written one digit per token.  The reference answer is the sum in the same
notation, ``"3 7"``, carried as the prompt record's ``answer``; a response is the answer after one
space (``" 3 7"``), and the SFT stage appends EOS.  There are 880 distinct problems.

Why spaced digits and no carries (measured with the default params): the builtin tokenizer is a
byte-level BPE trained on the demonstrations, and it merges every number into one token, so each
sum is an arbitrary lookup (``"17"``, ``"25"`` → ``" 42"``).  With ``"17+25="`` and operands 0..29,
the tiny model gave the right sum about 2% of the time after SFT even on all-correct
demonstrations (the chance level), and RL could not move it.  Spaced digits with carries reached
about 10%.  Without carries every answer digit is the sum of two prompt digits, which the default
SFT run learns.

Demonstrations are only *sometimes* correct: each one is the right sum with probability
``CORRECT_FRACTION`` (0.5); otherwise the demonstrator makes its habitual slip, a spurious carry:
the tens digit one too high (``SLIP`` = 10: ``" 4 7"`` for 23 + 14).  So the SFT reference answers
correctly only about half the time, and RL towards the exact-match reward has room to raise
accuracy by unlearning the slip.  (A slip of +1 in the units digit also worked, with smaller gains.)

Preferences pair the right sum (chosen) with a plausible wrong one (rejected; see ``mistakes``).
The reward is exact match: 1.0 if ``response.strip() == answer.strip()``, else 0.0.  Everything is
drawn from a seeded ``random.Random``, so the same seed always gives the same corpus.
"""

from __future__ import annotations

import random

HAS_ANSWERS = True
MIN_OPERAND = 10          # operands are two-digit numbers MIN_OPERAND..MAX_OPERAND ...
MAX_OPERAND = 49          # ... whose units digits (and tens digits) add to at most 9: no carries
CORRECT_FRACTION = 0.5    # share of demonstrations whose response is the right sum
SLIP = 10                 # the other demonstrations answer right sum + SLIP: a spurious carry into the tens

PROBLEMS = tuple((a, b) for a in range(MIN_OPERAND, MAX_OPERAND + 1) for b in range(MIN_OPERAND, MAX_OPERAND + 1)
                 if a % 10 + b % 10 <= 9 and a // 10 + b // 10 <= 9)


def digits(number: int) -> str:
    """``37`` → ``"3 7"``: one digit per token for the byte-level BPE."""
    return " ".join(str(number))


def format_prompt(a: int, b: int) -> str:
    """``"2 3 + 1 4 ="`` for 23 + 14."""
    return f"{digits(a)} + {digits(b)} ="


def format_response(value: int) -> str:
    """The response text for a sum: one space, then its digits (``" 3 7"``)."""
    return f" {digits(value)}"


def answer(a: int, b: int) -> str:
    """The reference answer of a + b: the stripped text of the correct response (``"3 7"``)."""
    return digits(a + b)


def mistakes(a: int, b: int) -> list[int]:
    """Plausible wrong sums of a + b: one digit off by one (−10, −1, +1, +10)."""
    right = a + b
    return [value for value in (right - 10, right - 1, right + 1, right + 10) if value >= 0]


def prompts(count: int, seed: int) -> list[dict]:
    """``count`` records ``{"prompt": "2 3 + 1 4 =", "answer": "3 7"}`` (duplicates possible; prepare deduplicates)."""
    rng = random.Random(f"arithmetic-prompts-{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.choice(PROBLEMS)
        rows.append({"prompt": format_prompt(a, b), "answer": answer(a, b)})
    return rows


def demonstrations(count: int, seed: int) -> list[dict]:
    """``count`` (prompt, response, answer, correct) demonstrations: each is the right sum with probability
    ``CORRECT_FRACTION``, otherwise the sum plus ``SLIP``."""
    rng = random.Random(f"arithmetic-demos-{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.choice(PROBLEMS)
        correct = rng.random() < CORRECT_FRACTION
        rows.append({"prompt": format_prompt(a, b), "response": format_response(a + b if correct else a + b + SLIP),
                     "answer": answer(a, b), "correct": correct})
    return rows


def preferences(count: int, seed: int) -> list[dict]:
    """``count`` (prompt, chosen, rejected) pairs: the right sum chosen, one of ``mistakes`` rejected."""
    rng = random.Random(f"arithmetic-preferences-{seed}")
    rows = []
    for _ in range(count):
        a, b = rng.choice(PROBLEMS)
        rows.append({"prompt": format_prompt(a, b), "chosen": format_response(a + b),
                     "rejected": format_response(rng.choice(mistakes(a, b)))})
    return rows


def reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """Exact match: 1.0 if ``response.strip() == answer.strip()`` with ``answer = metadata[i]["answer"]``, else 0.0.

    For the answer ``"4 2"``: ``" 4 2"`` and ``"4 2"`` score 1; ``" 4 1"``, ``" 4 2 3"``, ``"42"`` and ``""`` score 0.
    """
    return exact_match_reward("arithmetic", responses, metadata)


def exact_match_reward(task: str, responses: list[str], metadata: list[dict]) -> list[float]:
    """The `kind: task` reward of a task with reference answers: 1.0 if ``response.strip() == answer.strip()`` with
    ``answer = metadata[i]["answer"]``, else 0.0; one line naming ``task`` when an answer is missing."""
    from rlhf_core.errors import DataError
    from rlhf_core.phases.scoring import verifiable_scores

    answers = [m.get("answer") for m in metadata]
    if len(answers) != len(responses) or any(a is None for a in answers):
        raise DataError(f"the {task} task's reward needs each prompt's reference answer "
                        f"(metadata 'answer'; the builtin {task} prompts carry it)")
    return verifiable_scores(responses, answers, "exact", 0.0)
