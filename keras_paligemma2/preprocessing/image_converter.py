"""`PaliGemma2ImageConverter`: any image in, the model's input out.

The default pipeline is big_vision's, the one every PaliGemma transfer
config evaluates with (`decode|resize(S)|value_range(-1, 1)`,
`big_vision/pp/ops_image.py` and `ops_general.py`), bit for bit:

- `decode`: `tf.io.decode_image(channels=3, expand_animations=False)`, so
  files are decoded by TensorFlow's own JPEG/PNG/GIF/BMP/WebP decoders
  (PIL's JPEG decoding differs by up to ~11 levels on most pixels), grey
  repeated to three channels, alpha dropped (not composited), 16-bit PNG
  brought to 8 bits as `value >> 8`;
- `resize`: `tf.image.resize(..., "bilinear", antialias=False)` squashes to
  S x S (no crop, no pad), then casts back to the input dtype after
  clipping: for uint8, the model sees truncated uint8 levels;
- `value_range(-1, 1)`: `-1 + (x / 255) * 2` in float32.

The other pipelines, each named after its reference:

- "big_vision_antialias": the same with `resize(S, antialias=True)`, as some
  big_vision configs write it.
- "colab": big_vision's fine-tuning colab (`finetune_paligemma.ipynb`,
  `preprocess_image`): files decoded by PIL, resized with antialias in
  float (no uint8 round trip), then `x / 127.5 - 1`.
- "keras_hub": keras-hub's `PaliGemmaImageConverter` defaults: files decoded
  by PIL, the largest centred square cropped, bilinear resize in float
  without antialias, then `x / 127.5 - 1`.

Arrays and PIL images skip decoding and go through the same steps. Dtypes:
uint8 as is; uint16 as `value >> 8` (what TensorFlow does to 16-bit PNGs);
other integer arrays when every value is in [0, 255]; floats in [0, 255]
stay floats through the resize, as big_vision's `resize` keeps its input
dtype. Booleans, integers or floats outside [0, 255], NaN, and float
images that look like [0, 1] are refused with a message saying what to do.
"""

import io
import os

import keras
import keras_hub
import numpy as np
import PIL.Image

from keras_paligemma2.utils.errors import InputError

