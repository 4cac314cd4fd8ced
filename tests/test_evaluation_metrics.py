"""Unit tests of the text metrics of rlhf_core.phases.evaluation."""

from __future__ import annotations

import pytest

from rlhf_core.phases.evaluation import distinct_n


def test_distinct_on_hand_examples():
    # unigrams a, b, a, b -> 2 unique of 4; bigrams (a b), (b a), (a b) -> 2 unique of 3
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)


def test_distinct_pools_over_texts_without_crossing_them():
    # unigrams: a b | b c -> 3 unique of 4; bigrams: (a b), (b c) -> 2 of 2 (no (b b) across texts)
    assert distinct_n(["a b", "b c"], 1) == pytest.approx(3 / 4)
    assert distinct_n(["a b", "b c"], 2) == pytest.approx(1.0)
    assert distinct_n(["x x x x"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["x  y\tz"], 1) == pytest.approx(1.0)


def test_distinct_empty_is_zero():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    assert distinct_n(["a"], 2) == 0.0
