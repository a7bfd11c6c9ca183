"""SigLIP image encoder (big_vision `models/vit.py` with `pool_type="none"`).

Patch convolution (with bias) -> learned position embedding (no class token)
-> pre-LayerNorm transformer blocks (attention with biases, GELU-tanh MLP)
-> final `encoder_norm`. Output: one token per patch, (B, P, W) with P the
number of patches and W the ViT width. Kernel layouts equal big_vision's
flax parameters: q/k/v (W,N,H) with bias (N,H), out (N,H,W).
"""

import keras
from keras import ops

from keras_paligemma2.layers import projections
from keras_paligemma2.layers.attention import dot_product_attention
from keras_paligemma2.layers.remat import rematerialised
from keras_paligemma2.utils.errors import InputError


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class VisionAttention(keras.layers.Layer):
    """Bidirectional multi-head self-attention with biases, scale 1/sqrt(H).

    Args:
        num_heads: int N; the input width W must be a multiple of it (H = W / N).
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(self, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads

    def build(self, input_shape):
        width = input_shape[-1]
        if width % self.num_heads:
            raise InputError(f"ViT width {width} is not divisible by {self.num_heads} heads.")
        n, h = self.num_heads, width // self.num_heads
        self.head_dim = h
        common = dict(bias_axes="nh", dtype=self.dtype_policy)
        self.query = projections.EinsumDense("btw,wnh->btnh", (None, n, h), name="query", **common)
        self.key = projections.EinsumDense("btw,wnh->btnh", (None, n, h), name="key", **common)
        self.value = projections.EinsumDense("btw,wnh->btnh", (None, n, h), name="value", **common)
        self.output_projection = projections.EinsumDense(
            "btnh,nhw->btw",
            (None, width),
            bias_axes="w",
            name="output",
            dtype=self.dtype_policy,
        )
        for layer in (self.query, self.key, self.value):
            layer.build(input_shape)
        self.output_projection.build((None, None, n, h))
        self.built = True

    def call(self, x):
        """Self-attention over all patches, no mask.

        Args:
            x: (B, P, W) normalized patch tokens.

        Returns:
            (B, P, W).
        """
        query = self.query(x)
        query = query * ops.cast(self.head_dim**-0.5, query.dtype)
        encoded = dot_product_attention(query, self.key(x), self.value(x))
        return self.output_projection(encoded)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads)
        return config


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class VisionBlock(keras.layers.Layer):
    """`x += attention(norm(x))`, then `x += mlp(norm(x))`.

    Args:
        num_heads: int N, attention heads; W must be a multiple of it.
        intermediate_dim: int F, the MLP's hidden width (GELU-tanh).
        layer_norm_epsilon: float, the two LayerNorms' epsilon (default 1e-6).
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(self, num_heads, intermediate_dim, layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        # Set by `PaliGemma2Backbone.set_remat` (None, "block" or "matmuls");
        # a training choice, not config.
        self.remat = None

    def build(self, input_shape):
        width = input_shape[-1]
        common = dict(dtype=self.dtype_policy)
        norm = dict(epsilon=self.layer_norm_epsilon, **common)
        self.attention_norm = keras.layers.LayerNormalization(name="attention_norm", **norm)
        self.attention = VisionAttention(num_heads=self.num_heads, name="attention", **common)
        self.mlp_norm = keras.layers.LayerNormalization(name="mlp_norm", **norm)
        self.mlp_in = projections.Dense(self.intermediate_dim, name="mlp_in", **common)
        self.mlp_out = projections.Dense(width, name="mlp_out", **common)
        for layer in (self.attention_norm, self.attention, self.mlp_norm, self.mlp_in):
            layer.build(input_shape)
        self.mlp_out.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, x):
        """Applies the block (recomputing it in the backward pass when `remat` is set).

        Args:
            x: (B, P, W) patch tokens.

        Returns:
            (B, P, W).
        """
        if self.remat:
            return rematerialised(self._forward, self.remat)(x)
        return self._forward(x)

    def _forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        hidden = keras.activations.gelu(self.mlp_in(self.mlp_norm(x)), approximate=True)
        return x + self.mlp_out(hidden)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class VisionEncoder(keras.layers.Layer):
    """SigLIP ViT: images (B, S, S, 3) in [-1, 1] -> patch tokens (B, P, W).

    Args:
        image_size: int S, the square input side in pixels; a multiple of `patch_size`.
        patch_size: int, the patch side (14); P = (S / patch_size) ** 2.
        hidden_dim: int W, the ViT width (1152 for SigLIP So400m).
        num_layers: int, the number of `VisionBlock`s (27).
        num_heads: int N, attention heads per block (16); W must be a multiple of it.
        intermediate_dim: int F, the MLP's hidden width (4304).
        layer_norm_epsilon: float, every LayerNorm's epsilon (default 1e-6).
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(
        self,
        image_size,
        patch_size,
        hidden_dim,
        num_layers,
        num_heads,
        intermediate_dim,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if image_size % patch_size:
            raise InputError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.num_patches = (image_size // patch_size) ** 2

    def build(self, input_shape=None):
        common = dict(dtype=self.dtype_policy)
        self.patch_embedding = keras.layers.Conv2D(
            self.hidden_dim,
            self.patch_size,
            strides=self.patch_size,
            padding="valid",
            name="patch_embedding",
            **common,
        )
        self.patch_embedding.build((None, self.image_size, self.image_size, 3))
        self.position_embedding = self.add_weight(
            shape=(self.num_patches, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=self.hidden_dim**-0.5),
            name="position_embedding",
        )
        token_shape = (None, self.num_patches, self.hidden_dim)
        self.blocks = []
        for i in range(self.num_layers):
            block = VisionBlock(
                num_heads=self.num_heads,
                intermediate_dim=self.intermediate_dim,
                layer_norm_epsilon=self.layer_norm_epsilon,
                name=f"block_{i}",
                **common,
            )
            block.build(token_shape)
            self.blocks.append(block)
        self.encoder_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="encoder_norm", **common
        )
        self.encoder_norm.build(token_shape)
        self.built = True

    def call(self, images):
        """Encodes images into patch tokens.

        Args:
            images: float (B, S, S, 3) in [-1, 1], S = `image_size`.

        Returns:
            (B, P, W) after the final `encoder_norm`.
        """
        x = self.embed_patches(images)
        for block in self.blocks:
            x = block(x)
        return self.encoder_norm(x)

    def embed_patches(self, images):
        """What the first block takes: patch embeddings plus positions.

        Args:
            images: float (B, S, S, 3) in [-1, 1].

        Returns:
            (B, P, W).
        """
        patches = self.patch_embedding(images)
        x = ops.reshape(patches, (-1, self.num_patches, self.hidden_dim))
        return x + ops.cast(self.position_embedding, x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_patches, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config
