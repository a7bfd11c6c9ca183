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

import keras
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
    """The inverse of `parse_detections`: boxes (and codes) to target text."""
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


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class MaskDecoder(keras.Model):
    """big_vision's VQ-VAE mask decoder: (B, 16) `<seg>` codes to (B, 64, 64) logits.

    Codebook lookup into a 4x4 grid -> 1x1 conv + ReLU -> 2 residual blocks
    (3x3, ReLU, 3x3, ReLU, 1x1, plus input) -> 4 transposed convs (4x4,
    stride 2, + ReLU; 128, 64, 32, 16 channels) -> 1x1 conv to one channel.

    Example:
    ```python
    from keras_paligemma2 import MaskDecoder

    decoder = MaskDecoder.from_checkpoint("vae-oid.npz")
    logits = decoder(codes)  # (B, 64, 64); the mask is logits > 0.
    ```
    """

    def __init__(self, num_codes=128, code_dim=512, width=128, **kwargs):
        super().__init__(**kwargs)
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.width = width
        self.codebook = self.add_weight(
            shape=(num_codes, code_dim), initializer="zeros", name="codebook", trainable=False
        )
        conv = keras.layers.Conv2D
        self.stem = conv(width, 1, name="stem")
        self.residual = [
            [
                conv(width, 3, padding="same", name=f"res_{i}_0"),
                conv(width, 3, padding="same", name=f"res_{i}_1"),
                conv(width, 1, name=f"res_{i}_2"),
            ]
            for i in range(2)
        ]
        self.upsample = [
            keras.layers.Conv2DTranspose(
                width // 2**i, 4, strides=2, padding="same", name=f"up_{i}"
            )
            for i in range(4)
        ]
        self.head = conv(1, 1, name="head")
        self.build((None, 16))

    def build(self, input_shape):
        shape = (None, 4, 4, self.code_dim)
        self.stem.build(shape)
        shape = (None, 4, 4, self.width)
        for block in self.residual:
            for layer in block:
                layer.build(shape)
        side, channels = 4, self.width
        for i, layer in enumerate(self.upsample):
            layer.build((None, side, side, channels))
            side, channels = side * 2, self.width // 2**i
        self.head.build((None, side, side, channels))
        self.built = True

    def call(self, codes):
        codes = keras.ops.cast(codes, "int32")
        x = keras.ops.take(self.codebook, codes, axis=0)
        x = keras.ops.reshape(x, (-1, 4, 4, self.code_dim))
        x = keras.activations.relu(self.stem(x))
        for first, second, third in self.residual:
            y = keras.activations.relu(first(x))
            y = keras.activations.relu(second(y))
            x = x + third(y)
        for layer in self.upsample:
            x = keras.activations.relu(layer(x))
        return self.head(x)[..., 0]

    def get_config(self):
        config = super().get_config()
        config.update(num_codes=self.num_codes, code_dim=self.code_dim, width=self.width)
        return config

    @classmethod
    def from_checkpoint(cls, path):
        """Loads big_vision's `vae-oid.npz` (PyTorch layouts, big_vision's names)."""
        from keras_paligemma2.checkpoints.common import CheckpointError

        try:
            with np.load(path, allow_pickle=False) as data:
                weights = {k: data[k] for k in data.files}
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"Cannot read {path!r} as a mask decoder .npz ({error})."
            ) from error
        needed = ["_vq_vae._embedding"] + [
            f"{name}.{part}"
            for name in ["decoder.0", "decoder.12"]
            + [f"decoder.{b}.net.{c}" for b in (2, 3) for c in (0, 2, 4)]
            + [f"decoder.{u}" for u in (4, 6, 8, 10)]
            for part in ("weight", "bias")
        ]
        missing = [k for k in needed if k not in weights]
        if missing:
            raise CheckpointError(
                f"{path!r} is not big_vision's mask decoder (vae-oid.npz): missing {missing}."
            )
        num_codes, code_dim = weights["_vq_vae._embedding"].shape
        decoder = cls(
            num_codes=num_codes, code_dim=code_dim, width=weights["decoder.0.bias"].shape[0]
        )

        def conv(layer, name):  # PyTorch (out, in, kh, kw) or (in, out, kh, kw) for transposed.
            layer.kernel.assign(np.transpose(weights[name + ".weight"], (2, 3, 1, 0)))
            layer.bias.assign(weights[name + ".bias"])

        decoder.codebook.assign(weights["_vq_vae._embedding"])
        conv(decoder.stem, "decoder.0")
        for b, block in zip((2, 3), decoder.residual):
            for c, layer in zip((0, 2, 4), block):
                conv(layer, f"decoder.{b}.net.{c}")
        for u, layer in zip((4, 6, 8, 10), decoder.upsample):
            conv(layer, f"decoder.{u}")
        conv(decoder.head, "decoder.12")
        return decoder


def paste_mask(mask_logits, box, image_size):
    """A 64x64 logit map resized into `box` (pixels) of a boolean image mask.

    As big_vision's evaluator: the box is cut to whole pixels, the logits
    resized bilinearly (PIL) to the box and thresholded at 0.
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
    import PIL.ImageDraw

    from keras_paligemma2.image_converter import to_rgb_array

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
        from keras_paligemma2.saving import atomic_file

        with atomic_file(path) as f:
            picture.save(f, format="PNG")
    return picture
