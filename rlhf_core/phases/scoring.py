"""The built-in scoring functions: plain functions of the response text that import nothing else of the project,
so the tasks (rlhf_core/phases/tasks) and the scorers (rlhf_core/phases/rewards.py) share them without an import circle."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def vader_scores(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [−1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def length_scores(lengths: list[int], target: int) -> list[float]:
    """−|L − target| / target for each response length L (tokens): 0 at the target, −1 at 0 or 2·target."""
    return [-abs(length - target) / target for length in lengths]


def overlong_scores(lengths: list[int], max_new_tokens: int, buffer: int) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025) for each response length L (tokens), with L_max =
    max_new_tokens and L_cache = buffer:

        0                              if L ≤ L_max − L_cache
        ((L_max − L_cache) − L) / L_cache   if L_max − L_cache < L ≤ L_max    (falls linearly to −1 at L_max)
        −1                             if L > L_max
    """
    start = max_new_tokens - buffer
    return [0.0 if length <= start else -1.0 if length > max_new_tokens else (start - length) / buffer
            for length in lengths]


def verifiable_scores(responses: list[str], answers: list[str], match: str, tolerance: float) -> list[float]:
    """1.0 where the response matches its reference answer, else 0.0.

    exact:   response.strip() == answer.strip()
    numeric: the first number in the response is within ``tolerance`` of the answer (as a number)
    regex:   the answer, read as a regular expression, is found in the response
    """
    scores = []
    for response, answer in zip(responses, answers):
        if match == "exact":
            hit = response.strip() == str(answer).strip()
        elif match == "numeric":
            found = NUMBER.search(response)
            try:
                hit = found is not None and abs(float(found.group()) - float(answer)) <= tolerance
            except ValueError:
                hit = False
        else:
            hit = re.search(str(answer), response) is not None
        scores.append(1.0 if hit else 0.0)
    return scores
