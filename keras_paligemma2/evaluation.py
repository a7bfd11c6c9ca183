"""Scores of generated answers against references, as the benchmarks define them.

Each metric takes a prediction string and the list of accepted answers of
one example and returns a float in [0, 1]; `METRICS` maps their names to
them and `score(metric, predictions, answers)` averages over a data set.

  exact_match: the prediction, stripped, equals an answer.
  relaxed_accuracy: ChartQA's, as big_vision's ChartQA evaluator computes
      it: a number ("12.5", "40%") may be off by 5% of a non-zero numeric
      answer; otherwise the strings must be equal.
  anls: DocVQA's average normalised Levenshtein similarity: 1 - distance /
      longer length, over lower-cased stripped strings, 0 when that
      normalised distance is 0.5 or more; best answer.
  box_iou: detection/referring output (`<loc>` tokens): the fraction of
      answer boxes matched by a predicted box of the same label at IoU >= 0.5
      (RefCOCO's accuracy when each example has one box); answers are in the
      same `<loc>` format.
"""

import numpy as np

from keras_paligemma2.task_outputs import parse_detections


def exact_match(prediction, answers):
    return float(prediction.strip() in [a.strip() for a in answers])


def _number(text):
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction, answers, max_relative_change=0.05):
    def correct(answer):
        want, got = _number(answer), _number(prediction)
        # A zero (or non-numeric) answer needs the exact string, as big_vision.
        if got is not None and want:
            return abs(got - want) / abs(want) <= max_relative_change
        return prediction == answer

    return float(any(correct(a) for a in answers))


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions of one character)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction, answers, threshold=0.5):
    best = 0.0
    got = " ".join(prediction.strip().lower().split())
    for answer in answers:
        want = " ".join(answer.strip().lower().split())
        longest = max(len(got), len(want))
        distance = levenshtein(got, want) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def box_iou(a, b):
    """IoU of two (y_min, x_min, y_max, x_max) boxes."""
    top, left = max(a[0], b[0]), max(a[1], b[1])
    bottom, right = min(a[2], b[2]), min(a[3], b[3])
    inter = max(bottom - top, 0) * max(right - left, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(predicted, wanted, threshold=0.5):
    """How many `wanted` objects a `predicted` one of the same label covers
    at IoU >= threshold, each used once (greedy, in prediction order)."""
    free = list(wanted)
    matched = 0
    for obj in predicted:
        same = [w for w in free if w["label"] == obj["label"]]
        best = max(same, key=lambda w: box_iou(obj["box"], w["box"]), default=None)
        if best is not None and box_iou(obj["box"], best["box"]) >= threshold:
            matched += 1
            free.remove(best)
    return matched


def box_accuracy(prediction, answers, threshold=0.5):
    wanted = parse_detections(answers[0]) if answers else []
    if not wanted:
        return float(not parse_detections(prediction))
    return match_boxes(parse_detections(prediction), wanted, threshold) / len(wanted)


METRICS = {
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "box_iou": box_accuracy,
}


def score(metric, predictions, answers):
    """The mean of `metric` (a name in `METRICS`) over a data set."""
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {sorted(METRICS)}.")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} examples.")
    return float(np.mean([METRICS[metric](p, a) for p, a in zip(predictions, answers)]))
