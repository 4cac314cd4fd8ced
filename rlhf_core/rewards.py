"""Reward scoring: the reward components of each response and their total.

The default scorer is VADER's compound sentiment score (vaderSentiment), in [−1, 1].  Scoring needs
neither torch nor transformers.  Any non-finite score stops the stage with the offending row.
"""

from __future__ import annotations

import math

from rlhf_core.errors import DataError

SCORERS = ("vader",)


def vader_scores(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [−1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def missing_eos_penalties(ended_with_eos: list[bool], penalty: float) -> list[float]:
    """−penalty for each response that ran out of tokens before EOS, 0 otherwise."""
    return [0.0 if ended else -penalty for ended in ended_with_eos]


def score_responses(scorer: str, responses: list[str], ended_with_eos: list[bool], missing_eos_penalty: float,
                    where: str = "score") -> dict[str, list[float]]:
    """Reward components and their total: {scorer: [...], 'eos_penalty': [...], 'total': [...]}."""
    if scorer != "vader":
        raise DataError(f"scorer {scorer!r}: unknown; allowed: {', '.join(SCORERS)}")
    components = {scorer: vader_scores(responses),
                  "eos_penalty": missing_eos_penalties(ended_with_eos, missing_eos_penalty)}
    for name, values in components.items():
        if len(values) != len(responses):
            raise DataError(f"{where}: scorer {name} returned {len(values)} values for {len(responses)} responses")
        for row, value in enumerate(values):
            if not math.isfinite(value):
                raise DataError(f"{where}: scorer {name} returned {value} for row {row} ({responses[row][:60]!r})")
    components["total"] = [sum(parts) for parts in zip(*components.values())]
    return components
