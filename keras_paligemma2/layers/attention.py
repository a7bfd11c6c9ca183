"""Attention (one exact computation, with fused paths), RoPE and the one
attention-mask builder.

Einsum axis letters, used across the package:
  B batch, T query length, S key/value length, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, D model width.

Every attention in the package (ViT, decoder training, prefill and decode)
goes through `dot_product_attention`: grouped-query attention reads each kv
head once for its G query heads (no K/V copy per query head), logits and the
soft-cap are computed in float32, and masked positions get a large negative
logit before the softmax, as big_vision's `gemma.py` does.

Which computation runs is chosen by `set_attention_implementation` (or the
`attention_implementation` context manager):
  "xla" (the default): `exact_attention.reference_attention`, the exact
      computation above.
  "pallas": `flash_attention.flash_attention`, a fused Pallas kernel that
      keeps the soft-cap and the per-example mask (interpret mode on CPU).
  "auto": the exact computation, except attention without mask and without
      soft-cap (the ViT's) on GPU, which goes to `jax.nn.dot_product_attention`
      so that cuDNN's fused kernel runs where it supports the shapes. No fused
      kernel that JAX ships applies a logit soft-cap, so soft-capped attention
      never goes there.
"""

import contextlib

import jax
from keras import ops

from keras_paligemma2.layers.exact_attention import reference_attention
from keras_paligemma2.layers.flash_attention import flash_attention
from keras_paligemma2.utils.errors import InputError

IMPLEMENTATIONS = ("xla", "pallas", "auto")
_implementation = "xla"


def set_attention_implementation(name):
    """Chooses how `dot_product_attention` computes: "xla", "pallas" or "auto".

    Args:
        name: str, one of `IMPLEMENTATIONS` ("xla", the default, "pallas" or "auto"); anything
            else is a ValueError. Process-wide; read when a function is traced.
    """
    global _implementation
    if name not in IMPLEMENTATIONS:
        raise InputError(
            f"Unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}."
        )
    _implementation = name


def get_attention_implementation():
    return _implementation


@contextlib.contextmanager
def attention_implementation(name):
    """`with attention_implementation("pallas"): ...` (restored on exit).

    The choice is read when a function is traced: re-trace (a new model call,
    or `jax.jit` of a new function) inside the block for it to apply.

    Args:
        name: str, one of `IMPLEMENTATIONS` ("xla", "pallas" or "auto"), used inside the block;
            the previous choice comes back on exit, also on error.
    """
    previous = _implementation
    set_attention_implementation(name)
    try:
        yield
    finally:
        set_attention_implementation(previous)


def choose_implementation(name, has_mask, soft_cap, platform):
    """The computation `dot_product_attention` runs: "xla", "pallas" or
    "jax_nn" (`jax.nn.dot_product_attention`, only ever without mask and
    without soft-cap).

    Args:
        name: str, the chosen implementation, one of `IMPLEMENTATIONS`; "xla" and "pallas" are
            returned as they are, "auto" is resolved with the other arguments.
        has_mask: bool, whether the attention has a mask.
        soft_cap: float or None, the logit soft-cap; None or 0 means none.
        platform: str, the JAX backend (`jax.default_backend()`: "cpu", "gpu", "tpu").

    Returns:
        str, "xla", "pallas" or "jax_nn".
    """
    if name == "auto":
        return "jax_nn" if platform == "gpu" and not has_mask and not soft_cap else "xla"
    return name


def dot_product_attention(query, key, value, mask=None, *, soft_cap=None):
    """Attention over pre-scaled queries, by the chosen implementation.

    Args:
        query: (B, T, N, H), already multiplied by the query scale.
        key: (B, S, K, H) with N divisible by K.
        value: (B, S, K, H).
        mask: optional bool (B, T, S); True where query t may attend key s.
        soft_cap: optional float; logits become `cap * tanh(logits / cap)`
            (Gemma 2's attention soft-cap, 50), computed in float32.

    Returns:
        (B, T, N, H) in the dtype of `value`.
    """
    _check_groups(query, key)
    chosen = choose_implementation(
        _implementation, mask is not None, soft_cap, jax.default_backend()
    )
    if chosen == "pallas":
        return flash_attention(query, key, value, mask, soft_cap)
    if chosen == "jax_nn":
        return jax.nn.dot_product_attention(query, key, value, scale=1.0).astype(value.dtype)
    return reference_attention(query, key, value, mask, soft_cap=soft_cap)


