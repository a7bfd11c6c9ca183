"""Answer metrics on worked examples."""

import json

import numpy as np
import pytest
from helpers import assert_close

from keras_paligemma2 import MaskDecoder
from keras_paligemma2.apps import evaluation
from keras_paligemma2.utils.errors import InputError


def test_levenshtein_classic_examples():
    assert evaluation.levenshtein("kitten", "sitting") == 3
    assert evaluation.levenshtein("flaw", "lawn") == 2
    assert evaluation.levenshtein("", "abc") == 3


def test_exact_match_is_big_vision_string_equality():
    # big_vision's VQA evaluator compares `answer == gt`: nothing stripped.
    assert evaluation.exact_match("3", ["4", "3"]) == 1.0
    assert evaluation.exact_match(" 3 ", ["4", "3"]) == 0.0
    assert evaluation.exact_match("Cat", ["cat"]) == 0.0


def test_relaxed_accuracy_as_big_vision_chartqa():
    assert evaluation.relaxed_accuracy("10.4", ["10"]) == 1.0  # 4% off
    assert evaluation.relaxed_accuracy("10.6", ["10"]) == 0.0  # 6% off
    assert evaluation.relaxed_accuracy("5%", ["0.05"]) == 1.0
    assert evaluation.relaxed_accuracy("1,000", ["1000"]) == 0.0  # not a number to big_vision
    assert (
        evaluation.relaxed_accuracy("Yes", ["yes"]) == 0.0
        and evaluation.relaxed_accuracy("yes", ["yes"]) == 1.0
    )
    # A zero answer needs the exact string.
    assert evaluation.relaxed_accuracy("0", ["0"]) == 1.0
    assert evaluation.relaxed_accuracy("0.0", ["0"]) == 0.0


def test_anls_as_docvqa():
    assert evaluation.anls("The Cat", ["the cat"]) == 1.0
    # Whitespace counts as characters, as in big_vision's `anls_metric`.
    assert evaluation.anls("the  cat", ["the cat"]) == pytest.approx(1 - 1 / 8)
    assert evaluation.anls("", [""]) == 1.0 and evaluation.anls("x", [""]) == 0.0
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


def _located(y_min, x_min, y_max, x_max, label):
    return (
        "".join(f"<loc{round(v * 1023):04d}>" for v in (y_min, x_min, y_max, x_max)) + f" {label}"
    )


def test_coco_detection_is_pycocotools_on_our_boxes():
    # A wide, offset true box and a detection covering 0.62 of it: matched at
    # IoU 0.50, 0.55, 0.60 of COCO's ten thresholds. (Boxes handed over in
    # the wrong order or as corners for x, y, w, h give another IoU: 0.70.)
    truth = [[_located(0.3, 0.2, 0.5, 0.9, "cat")]]
    found = [_located(0.3, 0.2, 0.5, 0.634, "cat")]
    got = evaluation.coco_detection(found, truth)
    assert got == pytest.approx({"mAP": 0.3, "AP50": 1.0, "AP75": 0.0}, abs=1e-6)
    assert evaluation.score("coco_ap50", found, truth) == pytest.approx(1.0)
    assert evaluation.score("coco_map", truth[0], truth) == pytest.approx(1.0)
    # Two images, each category one true box: a "dog" where a cat is (a false
    # dog, ranked first: the scores tie and COCOeval keeps data-set order)
    # and a right dog: dog AP 0.5, cat AP 0, mean 0.25 at every threshold.
    truth = [[_located(0.1, 0.1, 0.6, 0.6, "cat")], [_located(0.2, 0.3, 0.9, 0.8, "dog")]]
    found = [_located(0.1, 0.1, 0.6, 0.6, "dog"), truth[1][0]]
    got = evaluation.coco_detection(found, truth)
    assert got == pytest.approx({"mAP": 0.25, "AP50": 0.25, "AP75": 0.25}, abs=1e-6)
    assert evaluation.coco_detection(["", ""], truth)["mAP"] == 0.0
    with pytest.raises(InputError, match="true box"):
        evaluation.coco_detection(["", ""], [[""], []])


