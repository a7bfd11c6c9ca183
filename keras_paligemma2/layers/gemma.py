"""Gemma 2 decoder pieces: token embedding, RMSNorm, attention, MLP and block.

Axis letters as in `attention.py`. Kernel layouts equal big_vision's
`models/ppp/gemma.py` parameters (q (N,D,H), k/v (K,D,H), out (N,H,D),
gate/up (D,F), down (F,D)), so checkpoints map onto them without reshapes.
Projections are Keras `EinsumDense`/`Dense` layers, so Keras' `enable_lora`
and `quantize("int8")` apply to them as they are.
"""

import functools
import math

import keras
from keras import ops

from keras_paligemma2.layers import projections
from keras_paligemma2.layers.attention import apply_rope
from keras_paligemma2.layers.attention import dot_product_attention
from keras_paligemma2.layers.remat import rematerialised


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class TokenEmbedding(keras.layers.Layer):
    """Token embedding table, tied with the output projection.

    `call(token_ids)` returns `E[token_ids] * sqrt(D)`, the factor rounded to
    the compute dtype as big_vision does; `call(x, reverse=True)` returns the
    logits `x @ E^T` in float32.

    Args:
        vocabulary_size: int V, rows of the table (257,152 for the released vocabulary).
        hidden_dim: int D, the decoder width.
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(self, vocabulary_size, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            shape=(self.vocabulary_size, self.hidden_dim),
            initializer=keras.initializers.VarianceScaling(1.0, "fan_in", "normal"),
            name="embeddings",
        )
        self.built = True

    def call(self, inputs, reverse=False):
        """Embeds token ids, or (`reverse=True`) projects hidden states to logits.

        Args:
            inputs: int (B, T) token ids; with `reverse=True`, hidden states (..., D).
            reverse: bool; False (default) embeds, True computes the tied output projection.

        Returns:
            (B, T, D) embeddings in the compute dtype, or float32 (B, T, V) logits.
        """
        if reverse:
            table = ops.cast(self.embeddings, inputs.dtype)
            if len(inputs.shape) == 3 and inputs.shape[1] == 1:
                # A decode step: XLA:CPU runs this matvec with the transposed
                # table ~30% faster than the einsum below (measured).
                return ops.cast(ops.matmul(inputs, ops.transpose(table)), "float32")
            # Several positions (prefill, training): contracting the table as
            # stored, so the backward pass keeps no transposed copy of it
            # (V x D: 1.2 GB in bfloat16 for PaliGemma 2).
            return ops.cast(ops.einsum("...d,vd->...v", inputs, table), "float32")
        embedded = ops.take(self.embeddings, inputs, axis=0)
        return embedded * ops.cast(math.sqrt(self.hidden_dim), embedded.dtype)

    def compute_output_spec(self, inputs, reverse=False):
        if reverse:
            shape = tuple(inputs.shape[:-1]) + (self.vocabulary_size,)
            return keras.KerasTensor(shape, "float32")
        shape = tuple(inputs.shape) + (self.hidden_dim,)
        return keras.KerasTensor(shape, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(vocabulary_size=self.vocabulary_size, hidden_dim=self.hidden_dim)
        return config


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class RMSNorm(keras.layers.Layer):
    """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`, computed in float32.

    Args:
        epsilon: float, added to the mean square (default 1e-6).
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="scale")
        self.built = True

    def call(self, x):
        """Normalizes over the last axis.

        Args:
            x: (..., D), e.g. (B, T, D) hidden states.

        Returns:
            The normalized `x`, same shape and dtype.
        """
        x32 = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(variance + self.epsilon)
        normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return ops.cast(normed, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class DecoderAttention(keras.layers.Layer):
    """Gemma 2 grouped-query self-attention with RoPE and soft-capped logits.

    The query is scaled by `query_pre_attn_scalar ** -0.5` after RoPE
    (big_vision: `rsqrt_head_dim` for 3B/10B, `rsqrt_emb_per_head`, i.e.
    D/N = 144, for 28B).

    `call(x, positions, attention_mask, kv_cache=None, cache_index=None,
    last_only=False)`: without a cache, keys/values come from `x` and the
    output is returned; `last_only` keeps keys/values of every position but
    queries from the last one only (output (B, 1, D)).
    With `kv_cache` (B, 2, S, K, H), the new keys/values are written at
    `cache_index` and the updated cache is returned as the second output;
    attention runs over the whole cache when the mask has S key columns, or
    over the new keys only when it has as many as `x` has positions (a
    prefill, where the rest of the cache is still empty).

    Args:
        num_query_heads: int N.
        num_key_value_heads: int K; N must be a multiple of K (grouped-query attention).
        head_dim: int H.
        query_pre_attn_scalar: float; queries are multiplied by its inverse square root.
        attention_logit_soft_cap: float or None (default); logits become
            `cap * tanh(logits / cap)` (50 in Gemma 2).
        rope_max_wavelength: int/float, the RoPE base (default 10,000).
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_logit_soft_cap=None,
        rope_max_wavelength=10_000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.rope_max_wavelength = rope_max_wavelength

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        n, k, h = self.num_query_heads, self.num_key_value_heads, self.head_dim
        common = dict(dtype=self.dtype_policy)
        self.query = projections.EinsumDense("btd,ndh->btnh", (None, n, h), name="query", **common)
        self.key = projections.EinsumDense("bsd,kdh->bskh", (None, k, h), name="key", **common)
        self.value = projections.EinsumDense("bsd,kdh->bskh", (None, k, h), name="value", **common)
        self.output_projection = projections.EinsumDense(
            "btnh,nhd->btd", (None, hidden_dim), name="output", **common
        )
        self.query.build(input_shape)
        self.key.build(input_shape)
        self.value.build(input_shape)
        self.output_projection.build((None, None, n, h))
        self.built = True

    def call(self, x, positions, attention_mask, kv_cache=None, cache_index=None, last_only=False):
        """Self-attention of `x`, through the cache when given one (see the class docstring).

        Args:
            x: (B, T, D) normalized hidden states.
            positions: int (B, T), each token's RoPE position.
            attention_mask: bool (B, T, S) (S = T without a cache; with one, S the cache
                length, or T for a prefill); True where query t may attend key s.
            kv_cache: None (default), or (B, 2, S, K, H) keys [:, 0] and values [:, 1].
            cache_index: int (or scalar int array), the cache slot of `x`'s first position;
                used only with `kv_cache`.
            last_only: bool; True attends from the last position only (mask rows sliced to
                match), still computing keys/values of every position.

        Returns:
            (B, T, D), or (B, 1, D) with `last_only`; with `kv_cache`, the tuple
            (output, updated cache (B, 2, S, K, H)).
        """
        key = apply_rope(self.key(x), positions, self.rope_max_wavelength)
        value = self.value(x)
        if last_only:
            x, positions = x[:, -1:], positions[:, -1:]
            attention_mask = attention_mask[:, -1:]
        query = apply_rope(self.query(x), positions, self.rope_max_wavelength)
        query = query * ops.cast(self.query_pre_attn_scalar**-0.5, query.dtype)
        if kv_cache is not None:
            new_kv = ops.cast(ops.stack([key, value], axis=1), kv_cache.dtype)
            kv_cache = ops.slice_update(kv_cache, (0, 0, cache_index, 0, 0), new_kv)
            # The mask's key axis says what is attended: the whole cache, or
            # (a prefill into an empty cache) only the keys just written.
            attended_kv = kv_cache if attention_mask.shape[-1] != key.shape[1] else new_kv
            key = ops.cast(attended_kv[:, 0], key.dtype)
            value = ops.cast(attended_kv[:, 1], value.dtype)
        encoded = dot_product_attention(
            query, key, value, attention_mask, soft_cap=self.attention_logit_soft_cap
        )
        output = self.output_projection(encoded)
        return output if kv_cache is None else (output, kv_cache)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_query_heads=self.num_query_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            attention_logit_soft_cap=self.attention_logit_soft_cap,
            rope_max_wavelength=self.rope_max_wavelength,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class GatedMLP(keras.layers.Layer):
    """GeGLU feed-forward: `down(gelu_tanh(gate(x)) * up(x))`.

    Args:
        intermediate_dim: int F, the width of each of the gate and up projections.
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(self, intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        common = dict(use_bias=False, dtype=self.dtype_policy)
        self.gate = projections.Dense(self.intermediate_dim, name="gate", **common)
        self.up = projections.Dense(self.intermediate_dim, name="up", **common)
        self.down = projections.Dense(hidden_dim, name="down", **common)
        self.gate.build(input_shape)
        self.up.build(input_shape)
        self.down.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, x):
        """Applies the feed-forward.

        Args:
            x: (B, T, D) normalized hidden states.

        Returns:
            (B, T, D).
        """
        hidden = keras.activations.gelu(self.gate(x), approximate=True)
        return self.down(hidden * self.up(x))

    def get_config(self):
        config = super().get_config()
        config.update(intermediate_dim=self.intermediate_dim)
        return config


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class DecoderBlock(keras.layers.Layer):
    """Gemma 2 block with pre and post norms around attention and MLP.

    `x += post_attention_norm(attention(pre_attention_norm(x)))`
    `x += post_ffw_norm(mlp(pre_ffw_norm(x)))`

    Args:
        num_query_heads: int N.
        num_key_value_heads: int K; N must be a multiple of K.
        head_dim: int H.
        intermediate_dim: int F, the width of each of the MLP's gate and up projections.
        query_pre_attn_scalar: float; queries are multiplied by its inverse square root.
        attention_logit_soft_cap: float or None (default), the attention logit soft-cap.
        layer_norm_epsilon: float, the four RMSNorms' epsilon (default 1e-6).
        rope_max_wavelength: int/float, the RoPE base (default 10,000).
        **kwargs: passed to `keras.layers.Layer` (name, dtype, ...).
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        intermediate_dim,
        query_pre_attn_scalar,
        attention_logit_soft_cap=None,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10_000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        # Set by `PaliGemma2Backbone.set_remat` (None, "block" or "matmuls");
        # a training choice, not config.
        self.remat = None

    def build(self, input_shape):
        common = dict(dtype=self.dtype_policy)
        norm = dict(epsilon=self.layer_norm_epsilon, **common)
        self.pre_attention_norm = RMSNorm(name="pre_attention_norm", **norm)
        self.attention = DecoderAttention(
            num_query_heads=self.num_query_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            attention_logit_soft_cap=self.attention_logit_soft_cap,
            rope_max_wavelength=self.rope_max_wavelength,
            name="attention",
            **common,
        )
        self.post_attention_norm = RMSNorm(name="post_attention_norm", **norm)
        self.pre_ffw_norm = RMSNorm(name="pre_ffw_norm", **norm)
        self.mlp = GatedMLP(intermediate_dim=self.intermediate_dim, name="mlp", **common)
        self.post_ffw_norm = RMSNorm(name="post_ffw_norm", **norm)
        for layer in (
            self.pre_attention_norm,
            self.attention,
            self.post_attention_norm,
            self.pre_ffw_norm,
            self.mlp,
            self.post_ffw_norm,
        ):
            layer.build(input_shape)
        self.built = True

    def call(self, x, positions, attention_mask, kv_cache=None, cache_index=None, last_only=False):
        """Returns the block output, and the updated cache when given one.

        `last_only=True` (with a cache): keys and values of every position
        go into the cache, but only the last position is attended from and
        returned, (B, 1, D): all that the final block of a prefill needs.

        Args:
            x: (B, T, D) hidden states.
            positions: int (B, T), each token's RoPE position.
            attention_mask: bool (B, T, S), True where query t may attend key s (S = T
                without a cache; see `DecoderAttention`).
            kv_cache: None (default), or this block's cache (B, 2, S, K, H).
            cache_index: int (or scalar int array), the cache slot of `x`'s first position;
                used only with `kv_cache`.
            last_only: bool; True returns the last position only (see above). Ignored when
                `remat` is on and there is no cache.

        Returns:
            (B, T, D), or (B, 1, D) with `last_only`; with `kv_cache`, the tuple
            (output, updated cache (B, 2, S, K, H)).
        """
        if self.remat and kv_cache is None:
            # Activations are recomputed in the backward pass, not stored.
            forward = functools.partial(self._forward, last_only=last_only)
            return rematerialised(forward, self.remat)(x, positions, attention_mask)
        return self._forward(x, positions, attention_mask, kv_cache, cache_index, last_only)

    def _forward(
        self, x, positions, attention_mask, kv_cache=None, cache_index=None, last_only=False
    ):
        attended = self.attention(
            self.pre_attention_norm(x),
            positions,
            attention_mask,
            kv_cache=kv_cache,
            cache_index=cache_index,
            last_only=last_only,
        )
        if kv_cache is not None:
            attended, kv_cache = attended
        if last_only:
            x = x[:, -1:]
        x = x + self.post_attention_norm(attended)
        x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
        return x if kv_cache is None else (x, kv_cache)

    def compute_output_spec(
        self, x, positions, attention_mask, kv_cache=None, cache_index=None, last_only=False
    ):
        # Declared rather than traced: tracing every block while building a
        # functional model costs seconds for the 26-46 layer models.
        shape = (x.shape[0], 1, x.shape[2]) if last_only else x.shape
        output = keras.KerasTensor(shape, x.dtype)
        if kv_cache is None:
            return output
        return output, keras.KerasTensor(kv_cache.shape, kv_cache.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_query_heads=self.num_query_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_dim=self.intermediate_dim,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            attention_logit_soft_cap=self.attention_logit_soft_cap,
            layer_norm_epsilon=self.layer_norm_epsilon,
            rope_max_wavelength=self.rope_max_wavelength,
        )
        return config