def _check_groups(query, key):
    if query.shape[2] % key.shape[2]:
        raise InputError(
            f"{query.shape[2]} query heads cannot be grouped over {key.shape[2]} "
            "key/value heads: the query head count must be a multiple."
        )


def apply_rope(x, positions, max_wavelength=10_000):
    """Rotary position embedding, split-halves form (big_vision `_apply_rope`).

    Args:
        x: (B, T, N, H) queries or keys (any number of heads N or K); H must be even.
        positions: int (B, T), each token's position.
        max_wavelength: int/float, the RoPE base (10,000 for Gemma 2).

    Returns:
        (B, T, N, H) in the dtype of `x` (rotated in float32).
    """
    head_dim = x.shape[-1]
    fraction = 2.0 * ops.arange(head_dim // 2, dtype="float32") / head_dim
    timescale = ops.power(float(max_wavelength), fraction)
    radians = ops.cast(positions, "float32")[..., None] / timescale
    radians = radians[..., None, :]  # (B, T, 1, H/2), broadcast over heads.
    sin, cos = ops.sin(radians), ops.cos(radians)
    x1, x2 = ops.split(ops.cast(x, "float32"), 2, axis=-1)
    rotated = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return ops.cast(rotated, x.dtype)


def make_attention_mask(
    key_valid,
    key_blocks,
    query_valid=None,
    query_blocks=None,
    query_positions=None,
    key_positions=None,
    sliding_window=None,
):
    """Prefix-LM attention mask (big_vision `make_attn_mask`), optionally windowed.

    Tokens carry a block number, the cumulative sum of big_vision's `mask_ar`
    (0 for image, bos, prefix and separator; 1 for every suffix token).
    Query i attends key j iff `block[j] <= block[i]` and both are real tokens:
    image + prefix attend to each other fully, the suffix is causal.

    With `sliding_window` (HF transformers' Gemma 2 semantics for its local
    layers): a key further than `sliding_window - 1` positions back is hidden,
    except inside the bidirectional image + prefix block (block 0), which HF
    keeps fully visible.

    Args:
        key_valid: bool/int (B, S), 1 for real tokens.
        key_blocks: int (B, S) block numbers.
        query_valid: bool/int (B, T), 1 for real queries; None (default) takes
            `key_valid` and `key_blocks` for the queries (T = S).
        query_blocks: int (B, T) block numbers of the queries; give it with `query_valid`
            (it is replaced by `key_blocks` when `query_valid` is None).
        query_positions: int (B, T), used only with `sliding_window`; None (default): the
            token indices (T = S).
        key_positions: int (B, S), used only with `sliding_window`; None (default): the token
            indices.
        sliding_window: None, or the window length W: a query at position p
            sees keys at positions p - W + 1 .. p.

    Returns:
        bool (B, T, S).
    """
    key_valid = ops.cast(key_valid, "bool")
    if query_valid is None:
        query_valid, query_blocks = key_valid, key_blocks
    query_valid = ops.cast(query_valid, "bool")
    mask = key_blocks[:, None, :] <= query_blocks[:, :, None]
    mask = mask & key_valid[:, None, :] & query_valid[:, :, None]
    if sliding_window is not None:
        if query_positions is None:
            query_positions = ops.cumsum(ops.ones_like(query_blocks), axis=1)
        if key_positions is None:
            key_positions = ops.cumsum(ops.ones_like(key_blocks), axis=1)
        distance = query_positions[:, :, None] - key_positions[:, None, :]
        in_window = distance < sliding_window
        # ops.equal, not `==`: on symbolic KerasTensors (the functional
        # backbone) `==` is Python's identity test and gives plain False.
        both_prefix = ops.equal(query_blocks[:, :, None], 0) & ops.equal(key_blocks[:, None, :], 0)
        mask = mask & (in_window | both_prefix)
    return mask
