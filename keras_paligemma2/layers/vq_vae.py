"""big_vision's VQ-VAE mask decoder: 16 `<seg>` codes to 64x64 mask logits."""

import functools

import keras
import numpy as np

from keras_paligemma2.utils.tensor_files import CheckpointError


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class MaskDecoder(keras.Model):
    """big_vision's VQ-VAE mask decoder: (B, 16) `<seg>` codes to (B, 64, 64) logits.

    Codebook lookup into a 4x4 grid -> 1x1 conv + ReLU -> 2 residual blocks
    (3x3, ReLU, 3x3, ReLU, 1x1, plus input) -> 4 transposed convs (4x4,
    stride 2, + ReLU; 128, 64, 32, 16 channels) -> 1x1 conv to one channel.

    Args:
        num_codes: int, codebook entries (default 128, one per `<segNNN>` token).
        code_dim: int, the width of each code (default 512).
        width: int, channels of the stem and residual blocks (default 128); the transposed
            convs have width, width / 2, width / 4 and width / 8.
        **kwargs: passed to `keras.Model` (name, dtype, ...).

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
        # Sub-layers take the model's dtype policy (Keras does not pass it down).
        conv = functools.partial(keras.layers.Conv2D, dtype=self.dtype_policy)
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
                filters=width // 2**i,
                kernel_size=4,
                strides=2,
                padding="same",
                name=f"up_{i}",
                dtype=self.dtype_policy,
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
        """Decodes segmentation codes into mask logits.

        Args:
            codes: int (B, 16) codebook indices in [0, num_codes), the `<segNNN>` numbers,
                row-major over the 4x4 grid.

        Returns:
            float (B, 64, 64) mask logits; the mask is `logits > 0`.
        """
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
        """Loads big_vision's `vae-oid.npz` (PyTorch layouts, big_vision's names).

        Args:
            path: str or path-like, the `.npz` file; sizes are read from its tensors.

        Returns:
            A `MaskDecoder` holding the checkpoint's weights.

        Raises:
            CheckpointError: the file is unreadable or lacks a tensor the decoder needs.
        """
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