PIPELINES = ("big_vision", "big_vision_antialias", "colab", "keras_hub")


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class PaliGemma2ImageConverter(keras_hub.layers.ImageConverter):
    """Decodes, resizes and rescales images for `PaliGemma2Backbone`.

    Accepts one image or a list/batch of them, each a file path, encoded
    file bytes, a PIL image, or an array (H, W), (H, W, 1), (H, W, 2),
    (H, W, 3) or (H, W, 4) (see the module docstring for dtypes). Images of
    different sizes may be mixed.

    Args:
        image_size: int, the model's square input side.
        pipeline: str, one of `PIPELINES`: "big_vision" (default, the code
            the weights were trained and evaluated with),
            "big_vision_antialias", "colab" or "keras_hub".
        antialias: bool; `True` is the older spelling of
            `pipeline="big_vision_antialias"` (it changes only "big_vision").
        **kwargs: passed to `keras_hub.layers.ImageConverter` (name, dtype, ...); its `scale`,
            `offset`, `crop_to_aspect_ratio` and `interpolation` are dropped (the pipeline
            sets them).

    Returns:
        float32 (B, image_size, image_size, 3) in [-1, 1], or
        (image_size, image_size, 3) for a single image.

    Example:
    ```python
    import numpy as np
    from keras_paligemma2 import PaliGemma2ImageConverter

    converter = PaliGemma2ImageConverter(image_size=224)
    batch = converter([np.zeros((480, 640, 3), "uint8"), "photo.jpg"])
    ```
    """

    def __init__(self, image_size, pipeline="big_vision", antialias=False, **kwargs):
        for keras_hub_argument in ("scale", "offset", "crop_to_aspect_ratio", "interpolation"):
            kwargs.pop(keras_hub_argument, None)
        if isinstance(image_size, (tuple, list)):
            if image_size[0] != image_size[1]:
                raise InputError(f"PaliGemma images are square; got image_size {image_size}.")
            image_size = image_size[0]
        if antialias and pipeline == "big_vision":
            pipeline = "big_vision_antialias"
        if pipeline not in PIPELINES:
            raise InputError(f"Unknown image pipeline {pipeline!r}; choose one of {PIPELINES}.")
        super().__init__(
            image_size=(image_size, image_size),
            scale=1 / 127.5,
            offset=-1.0,
            crop_to_aspect_ratio=pipeline == "keras_hub",
            interpolation="bilinear",
            antialias=pipeline in ("big_vision_antialias", "colab"),
            **kwargs,
        )
        self.side = int(image_size)
        self.pipeline = pipeline

    def call(self, inputs):
        """Converts images; see `convert`.

        Args:
            inputs: one image or a list/batch of them (see the class docstring).

        Returns:
            float32 (B, image_size, image_size, 3) in [-1, 1], or (image_size, image_size, 3)
            for a single image.
        """
        return self.convert(inputs)

    def convert(self, inputs):
        """`call` without Keras' layer wrapper, whose error messages repeat
        every argument (whole pixel arrays) around ours.

        Args:
            inputs: one image (a path, bytes, a PIL image or an array (H, W[, C])) or a
                non-empty list/batch of them; a 4-D array is a batch.

        Returns:
            float32 NumPy (B, image_size, image_size, 3) in [-1, 1], or
            (image_size, image_size, 3) for a single image.
        """
        single = _is_single_image(inputs)
        images = [inputs] if single else list(inputs)
        if not images:
            raise InputError("No images given: pass an image or a non-empty list of images.")
        batch = np.stack([self._convert_one(image, i) for i, image in enumerate(images)])
        return batch[0] if single else batch

    def _convert_one(self, image, index):
        decoder = "tensorflow" if self.pipeline.startswith("big_vision") else "pil"
        pixels = to_rgb_array(image, index, decoder=decoder)
        if self.pipeline.startswith("big_vision"):
            return value_range(big_vision_resize(pixels, self.side, self.antialias))
        if self.pipeline == "keras_hub":
            # keras-hub's own computation: this class is configured as its
            # converter (centre crop, bilinear, x * scale + offset).
            batch = pixels[None].astype(np.float32)
            return np.asarray(keras_hub.layers.ImageConverter.call(self, batch), np.float32)[0]
        # The colab: `tf.image.resize(..., antialias=True).numpy() / 127.5 - 1.0`.
        resized = big_vision_resize(pixels.astype(np.float32), self.side, antialias=True)
        return resized / np.float32(127.5) - np.float32(1.0)

    def get_config(self):
        config = super().get_config()
        config.pop("antialias", None)
        config.update(image_size=self.side, pipeline=self.pipeline)
        return config


def big_vision_resize(pixels, size, antialias=False):
    """big_vision's `resize(size)`: `tf.image.resize` (bilinear) to a
    square, then back to the input dtype after clipping (uint8: truncated).

    Args:
        pixels: NumPy (H, W, 3) (or a batch (B, H, W, 3)), uint8 or float in [0, 255].
        size: int, the output side.
        antialias: bool, `tf.image.resize`'s antialias (default False, as big_vision).

    Returns:
        NumPy (size, size, 3) (or (B, size, size, 3)) in the dtype of `pixels`.
    """
    # Imported here: only images need TensorFlow, so the model itself
    # (token-id generation, training) runs where TensorFlow is absent.
    import tensorflow as tf

    resized = tf.image.resize(pixels, (size, size), method="bilinear", antialias=antialias)
    if pixels.dtype == np.uint8:
        return tf.cast(tf.clip_by_value(resized, 0, 255), tf.uint8).numpy()
    return resized.numpy().astype(pixels.dtype)


def value_range(pixels):
    """big_vision's `value_range(-1, 1)`: [0, 255] to [-1, 1] in float32,
    in its order of operations (`vmin + x / 255 * (vmax - vmin)`).

    Args:
        pixels: NumPy array of levels in [0, 255], any shape (uint8 or float).

    Returns:
        float32 NumPy array of the same shape, in [-1, 1].
    """
    x = pixels.astype(np.float32) / np.float32(255.0)
    return np.float32(-1.0) + x * np.float32(2.0)


def _is_single_image(inputs):
    if isinstance(inputs, (str, bytes, os.PathLike, PIL.Image.Image)):
        return True
    if isinstance(inputs, np.ndarray) or hasattr(inputs, "shape"):
        return len(inputs.shape) in (2, 3)
    return False


