"""Detection/segmentation parsing and big_vision's mask decoder."""

import numpy as np
import pytest
from helpers import SMALL_TEXT_TASK
from helpers import assert_close
from helpers import tiny_lm
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_paligemma2 import CheckpointError
from keras_paligemma2 import MaskDecoder
from keras_paligemma2 import parse_detections
from keras_paligemma2.models.task_outputs import format_detections
from keras_paligemma2.models.task_outputs import paste_mask


def test_mask_decoder_reproduces_big_vision(fixtures_dir):
    reference = np.load(fixtures_dir / "vae_tiny" / "reference_outputs.npz")
    decoder = MaskDecoder.from_checkpoint(fixtures_dir / "vae_tiny" / "vae.npz")
    logits = np.asarray(decoder(reference["codes"]))
    assert logits.shape == (3, 64, 64)
    # big_vision's VQ-VAE decoder (flax) and ours (Keras), float32 on the same
    # XLA: bit-equal here (measured 0); 32 ulps of the largest mask logit for
    # another lowering of the convolutions' sums.
    assert_close(logits, reference["mask_logits"], ulps=32)


def test_mask_decoder_refuses_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not big_vision's mask decoder"):
        MaskDecoder.from_checkpoint(tmp_path / "x.npz")


def test_parse_detections_in_pixels():
    text = "<loc0000><loc0000><loc0511><loc1023> cat ; <loc0100><loc0200><loc0300><loc0400> dog"
    objects = parse_detections(text, image_size=(1023, 2046))
    assert [o["label"] for o in objects] == ["cat", "dog"]
    assert objects[0]["box"] == pytest.approx((0, 0, 511, 2046))
    assert objects[1]["box"] == pytest.approx((100, 400, 300, 800))


def test_segmentation_codes_are_parsed():
    codes = list(range(16))
    text = "<loc0010><loc0020><loc0500><loc0600>" + "".join(f"<seg{c:03d}>" for c in codes) + " cat"
    (obj,) = parse_detections(text)
    assert obj["codes"] == codes and obj["label"] == "cat"


def test_malformed_objects_are_skipped():
    text = (
        "<loc0500><loc0000><loc0100><loc1023> upside down ; <loc0001><loc0002> short ; "
        "<loc0000><loc0000><loc0100><loc0100> ok"
    )
    assert [o["label"] for o in parse_detections(text)] == ["ok"]
    assert parse_detections(None) == []


_span = st.lists(st.integers(0, 1023), min_size=2, max_size=2, unique=True).map(sorted)
boxes = st.tuples(_span, _span).map(lambda s: (s[0][0], s[1][0], s[0][1], s[1][1]))


@given(st.lists(st.tuples(boxes, st.sampled_from(["cat", "dog", "red circle"])), max_size=5))
@settings(max_examples=50, deadline=None)
def test_round_trip_within_one_bin(objects):
    height, width = 480, 640
    pixel_objects = [
        {
            "box": (
                b[0] / 1023 * height,
                b[1] / 1023 * width,
                b[2] / 1023 * height,
                b[3] / 1023 * width,
            ),
            "label": label,
        }
        for b, label in objects
    ]
    parsed = parse_detections(format_detections(pixel_objects, (height, width)), (height, width))
    assert [p["label"] for p in parsed] == [o["label"] for o in pixel_objects]
    for p, o in zip(parsed, pixel_objects):
        scale = (height, width, height, width)
        assert all(abs(a - b) <= s / 1023 + 1e-9 for a, b, s in zip(p["box"], o["box"], scale))


@given(st.text(alphabet=st.sampled_from(list("<>loc0123456789seg ;abc")), max_size=200))
@settings(max_examples=200, deadline=None)
def test_parser_never_raises(text):
    for obj in parse_detections(text, image_size=(10, 10)):
        y0, x0, y1, x1 = obj["box"]
        assert 0 <= y0 < y1 <= 10 and 0 <= x0 < x1 <= 10


def test_paste_mask_into_box():
    logits = -np.ones((64, 64), np.float32)
    logits[:, 32:] = 1.0  # Right half positive.
    mask = paste_mask(logits, (10, 20, 30, 60), (50, 100))
    assert mask[10:30, 41:60].all() and not mask[10:30, 20:39].any()
    assert not mask[:10].any() and not mask[30:].any()


@pytest.fixture
def text_lm():
    return tiny_lm(words=("detect cat", "segment cat", "caption en"), **SMALL_TEXT_TASK)


def test_task_calls_send_big_vision_prompts_and_scale_boxes(
    text_lm, monkeypatch, fixtures_dir, tmp_path
):
    seen = []
    reply = "<loc0000><loc0000><loc0511><loc1023> cat"

    def fake_generate(inputs, **kwargs):
        seen.append(inputs["prompts"])
        return [reply] * len(inputs["prompts"])

    monkeypatch.setattr(text_lm, "generate", fake_generate)
    image = np.zeros((100, 200, 3), np.uint8)
    assert text_lm.caption(image) == reply
    text_lm.answer([image, image], "how many cats?", language="de")
    text_lm.ocr(image)
    objects = text_lm.detect(image, ["cat", "dog"])
    assert seen == [["caption en"], ["answer de how many cats?"] * 2, ["ocr"], ["detect cat ; dog"]]
    assert objects[0]["label"] == "cat"
    assert objects[0]["box"] == pytest.approx((0, 0, 511 / 1023 * 100, 200))

    reference = np.load(fixtures_dir / "vae_tiny" / "reference_outputs.npz")
    reply = (
        "<loc0000><loc0000><loc1023><loc1023>"
        + "".join(f"<seg{c:03d}>" for c in reference["codes"][0])
        + " cat"
    )
    (segmented,) = text_lm.segment(image, "cat", fixtures_dir / "vae_tiny" / "vae.npz")
    assert seen[-1] == ["segment cat"]
    assert segmented["mask"].shape == (100, 200)
    expected = (
        np.asarray(
            __import__("PIL.Image", fromlist=["Image"])
            .fromarray(reference["mask_logits"][0])
            .resize((200, 100), resample=2)
        )
        > 0
    )
    np.testing.assert_array_equal(segmented["mask"], expected)
    from keras_paligemma2.apps.drawing import draw

    picture = draw(image, [segmented], tmp_path / "out.png")
    assert picture.size == (200, 100) and (tmp_path / "out.png").exists()
    assert np.asarray(picture).any()  # Something was drawn on the black image.


def test_text_prompts_need_a_tokenizer(fixtures_dir):
    from keras_paligemma2 import PaliGemma2CausalLM

    lm = PaliGemma2CausalLM.from_preset(fixtures_dir / "bv_tiny" / "tiny_f32.npz")
    with pytest.raises(ValueError, match="no tokenizer"):
        lm.caption(np.zeros((42, 42, 3), np.uint8))
