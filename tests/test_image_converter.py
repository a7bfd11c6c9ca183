"""PaliGemma2ImageConverter: big_vision's squash-resize and [-1, 1] range."""

import numpy as np
import PIL.Image
import pytest

from keras_paligemma2 import PaliGemma2ImageConverter


def _bilinear_reference(image, size):
    """Half-pixel-centre bilinear resize (TF's `resize` without antialias)."""
    h, w, c = image.shape
    out = np.zeros((size, size, c))
    for i in range(size):
        for j in range(size):
            y = max((i + 0.5) * h / size - 0.5, 0)
            x = max((j + 0.5) * w / size - 0.5, 0)
            y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = (
                image[y0, x0] * (1 - dy) * (1 - dx)
                + image[y0, x1] * (1 - dy) * dx
                + image[y1, x0] * dy * (1 - dx)
                + image[y1, x1] * dy * dx
            )
    return out


def test_squash_resize_and_range_match_reference():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 5, 3)).astype(np.uint8)  # Not square: squashed.
    converter = PaliGemma2ImageConverter(7)
    got = converter(image)
    want = _bilinear_reference(image.astype(np.float64), 7) / 127.5 - 1
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert converter([np.zeros((2, 2, 3), np.uint8)]).min() == -1.0
    assert converter([np.full((2, 2, 3), 255, np.uint8)]).max() == 1.0


def test_antialias_option_changes_downsampling():
    # Noise: without antialias, bilinear averages 2x2 pixels per output
    # pixel; with it, the whole 8x8 footprint, so far less variance is left.
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    plain = PaliGemma2ImageConverter(8)(noise)
    smooth = PaliGemma2ImageConverter(8, antialias=True)(noise)
    assert smooth.std() < plain.std() / 2


def test_every_kind_of_input(tmp_path):
    PIL.Image.fromarray(np.full((10, 20, 4), (255, 0, 0, 0), np.uint8)).save(tmp_path / "clear.png")
    converter = PaliGemma2ImageConverter(6)
    batch = converter(
        [
            str(tmp_path / "clear.png"),  # Fully transparent: white.
            PIL.Image.new("L", (30, 40), 0),  # Greyscale.
            np.full((8, 8), 255, np.uint8),  # 2-D greyscale array.
            np.full((50, 9, 3), 127.5, np.float32),  # Float in [0, 255].
        ]
    )
    assert batch.shape == (4, 6, 6, 3) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], 1.0)
    np.testing.assert_allclose(batch[1], -1.0)
    np.testing.assert_allclose(batch[2], 1.0)
    np.testing.assert_allclose(batch[3], 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "image,message",
    [
        ("/no/such/file.png", "Cannot read image 0"),
        (np.zeros((4, 4, 5), np.uint8), "with 1, 3 or 4 channels"),
        (np.zeros((2, 4, 4, 3, 1), np.uint8), "has shape"),
        (np.full((4, 4, 3), 0.5, np.float32), "multiply it by 255"),
        (np.full((4, 4, 3), 300.0, np.float32), "must be in \\[0, 255\\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.array([["a"]]), "not an image|numeric array"),
        ([], "No images"),
    ],
)
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        PaliGemma2ImageConverter(6)(image if not isinstance(image, np.ndarray) or image.ndim != 5 else list(image))


def test_text_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="Cannot read image 0"):
        PaliGemma2ImageConverter(6)(str(tmp_path / "notes.txt"))
