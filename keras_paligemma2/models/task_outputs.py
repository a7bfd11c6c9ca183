"""Detection and segmentation outputs: text to boxes, `<seg>` codes to masks.

Detection (big_vision's `detect` task): per object four location tokens
`<locYMIN><locXMIN><locYMAX><locXMAX>`, each round(coordinate * 1023) of the
image height or width, then the label; objects separated by " ; ".
Segmentation adds 16 `<segNNN>` codes after the box, decoded by big_vision's
VQ-VAE decoder (`evaluators/proj/paligemma/transfers/segmentation.py`) into
64x64 mask logits, resized into the box (bilinear) and thresholded at 0.

Parsers never raise on model output: they return the objects that are well
formed and skip the rest.
"""

import re

import numpy as np
import PIL.Image

_OBJECT = re.compile(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>){16})?\s*([^<;]*?)\s*(?=;|<loc|$)")


def parse_detections(text, image_size=None):
    """Objects in detection or segmentation output.

    Args:
        text: the generated text.
        image_size: (height, width) for pixel boxes; None keeps [0, 1] units.

    Returns:
        A list of dicts: `box` (y_min, x_min, y_max, x_max) floats, `label`
        str, and `codes` (16 ints) when segmentation codes follow the box.
        Boxes with y_max <= y_min or x_max <= x_min are skipped.
    """
    if not isinstance(text, str):
        return []
    objects = []
    for match in _OBJECT.finditer(text):
        bins = [int(b) for b in re.findall(r"<loc(\d{4})>", match.group(1))]
        if any(b > 1023 for b in bins):
            continue
        y_min, x_min, y_max, x_max = (b / 1023 for b in bins)
        if y_max <= y_min or x_max <= x_min:
            continue
        if image_size is not None:
            height, width = image_size
            y_min, y_max = y_min * height, y_max * height
            x_min, x_max = x_min * width, x_max * width
        found = {"box": (y_min, x_min, y_max, x_max), "label": match.group(3).strip()}
        if match.group(2):
            codes = [int(c) for c in re.findall(r"<seg(\d{3})>", match.group(2))]
            if all(c < 128 for c in codes):
                found["codes"] = codes
        objects.append(found)
    return objects


def format_detections(objects, image_size=None):
    """The inverse of `parse_detections`: boxes (and codes) to target text.

    Args:
        objects: iterable of dicts with `box` (y_min, x_min, y_max, x_max), `label` str and
            optional `codes` (16 ints in 0..127).
        image_size: (height, width) when boxes are in pixels; None (default): [0, 1] units.
            Coordinates are clipped to [0, 1] before binning.

    Returns:
        str, the objects joined by " ; ".
    """
    parts = []
    for obj in objects:
        y_min, x_min, y_max, x_max = obj["box"]
        if image_size is not None:
            height, width = image_size
            y_min, y_max, x_min, x_max = (
                y_min / height,
                y_max / height,
                x_min / width,
                x_max / width,
            )
        bins = [int(round(min(max(v, 0.0), 1.0) * 1023)) for v in (y_min, x_min, y_max, x_max)]
        tokens = "".join(f"<loc{b:04d}>" for b in bins)
        tokens += "".join(f"<seg{c:03d}>" for c in obj.get("codes", ()))
        parts.append(f"{tokens} {obj['label']}".rstrip())
    return " ; ".join(parts)


def paste_mask(mask_logits, box, image_size):
    """A 64x64 logit map resized into `box` (pixels) of a boolean image mask.

    As big_vision's evaluator: the box is cut to whole pixels, the logits
    resized bilinearly (PIL) to the box and thresholded at 0.

    Args:
        mask_logits: float array (64, 64), a `MaskDecoder` output row.
        box: (y_min, x_min, y_max, x_max) in pixels; truncated to ints and clipped to the image.
        image_size: (height, width) of the image in pixels.

    Returns:
        bool NumPy (height, width), all False when the clipped box is empty.
    """
    height, width = image_size
    mask = np.zeros((height, width), bool)
    y_min, x_min, y_max, x_max = (int(v) for v in box)
    y_min, x_min = max(y_min, 0), max(x_min, 0)
    y_max, x_max = min(y_max, height), min(x_max, width)
    if y_max <= y_min or x_max <= x_min:
        return mask
    resized = PIL.Image.fromarray(np.asarray(mask_logits, np.float32)).resize(
        (x_max - x_min, y_max - y_min), resample=PIL.Image.BILINEAR
    )
    mask[y_min:y_max, x_min:x_max] = np.asarray(resized) > 0
    return mask
