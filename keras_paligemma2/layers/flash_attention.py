"""Fused (flash) attention in Pallas, keeping Gemma 2's soft-cap and any mask.

The fused kernels that JAX ships do not fit PaliGemma 2's decoder:
`jax.nn.dot_product_attention` (cuDNN) and the Pallas GPU `mha` have no logit
soft-cap, and the TPU splash kernel (which has one) takes its mask as a static
pattern: its per-example segment ids hide padding but cannot express the
per-example prefix-LM mask (image + prompt bidirectional, response causal),
whose boundary moves with every example. This kernel computes exactly
`exact_attention.reference_attention`: float32 logits, `cap * tanh(logits / cap)`,
big_vision's finite masked logit, softmax, weighted values. It never forms the
(B, N, T, S) logits: each program owns `block_q` queries of one head and walks
the keys `block_k` at a time with an online softmax (FlashAttention), reading
the boolean (B, T, S) mask tile by tile.

Axis letters as in `attention.py`. The backward pass recomputes through the
exact XLA attention (correct gradients; the fused saving is the forward's,
which is what prefill and decoding need). On CPU the kernel runs in Pallas
interpret mode, which is how the tests check it; on GPU it lowers through
Triton. It has not been timed on an accelerator yet (`benchmarks/RESULTS.md`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from keras_paligemma2.layers.exact_attention import MASKED_LOGIT
from keras_paligemma2.layers.exact_attention import reference_attention


def _kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, *, soft_cap, block_k, key_len):
    # q_ref (block_q, H); k_ref, v_ref (S_padded, H); mask_ref (block_q, S_padded).
    query = q_ref[...]
    block_q, head_dim = query.shape
    num_blocks = k_ref.shape[0] // block_k

    def step(j, carry):
        acc, running_max, running_sum = carry
        keys = pl.ds(j * block_k, block_k)
        logits = jax.lax.dot_general(
            query, k_ref[keys, :], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        if soft_cap:
            logits = jnp.tanh(logits / soft_cap) * soft_cap
        logits = jnp.where(mask_ref[:, keys] != 0, logits, MASKED_LOGIT)
        # Keys past the real length exist only to fill the last block: -inf
        # removes them even from a fully masked row.
        in_range = j * block_k + jnp.arange(block_k) < key_len
        logits = jnp.where(in_range[None, :], logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        rescale = jnp.exp(running_max - new_max)
        probs = jnp.exp(logits - new_max[:, None])
        values = v_ref[keys, :]
        acc = acc * rescale[:, None] + jax.lax.dot_general(
            probs.astype(values.dtype),
            values,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return acc, new_max, running_sum * rescale + probs.sum(axis=-1)

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, total = jax.lax.fori_loop(0, num_blocks, step, init)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


def _pad_to(x, axis, multiple):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _forward(query, key, value, mask, soft_cap, block_q, block_k, interpret):
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    batch, query_len, num_heads, head_dim = query.shape
    key_len, num_kv_heads = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    block_q = min(block_q, pl.next_power_of_2(query_len))
    block_k = min(block_k, pl.next_power_of_2(key_len))
    if mask is None:
        mask = jnp.ones((batch, query_len, key_len), jnp.int8)
    query = _pad_to(query, 1, block_q)
    key, value = _pad_to(key, 1, block_k), _pad_to(value, 1, block_k)
    mask = _pad_to(_pad_to(mask.astype(jnp.int8), 1, block_q), 2, block_k)
    padded_q, padded_k = query.shape[1], key.shape[1]
    kernel = functools.partial(_kernel, soft_cap=soft_cap, block_k=block_k, key_len=key_len)
    # Grid (B, N, query blocks); `None` squeezes an axis out of the block.
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_heads, padded_q // block_q),
        in_specs=[
            pl.BlockSpec((None, block_q, None, head_dim), lambda b, n, i: (b, i, n, 0)),
            pl.BlockSpec((None, padded_k, None, head_dim), lambda b, n, i: (b, 0, n // groups, 0)),
            pl.BlockSpec((None, padded_k, None, head_dim), lambda b, n, i: (b, 0, n // groups, 0)),
            pl.BlockSpec((None, block_q, padded_k), lambda b, n, i: (b, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, head_dim), lambda b, n, i: (b, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, padded_q, num_heads, head_dim), value.dtype),
        interpret=interpret,
        name="paligemma2_flash_attention",
    )(query, key, value, mask)
    return out[:, :query_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash_attention(
    query, key, value, mask=None, soft_cap=None, block_q=64, block_k=64, interpret=None
):
    """`attention.dot_product_attention` as one fused Pallas kernel.

    Args:
        query: (B, T, N, H), already multiplied by the query scale.
        key: (B, S, K, H) with N divisible by K.
        value: (B, S, K, H).
        mask: optional bool (B, T, S), True where query t may attend key s; None attends all.
        soft_cap: optional float, Gemma 2's attention logit soft-cap; None or 0 for none.
        block_q: int, queries per program (a power of two, default 64), at most T rounded up
            to a power of two.
        block_k: int, keys per inner step (a power of two, default 64), at most S rounded up
            to a power of two.
        interpret: bool or None; run in Pallas interpret mode. None (default): on CPU only.

    Returns:
        (B, T, N, H) in the dtype of `value`.
    """
    return _forward(query, key, value, mask, soft_cap, block_q, block_k, interpret)


def _flash_fwd(query, key, value, mask, soft_cap, block_q, block_k, interpret):
    out = _forward(query, key, value, mask, soft_cap, block_q, block_k, interpret)
    return out, (query, key, value, mask)


def _flash_bwd(soft_cap, block_q, block_k, interpret, residuals, grad):
    query, key, value, mask = residuals
    _, pullback = jax.vjp(
        lambda q, k, v: reference_attention(q, k, v, mask, soft_cap=soft_cap), query, key, value
    )
    return (*pullback(grad), None)


flash_attention.defvjp(_flash_fwd, _flash_bwd)
