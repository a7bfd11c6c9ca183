"""Constrained decoding: `allowed_tokens` (big_vision's `mask_logits`) and
`constrain="task"` (detect / segment replies that always parse)."""

import numpy as np
import pytest
from helpers import tiny_lm

from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.apps import shapes
from keras_paligemma2.models.constraints import DETECT
from keras_paligemma2.models.constraints import FREE
from keras_paligemma2.models.constraints import SEGMENT
from keras_paligemma2.models.constraints import prompt_format
from keras_paligemma2.models.task_outputs import format_detections
from keras_paligemma2.models.task_outputs import parse_detections
from keras_paligemma2.utils.errors import InputError

PROMPTS = [
    "detect cat ; red circle",
    "segment blue square",
    "caption en",
    "detect red circle ; blue square ; cat",
    "segment cat ; red circle",
    "detect cat",
]


def test_prompt_format():
    assert prompt_format("detect cat ; dog") == (DETECT, ["cat", "dog"])
    assert prompt_format(" segment red car ; red car ") == (SEGMENT, ["red car"])
    assert prompt_format("detection en") == (FREE, [])
    assert prompt_format("caption en") == (FREE, [])
    with pytest.raises(InputError, match="names no class"):
        prompt_format("detect ; ")


@pytest.fixture(scope="module")
def random_lm():
    # Random weights: without the constraint nearly every reply is malformed.
    return tiny_lm(seed=3, scale=0.3, vit_num_layers=1, num_layers=1)


def _images(n, size):
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype(np.uint8)


def test_constrained_replies_always_parse(random_lm):
    lm = random_lm
    images = _images(len(PROMPTS), lm.backbone.image_size)
    tokenizer = lm.preprocessor.tokenizer
    objects_seen, free_malformed = [], 0
    # Budgets from too small for any object (eos only) to several objects; sampled, so every
    # grammar branch is taken somewhere (the seed is not part of the compiled loop).
    for budget, seed in ((3, 0), (26, 1), (26, 2), (64, 3), (64, 4)):
        inputs = {"images": list(images), "prompts": PROMPTS}
        replies = lm.generate(
            inputs, max_new_tokens=budget, constrain="task", temperature=1.0, seed=seed
        )
        for prompt, reply in zip(PROMPTS, replies):
            kind, labels = prompt_format(prompt)
            if kind == FREE:
                free_malformed += format_detections(parse_detections(reply)) != reply
                continue
            found = parse_detections(reply)
            # The whole reply is objects and nothing else, and it fits in the budget.
            assert format_detections(found) == reply, (prompt, budget, reply)
            assert len(tokenizer.tokenize(reply)) + 1 <= budget, (reply, budget)
            assert all(o["label"] in labels for o in found), (prompt, reply)
            assert all(("codes" in o) == (kind == SEGMENT) for o in found), reply
            objects_seen.append(len(found))
    assert free_malformed  # the free row is unconstrained
    assert max(objects_seen) >= 3 and 0 in objects_seen and 1 in objects_seen


def test_token_ids_in_and_per_row_room(random_lm):
    """Token ids in, `max_length`: each row's own room (width - its prompt) bounds its reply."""
    lm = random_lm
    prompts = ["detect cat", "detect red circle ; cat"]
    features = lm.preprocessor.generate_preprocess(
        {"images": list(_images(2, lm.backbone.image_size)), "prompts": prompts}
    )
    lengths = np.asarray(features["padding_mask"]).sum(1)
    width = int(lengths.max()) + 12
    out = lm.generate(
        features, max_length=width, constrain="task", temperature=1.0, seed=7, strip_prompt=True
    )
    tokenizer = lm.preprocessor.tokenizer
    for row, prompt in enumerate(prompts):
        ids = out["token_ids"][row][out["padding_mask"][row]].tolist()
        assert len(ids) <= width - lengths[row]
        assert ids[-1] == tokenizer.end_token_id, ids
        reply = tokenizer.detokenize(ids[:-1])
        assert format_detections(parse_detections(reply)) == reply


def test_unconstrained_and_constrained_agree_when_the_model_obeys():
    """pg2_tiny_shapes was trained on `detect` (one shape per prompt): greedy replies are
    well formed already, and the constraint changes none of them; nor the other tasks."""
    lm = PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")
    examples = shapes.training_examples(16, seed=41, task_weights={"detect": 4.0})
    inputs = {"images": list(examples["images"]), "prompts": list(examples["prompts"])}
    free = lm.generate(inputs, max_new_tokens=24)
    constrained = lm.generate(inputs, max_new_tokens=24, constrain="task")
    assert constrained == free
    detections = [r for r, t in zip(free, examples["tasks"]) if t == "detect"]
    assert sum(bool(parse_detections(r)) for r in detections) >= 2, detections


def test_allowed_tokens_masks_the_logits_as_big_vision(random_lm):
    lm = random_lm
    rng = np.random.default_rng(5)
    vocabulary = lm.backbone.vocabulary_size
    images = rng.uniform(-1, 1, (2, lm.backbone.image_size, lm.backbone.image_size, 3))
    separator = lm.preprocessor.tokenizer.separator_ids[0]
    ids = np.array([[2, 10, 11, separator], [2, separator, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    inputs = {"images": images, "token_ids": ids, "padding_mask": mask}
    kept = rng.choice(vocabulary, 40, replace=False)
    kwargs = dict(max_new_tokens=6, stop_token_ids=None, strip_prompt=True, return_logits=True)
    free = lm.generate(inputs, **kwargs)
    out = lm.generate(inputs, allowed_tokens=kept, **kwargs)
    allowed = np.zeros(vocabulary, bool)
    allowed[kept] = True
    assert np.isin(out["token_ids"], kept).all()
    # The first step's logits are the free decode's with the rest at -inf, and each
    # step's token is the best allowed one.
    np.testing.assert_array_equal(
        out["logits"][:, 0], np.where(allowed, free["logits"][:, 0], -np.inf)
    )
    np.testing.assert_array_equal(out["token_ids"], out["logits"].argmax(-1))
    assert np.isneginf(out["logits"][:, :, ~allowed]).all()
    # A bool mask over the vocabulary means the same.
    np.testing.assert_array_equal(
        lm.generate(inputs, allowed_tokens=allowed, **kwargs)["token_ids"], out["token_ids"]
    )


def test_constraint_errors(random_lm):
    lm = random_lm
    inputs = {"images": list(_images(1, lm.backbone.image_size)), "prompts": ["detect cat"]}
    vocabulary = lm.backbone.vocabulary_size
    cases = [
        (dict(constrain="detect"), 'constrain must be None or "task"'),
        (dict(constrain="task", allowed_tokens=[3]), "not both"),
        (dict(constrain="task", beam_size=2), "not with beam search"),
        (dict(constrain="task", stop_token_ids=None), "must be a stop token"),
        (dict(allowed_tokens=[3, vocabulary]), "outside the vocabulary"),
        (dict(allowed_tokens=np.ones(7, bool)), "must have shape"),
        (dict(allowed_tokens=[]), "non-empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            lm.generate(inputs, max_new_tokens=4, **kwargs)
    with pytest.raises(InputError, match="names no class"):
        lm.generate({**inputs, "prompts": ["detect"]}, max_new_tokens=4, constrain="task")
