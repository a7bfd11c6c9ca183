"""Boxes, labels and masks drawn onto a picture."""

import numpy as np
import PIL.ImageDraw

from keras_paligemma2.preprocessing.image_converter import to_rgb_array
from keras_paligemma2.utils.files import atomic_file

_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
)


def draw(image, objects, path=None):
    """Draws boxes, labels and masks onto a copy of `image`; optionally saves a PNG.

    Args:
        image: anything `PaliGemma2ImageConverter` accepts.
        objects: from `detect` or `segment` (pixel boxes, optional masks).
        path: where to write the PNG (written to a temporary name, then
            renamed); None only returns the picture.

    Returns:
        The annotated `PIL.Image.Image`.
    """

    pixels = to_rgb_array(image).astype(np.float32)
    for i, obj in enumerate(objects):
        if "mask" in obj:
            colour = np.array(_COLOURS[i % len(_COLOURS)], np.float32)
            mask = obj["mask"][..., None]
            pixels = np.where(mask, 0.5 * pixels + 0.5 * colour, pixels)
    picture = PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    pen = PIL.ImageDraw.Draw(picture)
    for i, obj in enumerate(objects):
        colour = _COLOURS[i % len(_COLOURS)]
        y_min, x_min, y_max, x_max = obj["box"]
        pen.rectangle((x_min, y_min, x_max, y_max), outline=colour, width=3)
        if obj.get("label"):
            pen.text((x_min + 4, max(y_min - 12, 0)), obj["label"], fill=colour)
    if path is not None:
        with atomic_file(path) as f:
            picture.save(f, format="PNG")
    return picture