def to_rgb_array(image, index=0, decoder="tensorflow"):
    """One image as (H, W, 3) uint8 (float32 for float input), or a clear
    ValueError.

    Args:
        image: a file path, encoded file bytes, a PIL image or an array.
        index: int, the image's place in its batch, for error messages.
        decoder: "tensorflow" (big_vision's `decode`) or "pil", for files.
    """
    where = f"image {index}"
    if isinstance(image, (str, os.PathLike)):
        where = f"image {index} ({os.fspath(image)!r})"
        try:
            with open(image, "rb") as f:
                image = f.read()
        except OSError as error:
            raise InputError(f"Cannot read {where} as an image: {error}") from error
    if isinstance(image, bytes):
        image = _decode(image, where, decoder)
    if isinstance(image, PIL.Image.Image):
        image = _pil_pixels(image)
    try:
        pixels = np.asarray(image)
    except Exception as error:
        raise InputError(f"{where} is a {type(image).__name__}, not an image.") from error
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4):
        raise InputError(
            f"{where} has shape {pixels.shape}; expected (height, width) or "
            "(height, width, channels) with 1, 3 or 4 channels (2 or 4 with alpha)."
        )
    if min(pixels.shape[:2]) < 1:
        raise InputError(f"{where} is empty (shape {pixels.shape}).")
    pixels = _to_levels(pixels, where)
    # As `decode(channels=3)`: alpha dropped, grey repeated.
    if pixels.shape[-1] in (2, 4):
        pixels = pixels[..., :-1]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels)


def _decode(data, where, decoder):
    if decoder == "pil":
        try:
            with PIL.Image.open(io.BytesIO(data)) as opened:
                opened.load()
                return _pil_pixels(opened)
        except (OSError, ValueError) as error:
            raise InputError(f"Cannot read {where} as an image: {error}") from error
    import tensorflow as tf

    try:
        decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        message = getattr(error, "message", str(error)).strip().splitlines()[0]
        raise InputError(
            f"Cannot read {where} as an image: TensorFlow's decoder (big_vision's "
            f"`decode`) refused it: {message}"
        ) from error
    return decoded.numpy()


def _pil_pixels(image):
    """A PIL image's pixels in a layout `to_rgb_array` takes."""
    if image.mode in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I;16L"):
        pixels = np.asarray(image)
        return pixels.astype(np.uint16) if image.mode.startswith("I;16") else pixels
    if image.mode == "I":  # 32-bit integers; PIL's mode for some 16-bit PNGs.
        return np.asarray(image)
    return np.asarray(image.convert("RGBA" if "transparency" in image.info else "RGB"))


def _to_levels(pixels, where):
    """uint8 levels, or float32 in [0, 255]; anything else is an error."""
    dtype = pixels.dtype
    if dtype == np.uint8:
        return pixels
    if dtype == np.uint16:
        return (pixels >> 8).astype(np.uint8)  # TensorFlow's 16-bit PNG decode.
    if dtype == np.bool_:
        raise InputError(
            f"{where} is a boolean array: as a mask it has no colours. Pass uint8 "
            "levels (e.g. `mask.astype(np.uint8) * 255`)."
        )
    if np.issubdtype(dtype, np.integer):
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise InputError(
                f"{where} is {dtype} with values in [{low}, {high}]; images are taken "
                "as levels in [0, 255] (uint8), or uint16 (brought to 8 bits as "
                "value >> 8). Convert it to one of those."
            )
        return pixels.astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        pixels = pixels.astype(np.float32)
        if not np.isfinite(pixels).all():
            raise InputError(f"{where} has NaN or infinite values.")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0 or high > 255:
            raise InputError(
                f"{where} has values in [{low:.3g}, {high:.3g}]; float images must be in [0, 255]."
            )
        if 0 < high <= 1.0:
            raise InputError(
                f"{where} looks like a float image in [0, 1]; images are taken "
                "in [0, 255] (as uint8): multiply it by 255."
            )
        return pixels
    raise InputError(
        f"{where} is an array of {dtype}: pass a file path, a PIL image or a "
        "numeric array (H, W, 3)."
    )
