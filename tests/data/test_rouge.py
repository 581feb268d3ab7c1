"""Rouge-L: tokenisation as rouge_score's default (no stemming), LCS, F-measure on hand-computed cases."""
import itertools
import random

import pytest

from fedlora.data.rouge import lcs_length, mean_rouge_l, rouge_l, tokenize


def test_tokenize_lowercases_and_splits_on_non_alphanumerics():
    assert tokenize("The Cat, sat-on  the\tmat!") == ["the", "cat", "sat", "on", "the", "mat"]
    assert tokenize("don't stop 42x") == ["don", "t", "stop", "42x"]
    assert tokenize("café") == ["caf"]  # ASCII only, as rouge_score
    assert tokenize("") == [] and tokenize(" ,.;! ") == []


@pytest.mark.parametrize("a, b, n", [
    ("abcde", "ace", 3), ("abc", "cba", 1), ("abc", "xyz", 0), ("", "abc", 0), ("abcbdab", "bdcaba", 4),
    ("aaaa", "aa", 2),
])
def test_lcs_known_values_and_symmetry(a, b, n):
    assert lcs_length(list(a), list(b)) == n
    assert lcs_length(list(b), list(a)) == n


def _lcs_brute(a, b):
    for k in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(b, k))
        if any(c in subs for c in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _lcs_brute(a, b), (a, b)


def test_identical_is_one_and_disjoint_is_zero():
    assert rouge_l("the quick brown fox", "the quick brown fox") == 1.0
    assert rouge_l("alpha beta", "gamma delta epsilon") == 0.0


def test_partial_overlap_exact_f_measure():
    # LCS("the cat sat", "the cat was sitting") = 2: P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l("the cat sat", "the cat was sitting") == pytest.approx(4 / 7, abs=1e-12)
    # LCS = 3 ("a c e"): P = 3/5, R = 3/6, F = 6/11
    assert rouge_l("a b c d e", "a x c y e z") == pytest.approx(6 / 11, abs=1e-12)
    # order matters: only one word in sequence, P = R = 1/3
    assert rouge_l("sat cat the", "the cat sat") == pytest.approx(1 / 3, abs=1e-12)


def test_f_measure_is_symmetric_and_penalises_extra_length():
    # F is symmetric in (prediction, reference); a longer prediction lowers it
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(rouge_l("the cat sat on the mat", "the cat"))
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(2 * 1 * (2 / 6) / (1 + 2 / 6))


def test_case_and_punctuation_insensitive():
    assert rouge_l("The CAT, sat!", "the cat sat") == 1.0
    assert rouge_l("Yes.", "yes") == 1.0


def test_empty_sides_score_zero():
    assert rouge_l("", "") == 0.0
    assert rouge_l("", "something") == 0.0
    assert rouge_l("something", "") == 0.0
    assert rouge_l("!!!", "...") == 0.0


def test_mean_rouge_l():
    assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        mean_rouge_l(["a", "b"], ["a"])
