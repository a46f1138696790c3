"""Repetition and diversity of generations, by hand and against a brute-force count."""

import random

import pytest

from trace_realign.core.evaluation import distinct_n, seq_rep_n


def test_hand_computed_values():
    # "a b a b a b": 4-grams (a b a b), (b a b a), (a b a b) -> 2 unique of 3 -> rep 1/3
    assert seq_rep_n(["a b a b a b"], 4) == pytest.approx(1 / 3)
    # a text with no repeated 4-gram, and one too short to count
    assert seq_rep_n(["one two three four five", "too short"], 4) == 0.0
    assert seq_rep_n(["A b A B a b"], 4) == pytest.approx(1 / 3)  # case does not matter
    # bigrams over both texts: (x y) (y z) | (x y) (y x) -> 3 unique of 4
    assert distinct_n(["x y z", "x y x"], 2) == pytest.approx(3 / 4)
    assert seq_rep_n(["hi"], 4) is None and distinct_n([], 2) is None
    with pytest.raises(ValueError):
        seq_rep_n(["a"], 0)


def test_a_looping_answer_scores_high_and_a_varied_one_low():
    loop = " ".join(["I cannot help with that."] * 12)
    varied = "Vaccines train the immune system to recognise a pathogen without causing the disease itself."
    assert seq_rep_n([loop], 4) > 0.8 and seq_rep_n([varied], 4) == 0.0
    assert distinct_n([loop], 2) < 0.15 < distinct_n([varied], 2)


def test_against_a_brute_force_count():
    rng = random.Random(0)
    texts = [" ".join(rng.choice("abcd") for _ in range(rng.randint(0, 12))) for _ in range(40)]
    for n in (1, 2, 4):
        per_text = []
        every = []
        for t in texts:
            w = t.split()
            grams = [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]
            every += grams
            if grams:
                per_text.append(1 - len(set(grams)) / len(grams))
        assert seq_rep_n(texts, n) == pytest.approx(sum(per_text) / len(per_text))
        assert distinct_n(texts, n) == pytest.approx(len(set(every)) / len(every))
