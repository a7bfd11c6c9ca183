"""`PaliGemma2ImageConverter`: any image in, big_vision's model input out.

big_vision (`pp` ops `decode`, `resize`, `value_range(-1, 1)`) squashes the
image to a square with `tf.image.resize(..., "bilinear", antialias=False)`,
no aspect-preserving crop or pad, then maps [0, 255] to [-1, 1]. This class
runs that same TensorFlow op. keras-hub's converter centre-crops to the
aspect ratio by default; presets converted from keras-hub get this
behaviour instead.
"""

import os

import keras
import keras_hub
import numpy as np
import PIL.Image


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class PaliGemma2ImageConverter(keras_hub.layers.ImageConverter):
    """Resizes and rescales images for `PaliGemma2Backbone`.

    Accepts one image or a list/batch of them, each a file path, a PIL image,
    or an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8 (0..255)
    or float (0..255) values; greyscale is repeated to RGB, alpha is dropped
    (composited on white). Images of different sizes may be mixed.

    Args:
        image_size: int, the model's square input side.
        antialias: bool; big_vision's default is False, some of its configs
            and the fine-tuning colab use True.

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

    def __init__(self, image_size, antialias=False, **kwargs):
        kwargs.pop("scale", None)
        kwargs.pop("offset", None)
        kwargs.pop("crop_to_aspect_ratio", None)
        kwargs.pop("interpolation", None)
        if isinstance(image_size, (tuple, list)):
            if image_size[0] != image_size[1]:
                raise ValueError(f"PaliGemma images are square; got image_size {image_size}.")
            image_size = image_size[0]
        super().__init__(
            image_size=(image_size, image_size),
            scale=1 / 127.5,
            offset=-1.0,
            crop_to_aspect_ratio=False,
            interpolation="bilinear",
            antialias=antialias,
            **kwargs,
        )
        self.side = int(image_size)

    def call(self, inputs):
        return self.convert(inputs)

    def convert(self, inputs):
        """`call` without Keras' layer wrapper, whose error messages repeat
        every argument (whole pixel arrays) around ours."""
        single = _is_single_image(inputs)
        images = [inputs] if single else list(inputs)
        if not images:
            raise ValueError("No images given: pass an image or a non-empty list of images.")
        batch = np.stack([self._convert_one(image, i) for i, image in enumerate(images)])
        return batch[0] if single else batch

    def _convert_one(self, image, index):
        # Imported here: only resizing needs TensorFlow, so the model itself
        # (token-id generation, training) runs where TensorFlow is absent.
        import tensorflow as tf

        pixels = to_rgb_array(image, index)
        resized = tf.image.resize(
            pixels, (self.side, self.side), method="bilinear", antialias=self.antialias
        )
        return resized.numpy() / 127.5 - 1.0

    def get_config(self):
        config = super().get_config()
        config.update(image_size=self.side)
        return config


def _is_single_image(inputs):
    if isinstance(inputs, (str, os.PathLike, PIL.Image.Image)):
        return True
    if isinstance(inputs, np.ndarray) or hasattr(inputs, "shape"):
        return len(inputs.shape) in (2, 3)
    return False


def to_rgb_array(image, index=0):
    """One image as float32 (H, W, 3) in [0, 255], or a clear ValueError."""
    where = f"image {index}"
    if isinstance(image, (str, os.PathLike)):
        where = f"image {index} ({os.fspath(image)!r})"
        try:
            with PIL.Image.open(image) as opened:
                image = opened.convert("RGBA" if "A" in opened.getbands() else "RGB")
                image.load()
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read {where} as an image: {error}") from error
    if isinstance(image, PIL.Image.Image):
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGB")
        image = np.asarray(image)
    try:
        pixels = np.asarray(image)
    except Exception as error:
        raise ValueError(f"{where} is a {type(image).__name__}, not an image.") from error
    if pixels.dtype == object or not (
        np.issubdtype(pixels.dtype, np.number) or pixels.dtype == bool
    ):
        raise ValueError(
            f"{where} is a {type(image).__name__} of {pixels.dtype}: pass a file "
            "path, a PIL image or a numeric array (H, W, 3)."
        )
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"{where} has shape {pixels.shape}; expected (height, width) or "
            "(height, width, channels) with 1, 3 or 4 channels."
        )
    if min(pixels.shape[:2]) < 1:
        raise ValueError(f"{where} is empty (shape {pixels.shape}).")
    pixels = pixels.astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating):
        if not np.isfinite(pixels).all():
            raise ValueError(f"{where} has NaN or infinite values.")
        if pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(
                f"{where} has values in [{pixels.min():.3g}, {pixels.max():.3g}]; "
                "float images must be in [0, 255]."
            )
        if pixels.max() <= 1.0 and pixels.max() > 0:
            raise ValueError(
                f"{where} looks like a float image in [0, 1]; images are taken "
                "in [0, 255] (as uint8): multiply it by 255."
            )
    channels = pixels.shape[-1]
    if channels in (2, 4):  # Alpha: composite on white, as viewers show it.
        alpha = pixels[..., -1:] / 255.0
        pixels = pixels[..., :-1] * alpha + 255.0 * (1 - alpha)
        channels -= 1
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels
