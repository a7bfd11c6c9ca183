"""Detection/segmentation parsing and big_vision's mask decoder."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_paligemma2 import CheckpointError
from keras_paligemma2 import MaskDecoder
from keras_paligemma2 import parse_detections
from keras_paligemma2.task_outputs import format_detections
from keras_paligemma2.task_outputs import paste_mask


def test_mask_decoder_reproduces_big_vision(fixtures_dir):
    reference = np.load(fixtures_dir / "vae_tiny" / "reference_outputs.npz")
    decoder = MaskDecoder.from_checkpoint(fixtures_dir / "vae_tiny" / "vae.npz")
    logits = np.asarray(decoder(reference["codes"]))
    assert logits.shape == (3, 64, 64)
    assert np.abs(logits - reference["mask_logits"]).max() < 1e-4


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
    text = "<loc0500><loc0000><loc0100><loc1023> upside down ; <loc0001><loc0002> short ; <loc0000><loc0000><loc0100><loc0100> ok"
    assert [o["label"] for o in parse_detections(text)] == ["ok"]
    assert parse_detections(None) == []


boxes = st.tuples(*[st.integers(0, 1023)] * 4).filter(lambda b: b[2] > b[0] and b[3] > b[1])


@given(st.lists(st.tuples(boxes, st.sampled_from(["cat", "dog", "red circle"])), max_size=5))
@settings(max_examples=50, deadline=None)
def test_round_trip_within_one_bin(objects):
    height, width = 480, 640
    pixel_objects = [
        {"box": (b[0] / 1023 * height, b[1] / 1023 * width, b[2] / 1023 * height, b[3] / 1023 * width), "label": label}
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
