"""Scores of generated answers against references, as the benchmarks define them.

Each metric takes a prediction string and the list of accepted answers of
one example and returns a float in [0, 1]; `METRICS` maps their names to
them and `score(metric, predictions, answers)` averages over a data set.

  exact_match: the prediction equals an answer, character for character (big_vision's
      VQA evaluator, `transfers/vqa.py`: `answer == gt`, its `acc` for one
      answer and `acc_any` for several; no stripping, as there).
  relaxed_accuracy: ChartQA's, as big_vision's ChartQA evaluator computes
      it: a number ("12.5", "40%") may be off by 5% of a non-zero numeric
      answer; otherwise the strings must be equal.
  anls: DocVQA's average normalised Levenshtein similarity, as big_vision's
      `anls_metric` under the DocVQA/InfoVQA configs (`to_lower=True`):
      1 - distance / longer length over the lower-cased strings (nothing
      stripped or collapsed), 0 when that normalised distance is 0.5 or more;
      an empty answer counts 1 only for an empty prediction; best answer.
  vqa_accuracy: VQAv2's, as big_vision's VQAv2 evaluator computes it: an
      answer counts fully once 3 annotators gave it, averaged over the ten
      leave-one-annotator-out subsets, after the official normalisation
      (`normalize_vqa_answer`) when the annotators disagree; one reference
      answer: normalised exact match.
  cider: COCO captions' CIDEr-D over the whole data set (document
      frequencies come from all references), as the COCO caption evaluation
      (pycocoevalcap, which big_vision uses) computes it, after its PTB
      tokenizer (Java; `tokenize="python"` for `coco_caption_tokens`, an
      approximation without Java); reported x 1 (the papers print x 100).
  box_iou: detection/referring output (`<loc>` tokens): the fraction of
      answer boxes matched by a predicted box of the same label at IoU >= 0.5
      (RefCOCO's accuracy when each example has one box); answers are in the
      same `<loc>` format.
  coco_map, coco_ap50: COCO's detection AP (IoU 0.50:0.95, and 0.50) over the
      whole data set, computed by pycocotools' `COCOeval` (`coco_detection`);
      detections scored 1.0 in data-set order (the text carries no confidence).

Referring segmentation (RefCOCO's mIoU) needs the true masks and the mask
decoder: `mask_ious` scores a batch as big_vision's segmentation evaluator.
"""

import collections
import contextlib
import io
import re
import shutil

import numpy as np

from keras_paligemma2.models.task_outputs import parse_detections
from keras_paligemma2.models.task_outputs import paste_mask
from keras_paligemma2.utils.errors import InputError


def exact_match(prediction, answers):
    """1.0 if `prediction` equals one of `answers` exactly, else 0.0.

    Args:
        prediction: str, the generated answer.
        answers: list of str, the accepted answers of the example.
    """
    return float(any(prediction == answer for answer in answers))


def _number(text):
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction, answers, max_relative_change=0.05):
    """ChartQA's relaxed accuracy (see the module docstring): 1.0 or 0.0.

    Args:
        prediction: str, the generated answer.
        answers: list of str, the accepted answers of the example.
        max_relative_change: float, the relative error allowed on a non-zero
            numeric answer (default 0.05).
    """

    def correct(answer):
        want, got = _number(answer), _number(prediction)
        # A zero (or non-numeric) answer needs the exact string, as big_vision.
        if got is not None and want:
            return abs(got - want) / abs(want) <= max_relative_change
        return prediction == answer

    return float(any(correct(a) for a in answers))


