"""The near-tie comparisons of tests/ties.py catch real disagreements and accept only ties."""

import numpy as np
import pytest
from ties import TIE_TOL, assert_choices_agree, assert_greedy_agree, assert_text_agrees, stable_prefix


def test_choices_accept_a_near_tie_and_reject_a_clear_loser():
    scores = np.array([[1.0, 1.0 + 0.5 * TIE_TOL, -2.0], [0.0, 3.0, 1.0]])
    assert assert_choices_agree([0, 1], scores) == 1  # row 0 is tied, row 1 decisive
    with pytest.raises(AssertionError, match=r"rows \[1\]"):
        assert_choices_agree([0, 2], scores)
    with pytest.raises(AssertionError):
        assert_choices_agree([2, 1], scores)


def test_greedy_rows_may_part_only_at_a_tie():
    logits = np.zeros((2, 3, 4))
    logits[:, :, 1] = 2.0  # token 1 wins clearly everywhere ...
    logits[1, 1, 3] = 2.0 - 0.1 * TIE_TOL  # ... except row 1, step 1: tied with token 3
    ref = np.ones((2, 3), int)
    assert assert_greedy_agree(ref, ref, logits) == 0
    assert assert_greedy_agree([[1, 1, 1], [1, 3, 0]], ref, logits) == 1  # after the tie anything goes
    with pytest.raises(AssertionError, match="row 0 step 2"):
        assert_greedy_agree([[1, 1, 0], [1, 1, 1]], ref, logits)


def test_text_is_compared_up_to_the_first_tie():
    logits = np.zeros((3, 4))
    logits[:, 2] = 1.0
    assert stable_prefix(logits) == 3
    render = lambda ids: "".join("abcd"[i] for i in ids)
    assert_text_agrees("ccc", [2, 2, 2], logits, render)
    with pytest.raises(AssertionError):
        assert_text_agrees("ccd", [2, 2, 2], logits, render)
    logits[2, 0] = 1.0  # step 2 is a tie: only "cc" must match
    assert stable_prefix(logits) == 2
    assert_text_agrees("cca", [2, 2, 2], logits, render)
    with pytest.raises(AssertionError):
        assert_text_agrees("cac", [2, 2, 2], logits, render)


def test_a_tie_at_the_first_step_still_pins_the_first_token():
    """Before the fix any text passed when the first near-tie was at step 0 (it only had to start
    with the rendering of no tokens)."""
    logits = np.zeros((3, 4))
    logits[:, 2] = 1.0
    logits[0, 1] = 1.0  # step 0: tokens 1 and 2 tied
    render = lambda ids: "".join("abcd"[i] for i in ids)
    assert stable_prefix(logits) == 0
    assert_text_agrees("ccc", [2, 2, 2], logits, render)
    assert_text_agrees("bdd", [2, 2, 2], logits, render)  # the other tied token, then anything
    for wrong in ("dcc", "acc", ""):
        with pytest.raises(AssertionError):
            assert_text_agrees(wrong, [2, 2, 2], logits, render)