def test_score_averages_and_refuses_unknown_metrics():
    assert evaluation.score("exact_match", ["a", "b"], [["a"], ["c"]]) == 0.5
    with pytest.raises(ValueError, match="Unknown metric 'bleu'"):
        evaluation.score("bleu", ["a"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        evaluation.score("exact_match", [], [])  # was NaN, with a NumPy warning


# The reference files below hold an existing implementation's outputs on the
# inputs they list: big_vision's VQAv2 evaluator functions
# (`evaluators/proj/paligemma/transfers/vqav2.py`), pycocoevalcap 1.2 (its
# Java PTB tokenizer and CIDEr-D scorer, as big_vision's COCO caption
# evaluator calls them) and big_vision's segmentation evaluator's per-example
# IoU on the `vae_tiny` decoder's masks.


def test_anls_and_relaxed_accuracy_match_big_vision(fixtures_dir):
    # big_vision's `anls_metric` (DocVQA evaluator with to_lower=True), its
    # VQA accuracy and ChartQA `_relaxed_match`, on the inputs listed
    # (tests/fixtures/gen/big_vision_metrics.py).
    reference = json.loads((fixtures_dir / "qa_big_vision_reference.json").read_text())
    for prediction, answers, want in reference["anls_lowercased"]:
        assert evaluation.anls(prediction, answers) == pytest.approx(want), (prediction, answers)
    for prediction, answer, want in reference["relaxed_accuracy"]:
        assert evaluation.relaxed_accuracy(prediction, [answer]) == want, (prediction, answer)
    # The VQA evaluator's accuracy (`answer == gt`, its `acc_any`).
    for prediction, answers, want in reference["exact_match"]:
        assert evaluation.exact_match(prediction, answers) == want, (prediction, answers)


def test_vqa_normalisation_and_accuracy_match_big_vision(fixtures_dir):
    reference = json.loads((fixtures_dir / "vqa_big_vision_reference.json").read_text())
    for text, want in reference["normalized"].items():
        assert evaluation.normalize_vqa_answer(text) == want, text
    for prediction, answers, want in reference["accuracy"]:
        assert evaluation.vqa_accuracy(prediction, answers) == pytest.approx(want), (
            prediction,
            answers,
        )


def test_vqa_accuracy_worked_examples():
    # Averaged over the ten leave-one-out subsets of min(matches / 3, 1):
    # four agreeing annotators make an answer fully right, three 0.9
    # (7 x 1 + 3 x 2/3), two 0.6 (8 x 2/3 + 2 x 1/3).
    assert evaluation.vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0
    assert evaluation.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert evaluation.vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    # Unanimous answers are compared without normalisation.
    assert evaluation.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert (
        evaluation.vqa_accuracy("the dog", ["dog"]) == 0.0
        and evaluation.vqa_accuracy(" dog ", ["dog"]) == 1.0
    )


def test_coco_caption_tokens_match_the_ptb_tokenizer(fixtures_dir):
    reference = json.loads((fixtures_dir / "cider_pycocoevalcap_reference.json").read_text())
    for text, want in reference["ptb_tokenized"].items():
        assert " ".join(evaluation.coco_caption_tokens(text)) == want, text


def test_cider_matches_pycocoevalcap(fixtures_dir):
    reference = json.loads((fixtures_dir / "cider_pycocoevalcap_reference.json").read_text())[
        "cider"
    ]
    # From raw text (our tokenizer) and from PTB's tokens: the same scores.
    for tokenize in ("ptb", "python"):
        corpus, scores = evaluation.cider(
            reference["predictions"], reference["references"], tokenize=tokenize
        )
        # pycocoevalcap's formula (tf-idf of 4 n-gram orders, cosines, length
        # penalty) in float64, summed in another order: a few dozen roundings
        # of values up to 10 (measured at most 2 ulps).
        assert_close(corpus, reference["corpus"], ulps=64, dtype="float64")
        assert_close(scores, reference["scores"], ulps=64, dtype="float64")
    corpus, _ = evaluation.cider(
        reference["tokenized_predictions"], reference["tokenized_references"], tokenize=str.split
    )
    assert_close(corpus, reference["corpus"], ulps=64, dtype="float64")  # As above.
    assert evaluation.score(
        "cider", reference["predictions"], reference["references"]
    ) == pytest.approx(corpus)


def test_cider_matches_pycocoevalcap_on_random_corpora():
    from pycocoevalcap.cider import cider as cider_module  # The test extra installs it.

    rng = np.random.default_rng(0)
    words = "a the red blue dog cat on under big small runs sits".split()
    sentence = lambda: " ".join(rng.choice(words, rng.integers(1, 9)))  # noqa: E731
    for _ in range(5):
        size = int(rng.integers(2, 8))
        predictions = [sentence() for _ in range(size)]
        references = [[sentence() for _ in range(rng.integers(1, 5))] for _ in range(size)]
        want, want_scores = cider_module.Cider().compute_score(
            {i: r for i, r in enumerate(references)}, {i: [p] for i, p in enumerate(predictions)}
        )
        got, scores = evaluation.cider(predictions, references, tokenize=str.split)
        # As test_cider_matches_pycocoevalcap: 64 float64 ulps.
        assert_close(got, want, ulps=64, dtype="float64")
        assert_close(scores, want_scores, ulps=64, dtype="float64")


def test_cider_tokenizes_with_the_live_ptb_tokenizer():
    # pycocoevalcap's PTBTokenizer runs Stanford's Java tokenizer, as
    # big_vision's COCO caption evaluator calls it.
    import shutil

    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        pytest.skip(
            "pycocoevalcap's PTB tokenizer needs Java (apt-get install default-jre-headless)"
        )
    captions = [
        "A man's dog, \"Rex\", isn't (really) big.",
        "Two cats sit on a mat; one sleeps!",
        "The U.S. flag costs $3.50 at 5:30 p.m.",
        "gonna see 'tis 10% off: don't miss it, mr.",
        "a  red   circle -- and a blue-ish square...",
    ]
    references = [[c, captions[(i + 1) % len(captions)]] for i, c in enumerate(captions)]
    predictions = captions[2:] + captions[:2]
    refs = PTBTokenizer().tokenize(
        {i: [{"caption": r} for r in rs] for i, rs in enumerate(references)}
    )
    preds = PTBTokenizer().tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    want, want_scores = Cider().compute_score(refs, preds)
    got, scores = evaluation.cider(predictions, references)
    # As test_cider_matches_pycocoevalcap: 64 float64 ulps.
    assert_close(got, want, ulps=64, dtype="float64")
    assert_close(scores, want_scores, ulps=64, dtype="float64")
    # The Java-free approximation differs on the rarer forms of line 4.
    assert evaluation.ptb_tokenize([captions[3]])[0] != evaluation.coco_caption_tokens(captions[3])
    python_score, _ = evaluation.cider(predictions, references, tokenize="python")
    # The tokenizers really differ (by 1.6e-3 here): 1e-9 is far above the 64
    # float64 ulps (~1e-14) of the equalities above, so a difference past it is
    # the tokenizer's; a larger number would be the stricter check.
    assert python_score != pytest.approx(want, abs=1e-9)


def test_cider_refuses_an_unknown_tokenizer():
    with pytest.raises(ValueError, match="tokenize must be one of"):
        evaluation.cider(["a"], [["a"]], tokenize="nltk")


def test_cider_worked_properties():
    # A prediction equal to its only reference in a corpus of distinct
    # captions scores 10 (cosine 1 for every n-gram order).
    captions = [
        "a red circle and a blue square",
        "two dogs play in a big park",
        "a man rides a wave",
    ]
    corpus, scores = evaluation.cider(captions, [[c] for c in captions])
    assert corpus == pytest.approx(10.0)
    # Words found in every example's references carry no weight.
    _, scores = evaluation.cider(["a", "b c"], [["a x"], ["a y"]])
    assert scores[0] == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        evaluation.cider(["a"], [[]])


def test_mask_ious_match_big_vision(fixtures_dir):
    reference = np.load(fixtures_dir / "segmentation_big_vision_reference.npz")
    texts = [str(t) for t in reference["texts"]]
    masks = [reference[f"mask_{i}"] for i in range(len(texts))]
    decoder = MaskDecoder.from_checkpoint(fixtures_dir / "vae_tiny" / "vae.npz")
    ious = evaluation.mask_ious(texts, masks, decoder)
    # Ratios of pixel counts, one float64 division each (measured 0).
    assert_close(ious, reference["ious"], ulps=4, dtype="float64")
    assert ious[0] > 0.4 and ious[3] == 0.0  # a matching mask, and an inverted box
    # Not a segmentation answer at all, or codes out of range: 0.
    assert evaluation.mask_ious(
        ["a cat", texts[0].replace("<seg", "<seg9", 1)], masks[:2], decoder
    ) == [0.0, 0.0]