# The official VQA evaluation's normalisation tables. Its contraction table
# also has capitalised keys ("Im"), which never match after lower-casing and
# are left out here.
_VQA_CONTRACTIONS = dict(
    pair.split(":")
    for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll
let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've
mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've oclock:o'clock
oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't shed've:she'd've
she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's
somethingd:something'd somethingd've:something'd've something'dve:something'd've
somethingll:something'll thats:that's thered:there'd thered've:there'd've there'dve:there'd've
therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's
whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
youll:you'll youre:you're youve:you've
""".split()
)
_VQA_REPLACEMENTS = {
    **_VQA_CONTRACTIONS,
    **dict(
        zip(
            "none zero one two three four five six seven eight nine ten".split(),
            "0 0 1 2 3 4 5 6 7 8 9 10".split(),
        )
    ),
}
_VQA_PUNCTUATION = ';/[]"{}()=+\\_->' + "<@`,?!"
_VQA_ARTICLES = {"a", "an", "the"}


def normalize_vqa_answer(text):
    """The official VQA answer normalisation, as big_vision applies it.

    Punctuation is deleted where it touches a space (or when the text has a
    digit-comma-digit, as "1,000"), else replaced by a space; full stops not
    followed by a digit are deleted; then, lower-cased, articles are dropped,
    number words become digits and contractions get their apostrophe.

    Args:
        text: str, an answer or prediction.
    """
    text = _strip_space(text)
    digit_comma = re.search(r"\d,\d", text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touching = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if digit_comma or touching else " ")
    # (The official expression meant "not between digits" but only checks
    # the digit after; big_vision keeps that, and so do we.)
    out = re.sub(r"\.(?!\d)", "", out)
    words = [w for w in out.lower().split() if w not in _VQA_ARTICLES]
    return " ".join(_VQA_REPLACEMENTS.get(w, w) for w in words)


def _strip_space(text):
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction, answers):
    """VQAv2's accuracy (see the module docstring), in [0, 1].

    Args:
        prediction: str, the generated answer.
        answers: list of str, the annotators' answers (usually ten).
    """
    answers = [_strip_space(a) for a in answers]
    prediction = _strip_space(prediction)
    # Normalised only when annotators disagree, as the official evaluation
    # (which thereby leaves unanimous OCR-like answers alone).
    if len(set(answers)) > 1:
        prediction = normalize_vqa_answer(prediction)
        answers = [normalize_vqa_answer(a) for a in answers]
    matches = np.array([prediction == a for a in answers])
    if len(matches) < 2:
        return float(matches.sum())
    return float(np.mean([min(np.delete(matches, i).sum() / 3, 1.0) for i in range(len(matches))]))


# What pycocoevalcap drops after Stanford's PTB tokenizer. Brackets come out
# as "-lrb-" etc. and stay: the tokenizer lower-cases them, the list has them
# upper-case.
_PTB_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def coco_caption_tokens(text):
    """Caption words as the COCO caption evaluation sees them.

    It runs Stanford's PTB tokenizer (Java) with lower-casing and drops
    punctuation tokens. This is the same for captions: contractions split
    ("isn't" -> "is n't", "dog's" -> "dog 's", "cannot" -> "can not"),
    quotes and punctuation dropped except inside numbers ("1,000", "10:30")
    and abbreviations ("u.s."), a sentence-final full stop dropped, brackets
    as "-lrb-", "$5" -> "$ 5", hyphenated words and "a/b" kept whole.

    Args:
        text: str, a caption.

    Returns:
        list of str, the tokens.
    """
    text = text.lower().replace('"', " ")
    for bracket, name in zip("()[]{}", ("-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-")):
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r"(^|\s)'", r"\1' ", text)  # opening single quote
    text = re.sub(r"'(\s|$)", r" '\1", text)  # closing quote or plural possessive
    text = re.sub(r"\bcannot\b", "can not", text)
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(\w)('(?:s|ll|re|ve|d|m))\b", r"\1 \2", text)
    text = re.sub(r"\$(?=\d)", "$ ", text)
    text = re.sub(r"\.\.\.|--", " ", text)
    text = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", " ", text)  # not between digits
    text = re.sub(r"[;!?]", " ", text)
    tokens = text.split()
    if tokens and tokens[-1].endswith(".") and "." not in tokens[-1][:-1]:
        tokens[-1] = tokens[-1][:-1]
    return [t for t in tokens if t and t not in _PTB_DROPPED]


def _ngram_counts(tokens, max_n):
    return collections.Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)
    )


def ptb_tokenize(texts):
    """`texts` tokenized by pycocoevalcap's `PTBTokenizer` (Stanford's Java
    PTB tokenizer, lower-cased, punctuation dropped), as big_vision's COCO
    caption evaluator tokenizes before scoring. Needs `pycocoevalcap` and a
    Java runtime (else a ValueError).

    Args:
        texts: list of str, the captions.

    Returns:
        A list of token lists, one per text.
    """

    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise InputError(
            "CIDEr with tokenize='ptb' (the COCO evaluation's tokenizer) needs "
            "pycocoevalcap: `pip install pycocoevalcap` (and a Java runtime), "
            "or pass tokenize='python' for this package's approximation."
        ) from error
    if shutil.which("java") is None:
        raise InputError(
            "CIDEr with tokenize='ptb' runs Stanford's Java PTB tokenizer, and no "
            "`java` is on PATH: install a Java runtime (e.g. apt-get install "
            "default-jre-headless), or pass tokenize='python' for this "
            "package's approximation."
        )
    tokenized = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [tokenized[i][0].split() for i in range(len(texts))]


CAPTION_TOKENIZERS = ("ptb", "python")


def cider(predictions, references, max_n=4, sigma=6.0, tokenize="ptb"):
    """CIDEr-D of `predictions` (one string each) against `references` (a
    list of strings each): (data-set score, per-example scores).

    As pycocoevalcap: n-grams up to `max_n` weighted by term frequency x
    log(examples / examples whose references hold the n-gram), per-n cosine
    similarity with the prediction's weights clipped to the reference's, a
    Gaussian length penalty (`sigma`; length counted in bigrams, as there),
    averaged over n and references, x 10.

    Args:
        predictions: list of str, one caption per example.
        references: list of lists of str, each example's reference captions
            (at least one each).
        max_n: int, the longest n-gram (default 4).
        sigma: float, the length penalty's standard deviation (default 6.0).
        tokenize: "ptb" (default: pycocoevalcap's Java PTB tokenizer, as
            big_vision's COCO caption evaluator), "python"
            (`coco_caption_tokens`, no Java needed; equal on ordinary captions,
            not on rarer forms such as "gonna", "'tis", "10%" or a final
            "mr."), or a function from a string to its tokens (`str.split`
            for text already tokenized).

    Returns:
        (float data-set score, list of per-example float scores).
    """
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions for {len(references)} examples.")
    if any(not refs for refs in references):
        raise InputError("CIDEr needs at least one reference caption for every example.")
    if tokenize == "ptb":
        flat = list(predictions) + [r for refs in references for r in refs]
        tokenize = dict(zip(flat, ptb_tokenize(flat))).__getitem__
    elif tokenize == "python":
        tokenize = coco_caption_tokens
    elif not callable(tokenize):
        raise InputError(
            f"tokenize must be one of {CAPTION_TOKENIZERS} or a function; got {tokenize!r}."
        )
    hypotheses = [_ngram_counts(tokenize(p), max_n) for p in predictions]
    references = [[_ngram_counts(tokenize(r), max_n) for r in refs] for refs in references]
    document_frequency = collections.Counter(g for refs in references for g in set().union(*refs))
    log_examples = np.log(len(references))

    def weigh(counts):
        weights = {
            g: c * (log_examples - np.log(max(1.0, document_frequency[g])))
            for g, c in counts.items()
        }
        norms = np.zeros(max_n)
        for g, w in weights.items():
            norms[len(g) - 1] += w * w
        return weights, np.sqrt(norms), sum(c for g, c in counts.items() if len(g) == 2)

    scores = []
    for hypothesis, refs in zip(hypotheses, references):
        weights, norms, length = weigh(hypothesis)
        total = np.zeros(max_n)
        for ref in refs:
            ref_weights, ref_norms, ref_length = weigh(ref)
            similarity = np.zeros(max_n)
            for g, w in weights.items():
                similarity[len(g) - 1] += min(w, ref_weights.get(g, 0.0)) * ref_weights.get(g, 0.0)
            both = (norms != 0) & (ref_norms != 0)
            similarity[both] /= norms[both] * ref_norms[both]
            total += similarity * np.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
        scores.append(float(10.0 * total.mean() / len(refs)))
    return float(np.mean(scores)), scores


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions of one character).

    Args:
        a: str (or any sequence), the first.
        b: str (or any sequence), the second.
    """
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def anls(prediction, answers, threshold=0.5):
    """DocVQA's ANLS of one example (see the module docstring), in [0, 1].

    Args:
        prediction: str, the generated answer.
        answers: list of str, the accepted answers of the example.
        threshold: float, the normalised distance from which an answer
            scores 0 (default 0.5).
    """
    got = prediction.lower()
    best = 0.0
    for answer in answers:
        want = answer.lower()
        if not want:
            best = max(best, float(got == ""))
            continue
        distance = levenshtein(want, got) / max(len(want), len(got))
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def box_iou(a, b):
    """IoU of two (y_min, x_min, y_max, x_max) boxes (0.0 for an empty union).

    Args:
        a: sequence of 4 numbers, the first box.
        b: sequence of 4 numbers, the second box, in the same units.
    """
    top, left = max(a[0], b[0]), max(a[1], b[1])
    bottom, right = min(a[2], b[2]), min(a[3], b[3])
    inter = max(bottom - top, 0) * max(right - left, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(predicted, wanted, threshold=0.5):
    """How many `wanted` objects a `predicted` one of the same label covers
    at IoU >= threshold, each used once (greedy, in prediction order).

    Args:
        predicted: list of dicts with `box` and `label` (as `parse_detections`).
        wanted: list of dicts with `box` and `label`, the true objects.
        threshold: float, the least IoU of a match (default 0.5).

    Returns:
        int, the number of matched `wanted` objects.
    """
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
    """The share of the answer's boxes the prediction matches (`box_iou` metric).

    An answer without boxes scores 1.0 only for a prediction without boxes.

    Args:
        prediction: str, the generated `<loc>` detection text.
        answers: list of str; only the first, in the same `<loc>` format, is used.
        threshold: float, the least IoU of a match (default 0.5).
    """
    wanted = parse_detections(answers[0]) if answers else []
    if not wanted:
        return float(not parse_detections(prediction))
    return match_boxes(parse_detections(prediction), wanted, threshold) / len(wanted)


_SEGMENT_ANSWER = re.compile(r"\s*((?:<loc\d{4}>){4})((?:<seg\d{3}>){16})")


def mask_ious(predictions, true_masks, mask_decoder):
    """IoU of each `segment` answer's mask with its true mask, as
    big_vision's segmentation evaluator (mIoU is their mean).

    An answer counts only if it starts with 4 `<loc>` and 16 `<seg>` tokens
    with a non-empty box; anything else scores 0. The decoded 64x64 mask is
    resized into the box cut to whole pixels of the true mask's image
    (`task_outputs.paste_mask`). An empty true mask with an empty
    prediction scores 1.

    Args:
        predictions: list of str, the generated `segment` answers.
        true_masks: list of bool arrays (H, W), one per prediction, in the
            image's pixels.
        mask_decoder: a `MaskDecoder` (codes (B, 16) to mask logits (B, 64, 64)).

    Returns:
        list of float IoUs, one per prediction.
    """
    if len(predictions) != len(true_masks):
        raise InputError(f"{len(predictions)} predictions for {len(true_masks)} masks.")
    parsed = []
    for text in predictions:
        match = _SEGMENT_ANSWER.match(text) if isinstance(text, str) else None
        bins = [int(b) for b in re.findall(r"\d{4}", match.group(1))] if match else []
        codes = [int(c) for c in re.findall(r"\d{3}", match.group(2))] if match else []
        valid = (
            bool(match)
            and max(bins) <= 1023
            and max(codes) < 128
            and bins[2] > bins[0]
            and bins[3] > bins[1]
        )
        parsed.append((bins, codes) if valid else None)
    ready = [p for p in parsed if p is not None]
    logits = iter(
        np.asarray(mask_decoder(np.array([codes for _, codes in ready], "int32"))) if ready else []
    )
    ious = []
    for answer, truth in zip(parsed, true_masks):
        truth = np.asarray(truth, bool)
        if answer is None:
            ious.append(0.0)
            continue
        height, width = truth.shape
        y_min, x_min, y_max, x_max = (b / 1023 for b in answer[0])
        predicted = paste_mask(
            next(logits),
            (y_min * height, x_min * width, y_max * height, x_max * width),
            (height, width),
        )
        intersection = (predicted & truth).sum()
        union = predicted.sum() + truth.sum() - intersection
        ious.append(float(intersection / union) if union else 1.0)
    return ious


def coco_detection(predictions, answers):
    """COCO's detection average precision over a data set, computed by
    pycocotools' own `COCOeval` (the COCO evaluation code).

    Each example is one image: its true objects are its first answer's
    `<loc>` boxes and labels, its detections the prediction's. PaliGemma's
    text carries no confidence, so every detection scores 1.0 and COCOeval
    ranks them in data-set order (its sorts are stable). Boxes stay in the
    `<loc>` grid's [0, 1] units: IoU does not depend on them (COCO's area
    ranges do, so only the all-areas figures are returned). Labels no true
    object has are not a COCO category, and COCOeval leaves them out.

    Args:
        predictions: list of str, each example's generated detection text.
        answers: list of lists of str, each example's answers (the first in
            the same `<loc>` format).

    Returns:
        dict of floats: "mAP" (AP over IoU 0.50:0.05:0.95), "AP50", "AP75",
        COCOeval's first three statistics (100 detections per image).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise InputError(
            "COCO detection metrics need pycocotools: pip install pycocotools"
        ) from error
    truth = [parse_detections(a[0]) if a else [] for a in answers]
    found = [parse_detections(p) for p in predictions]
    labels = sorted({o["label"] for objects in truth for o in objects})
    if not labels:
        raise InputError("No example has a true box: COCO detection metrics need some.")
    category = {label: i + 1 for i, label in enumerate(labels)}

    def xywh(box):
        y_min, x_min, y_max, x_max = box
        return [x_min, y_min, x_max - x_min, y_max - y_min]

    images = [{"id": i + 1, "height": 1, "width": 1} for i in range(len(answers))]
    annotations = [
        {
            "id": n,
            "image_id": i + 1,
            "category_id": category[o["label"]],
            "bbox": xywh(o["box"]),
            "area": xywh(o["box"])[2] * xywh(o["box"])[3],
            "iscrowd": 0,
        }
        for n, (i, o) in enumerate(
            ((i, o) for i, objects in enumerate(truth) for o in objects), start=1
        )
    ]
    detections = [
        {
            "image_id": i + 1,
            "category_id": category[o["label"]],
            "bbox": xywh(o["box"]),
            "score": 1.0,
        }
        for i, objects in enumerate(found)
        for o in objects
        if o["label"] in category
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ground = COCO()
        ground.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": label} for label, i in category.items()],
        }
        ground.createIndex()
        if not detections:  # loadRes refuses an empty list; AP is 0
            return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
        results = ground.loadRes(detections)
        evaluator = COCOeval(ground, results, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) for i, name in enumerate(("mAP", "AP50", "AP75"))}


# Scored over the whole data set at once, not averaged per example.
CORPUS_METRICS = {
    "cider": lambda predictions, answers: cider(predictions, answers)[0],
    "coco_map": lambda predictions, answers: coco_detection(predictions, answers)["mAP"],
    "coco_ap50": lambda predictions, answers: coco_detection(predictions, answers)["AP50"],
}

METRICS = {
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "vqa_accuracy": vqa_accuracy,
    "box_iou": box_accuracy,
}


def score(metric, predictions, answers):
    """`metric` (a name in `METRICS` or `CORPUS_METRICS`) over a data set:
    the mean of the per-example scores, or the corpus score.

    Args:
        metric: str, a name in `METRICS` or `CORPUS_METRICS` (else a ValueError).
        predictions: list of str, one per example.
        answers: list of lists of str, each example's accepted answers.
    """
    if metric not in METRICS and metric not in CORPUS_METRICS:
        raise InputError(
            f"Unknown metric {metric!r}; choose one of {sorted({**METRICS, **CORPUS_METRICS})}."
        )
    if len(predictions) != len(answers):
        raise InputError(f"{len(predictions)} predictions for {len(answers)} examples.")
    if not predictions:
        raise InputError(f"No examples to score {metric} on: the data set is empty.")
    if metric in CORPUS_METRICS:
        return float(CORPUS_METRICS[metric](predictions, answers))
    return float(np.mean([METRICS[metric](p, a) for p, a in zip(predictions, answers)]))
