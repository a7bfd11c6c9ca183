"""PaliGemma2ImageConverter: big_vision's pipeline bit for bit, other pipelines by name.

`tests/fixtures/big_vision_pp/reference.npz` holds big_vision's own pp ops'
output (`decode|resize(S)|value_range(-1, 1)`, as every PaliGemma transfer
config writes it) on photographs shipped by scikit-image
(`tests/fixtures/images/`), made by tests/fixtures/gen/big_vision_pp_loss_optax.py.
"""

import io

import numpy as np
import PIL.Image
import pytest
from helpers import assert_close

from keras_paligemma2 import PaliGemma2ImageConverter
from keras_paligemma2.preprocessing.image_converter import value_range

# The four photographs and the two files derived from them whose big_vision
# output equals their source's (16-bit: value >> 8; RGBA: alpha dropped).
PHOTOS = {
    "rocket.jpg": "rocket",
    "chelsea.png": "chelsea",
    "coins.png": "coins",
    "horse.png": "horse",
    "coins_gray16.png": "coins",
    "chelsea_rgba.png": "chelsea",
}


@pytest.fixture(scope="module")
def reference():
    from conftest import FIXTURES

    return np.load(FIXTURES / "big_vision_pp" / "reference.npz")


@pytest.fixture(scope="module")
def images_dir():
    from conftest import FIXTURES

    return FIXTURES / "images"


def test_value_range_is_big_vision_bit_for_bit(reference):
    table = reference["value_range_table"]
    got = value_range(np.arange(256, dtype=np.uint8))
    np.testing.assert_array_equal(got.view(np.uint32), table.view(np.uint32))


# 448 px is stored for the JPEG and the RGBA PNG (the fixture's size).
SIZES = [(name, 224) for name in sorted(PHOTOS)] + [("rocket.jpg", 448), ("horse.png", 448)]


@pytest.mark.parametrize("name, size", SIZES)
def test_files_convert_as_big_vision_bit_for_bit(reference, images_dir, name, size):
    key = f"{PHOTOS[name]}/resize{size}"
    got = PaliGemma2ImageConverter(size)(str(images_dir / name))
    want = reference["value_range_table"][reference[key]]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # max |diff| 0


def test_full_pipeline_on_the_jpeg_is_big_vision_bit_for_bit(reference, images_dir):
    got = PaliGemma2ImageConverter(224)(str(images_dir / "rocket.jpg"))
    np.testing.assert_array_equal(got.view(np.uint32), reference["rocket/full224"].view(np.uint32))
    # From encoded bytes too (big_vision's `decode` takes bytes).
    data = (images_dir / "rocket.jpg").read_bytes()
    np.testing.assert_array_equal(PaliGemma2ImageConverter(224)(data), got)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_antialias_pipeline_is_big_vision_bit_for_bit(reference, images_dir, name):
    got = PaliGemma2ImageConverter(224, pipeline="big_vision_antialias")(str(images_dir / name))
    want = reference["value_range_table"][reference[f"{PHOTOS[name]}/antialias224"]]
    np.testing.assert_array_equal(got, want)


def test_uint8_arrays_and_pil_images_take_the_same_path(reference, images_dir):
    table = reference["value_range_table"]
    converter = PaliGemma2ImageConverter(224)
    # big_vision's own decoded JPEG pixels, as an array.
    np.testing.assert_array_equal(
        converter(reference["rocket/decoded"]), table[reference["rocket/resize224"]]
    )
    for name in ("chelsea.png", "coins.png", "horse.png", "coins_gray16.png", "chelsea_rgba.png"):
        want = table[reference[f"{PHOTOS[name]}/resize224"]]
        with PIL.Image.open(images_dir / name) as image:
            image.load()
            np.testing.assert_array_equal(converter(image), want, err_msg=name)
            np.testing.assert_array_equal(converter(np.asarray(image)), want, err_msg=name)


def test_colab_pipeline_is_the_colab_bit_for_bit(reference, images_dir):
    got = PaliGemma2ImageConverter(224, pipeline="colab")(str(images_dir / "rocket.jpg"))
    np.testing.assert_array_equal(got, reference["rocket/colab224"])
    default = PaliGemma2ImageConverter(224)(str(images_dir / "rocket.jpg"))
    assert np.abs(got - default).max() > 0.01  # PIL's JPEG decoder, antialias, no uint8 round trip.


def test_keras_hub_pipeline_is_keras_hub_converter(images_dir):
    import keras_hub

    with PIL.Image.open(images_dir / "rocket.jpg") as image:
        pixels = np.asarray(image.convert("RGB"))
    keras_hub_converter = keras_hub.layers.ImageConverter(
        image_size=(224, 224),
        scale=1 / 127.5,
        offset=-1.0,
        crop_to_aspect_ratio=True,
        interpolation="bilinear",
    )
    want = np.asarray(keras_hub_converter(pixels[None].astype(np.float32)))[0]
    got = PaliGemma2ImageConverter(224, pipeline="keras_hub")(str(images_dir / "rocket.jpg"))
    np.testing.assert_array_equal(got, want)
    # keras-hub crops the 640 x 427 photograph to its centred square.
    squashed = PaliGemma2ImageConverter(224, pipeline="colab")(str(images_dir / "rocket.jpg"))
    assert np.abs(got - squashed).max() > 0.1


