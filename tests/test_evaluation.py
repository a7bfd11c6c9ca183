"""Answer metrics on worked examples."""

import pytest

from keras_paligemma2 import evaluation


def test_levenshtein_classic_examples():
    assert evaluation.levenshtein("kitten", "sitting") == 3
    assert evaluation.levenshtein("flaw", "lawn") == 2
    assert evaluation.levenshtein("", "abc") == 3


def test_exact_match_strips_only_whitespace():
    assert evaluation.exact_match(" 3 ", ["4", "3"]) == 1.0
    assert evaluation.exact_match("Cat", ["cat"]) == 0.0


def test_relaxed_accuracy_as_big_vision_chartqa():
    assert evaluation.relaxed_accuracy("10.4", ["10"]) == 1.0  # 4% off
    assert evaluation.relaxed_accuracy("10.6", ["10"]) == 0.0  # 6% off
    assert evaluation.relaxed_accuracy("5%", ["0.05"]) == 1.0
    assert evaluation.relaxed_accuracy("1,000", ["1000"]) == 0.0  # not a number to big_vision
    assert evaluation.relaxed_accuracy("Yes", ["yes"]) == 0.0 and evaluation.relaxed_accuracy("yes", ["yes"]) == 1.0
    # A zero answer needs the exact string.
    assert evaluation.relaxed_accuracy("0", ["0"]) == 1.0
    assert evaluation.relaxed_accuracy("0.0", ["0"]) == 0.0


def test_anls_as_docvqa():
    assert evaluation.anls("The  Cat", ["the cat"]) == 1.0
    assert evaluation.anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit over 5 characters
    assert evaluation.anls("3.00", ["3"]) == 0.0  # normalised distance 0.75 >= 0.5
    assert evaluation.anls("abc", ["xyz", "abd"]) == pytest.approx(2 / 3)  # the best answer counts


def test_box_accuracy_needs_iou_half_and_the_label():
    want = "<loc0000><loc0000><loc0512><loc0512> cat"
    assert evaluation.box_accuracy("<loc0000><loc0000><loc0512><loc0512> cat", [want]) == 1.0
    # IoU of [0, 0.5]^2 and [0, 0.3] x [0, 0.5] is 0.6; with [0, 0.2] x [0, 0.5] it is 0.4.
    assert evaluation.box_accuracy("<loc0000><loc0000><loc0307><loc0512> cat", [want]) == 1.0
    assert evaluation.box_accuracy("<loc0000><loc0000><loc0205><loc0512> cat", [want]) == 0.0
    assert evaluation.box_accuracy("<loc0000><loc0000><loc0512><loc0512> dog", [want]) == 0.0
    assert evaluation.box_accuracy("", [""]) == 1.0  # nothing to find, nothing found


def test_score_averages_and_refuses_unknown_metrics():
    assert evaluation.score("exact_match", ["a", "b"], [["a"], ["c"]]) == 0.5
    with pytest.raises(ValueError, match="Unknown metric 'cider'"):
        evaluation.score("cider", ["a"], [["a"]])