def test_pipeline_survives_the_config_round_trip():
    converter = PaliGemma2ImageConverter(224, pipeline="colab")
    restored = PaliGemma2ImageConverter.from_config(converter.get_config())
    assert restored.pipeline == "colab" and restored.side == 224
    assert PaliGemma2ImageConverter(224, antialias=True).pipeline == "big_vision_antialias"
    with pytest.raises(ValueError, match="Unknown image pipeline"):
        PaliGemma2ImageConverter(224, pipeline="pil")


def test_antialias_option_changes_downsampling():
    # Noise: without antialias, bilinear averages 2x2 pixels per output
    # pixel; with it, the whole 8x8 footprint, so far less variance is left.
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    plain = PaliGemma2ImageConverter(8)(noise)
    smooth = PaliGemma2ImageConverter(8, pipeline="big_vision_antialias")(noise)
    assert smooth.std() < plain.std() / 2


def test_array_dtypes():
    converter = PaliGemma2ImageConverter(6)
    rng = np.random.default_rng(2)
    levels = rng.integers(0, 256, (10, 20, 3)).astype(np.uint8)
    want = converter(levels)
    # uint16 as TensorFlow decodes a 16-bit PNG: value >> 8.
    np.testing.assert_array_equal(converter(levels.astype(np.uint16) * 256 + 255), want)
    # Other integers holding levels: the same levels.
    np.testing.assert_array_equal(converter(levels.astype(np.int64)), want)
    # Greyscale repeated, alpha dropped (not composited), as `decode`.
    grey = levels[..., :1]
    np.testing.assert_array_equal(converter(grey), converter(np.repeat(grey, 3, -1)))
    with_alpha = np.concatenate([levels, np.zeros((10, 20, 1), np.uint8)], -1)
    np.testing.assert_array_equal(converter(with_alpha), want)
    # Floats in [0, 255] stay floats through the resize (big_vision's resize
    # keeps the input dtype): the same up to the uint8 truncation.
    floats = converter(levels.astype(np.float32))
    assert np.abs(floats - want).max() <= 2 / 255 + 1e-6
    assert converter([np.zeros((2, 2, 3), np.uint8)]).min() == -1.0
    assert converter([np.full((2, 2, 3), 255, np.uint8)]).max() == 1.0


def test_every_kind_of_input(tmp_path):
    PIL.Image.fromarray(np.full((10, 20, 4), (255, 0, 0, 0), np.uint8)).save(tmp_path / "clear.png")
    palette = PIL.Image.new("P", (12, 12), 3)
    palette.putpalette([0, 0, 0] * 3 + [255, 255, 255] + [0, 0, 0] * 252)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    converter = PaliGemma2ImageConverter(6)
    batch = converter(
        [
            str(tmp_path / "clear.png"),  # Alpha dropped: red, whatever the alpha.
            PIL.Image.new("L", (30, 40), 0),  # Greyscale.
            np.full((8, 8), 255, np.uint8),  # 2-D greyscale array.
            np.full((50, 9, 3), 127.5, np.float32),  # Float in [0, 255].
            buffer.getvalue(),  # Encoded bytes of a palette PNG (white).
        ]
    )
    assert batch.shape == (5, 6, 6, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0][..., 0], 1.0)
    np.testing.assert_array_equal(batch[0][..., 1:], -1.0)
    np.testing.assert_allclose(batch[1], -1.0)
    np.testing.assert_allclose(batch[2], 1.0)
    # A constant resized: weights summing to 1 up to a few roundings, then
    # / 127.5 - 1 (measured 0).
    assert_close(batch[3], 0.0, ulps=8)
    np.testing.assert_allclose(batch[4], 1.0)


@pytest.mark.parametrize(
    "image,message",
    [
        ("/no/such/file.png", "Cannot read image 0"),
        (np.zeros((4, 4, 5), np.uint8), "with 1, 3 or 4 channels"),
        (np.zeros((2, 4, 4, 3, 1), np.uint8), "has shape"),
        (np.full((4, 4, 3), 0.5, np.float32), "multiply it by 255"),
        (np.full((4, 4, 3), 300.0, np.float32), "must be in \\[0, 255\\]"),
        (np.full((4, 4, 3), -3, np.int32), "values in \\[-3, -3\\]"),
        (np.full((4, 4, 3), 1000, np.int64), "uint16"),
        (np.ones((4, 4, 3), bool), "boolean"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.array([["a"]]), "not an image|numeric array"),
        ([], "No images"),
    ],
)
def test_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        PaliGemma2ImageConverter(6)(
            image if not isinstance(image, np.ndarray) or image.ndim != 5 else list(image)
        )


def test_text_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="Cannot read image 0.*refused"):
        PaliGemma2ImageConverter(6)(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="Cannot read image 0"):
        PaliGemma2ImageConverter(6, pipeline="colab")(str(tmp_path / "notes.txt"))
