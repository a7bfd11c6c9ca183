"""Gemma 2 decoder layers against numpy_reference."""

import keras
import numpy as np
import numpy_reference as ref
from helpers import assert_close
from helpers import randomize

from keras_paligemma2.layers.gemma import DecoderBlock
from keras_paligemma2.layers.gemma import GatedMLP
from keras_paligemma2.layers.gemma import RMSNorm
from keras_paligemma2.layers.gemma import TokenEmbedding

rng = None  # Reseeded from each test's id (conftest).


def test_rms_norm_uses_one_plus_scale():
    x = rng.normal(size=(2, 3, 16)).astype("float32") * 5
    norm = RMSNorm(epsilon=1e-6)
    norm.build(x.shape)
    randomize(norm, rng, 0.3)
    want = ref.rms_norm(x, np.asarray(norm.scale))
    # Mean of 16 squares, rsqrt, times (1 + scale): a few roundings of the
    # largest output (measured 1.3 ulps).
    assert_close(norm(x), want, ulps=8)


def test_gated_mlp_is_geglu():
    x = rng.normal(size=(2, 3, 16)).astype("float32")
    mlp = GatedMLP(24)
    mlp.build(x.shape)
    randomize(mlp, rng, 0.3)
    gate, up, down = (np.asarray(layer.kernel) for layer in (mlp.gate, mlp.up, mlp.down))
    want = (ref.gelu_tanh(x @ gate) * (x @ up)) @ down
    # 16-term and 24-term float32 dot products, gelu, a product; numpy in
    # another order (measured 1.2 ulps of the largest output).
    assert_close(mlp(x), want, ulps=8)


def test_token_embedding_scales_and_ties():
    emb = TokenEmbedding(10, 16)
    emb.build()
    ids = np.array([[1, 2, 9]])
    table = np.asarray(emb.embeddings)
    # Times sqrt(16) = 4: exact in binary floating point.
    assert_close(emb(ids), table[ids] * 4.0, ulps=0)
    x = rng.normal(size=(1, 3, 16)).astype("float32")
    logits = emb(x, reverse=True)
    assert str(logits.dtype) == "float32"
    # 16-term dot products, numpy and XLA in other orders (measured 2 ulps).
    assert_close(logits, x @ table.T, ulps=16)


def _block_reference(block, x, positions, mask):
    def kernel(layer):
        return np.asarray(layer.kernel, np.float64)

    att = block.attention
    h = ref.rms_norm(x, np.asarray(block.pre_attention_norm.scale))
    q = np.einsum("btd,ndh->btnh", h, kernel(att.query))
    k = np.einsum("btd,kdh->btkh", h, kernel(att.key))
    v = np.einsum("btd,kdh->btkh", h, kernel(att.value))
    q = ref.rope(q, positions) * block.query_pre_attn_scalar**-0.5
    k = ref.rope(k, positions)
    o = ref.attention(q, k, v, mask, block.attention_logit_soft_cap)
    o = np.einsum("btnh,nhd->btd", o, kernel(att.output_projection))
    x = x + ref.rms_norm(o, np.asarray(block.post_attention_norm.scale))
    h = ref.rms_norm(x, np.asarray(block.pre_ffw_norm.scale))
    mlp = block.mlp
    m = (ref.gelu_tanh(h @ kernel(mlp.gate)) * (h @ kernel(mlp.up))) @ kernel(mlp.down)
    return x + ref.rms_norm(m, np.asarray(block.post_ffw_norm.scale))


def test_decoder_block_matches_reference():
    # query_pre_attn_scalar differs from head_dim, as in the 28B model.
    block = DecoderBlock(
        num_query_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_dim=24,
        query_pre_attn_scalar=20,
        attention_logit_soft_cap=3.0,
    )
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    block.build(x.shape)
    randomize(block, rng, 0.3)
    positions = np.tile(np.arange(6), (2, 1))
    valid = np.ones((2, 6), int)
    mask_ar = np.array([[0, 0, 0, 1, 1, 1]] * 2)
    mask = ref.prefix_lm_mask(valid, mask_ar)
    got = np.asarray(block(x, positions, mask))
    want = _block_reference(block, x.astype(np.float64), positions, mask)
    # One block in float32 against float64: norms, 16-term projections, RoPE,
    # soft-capped attention, a 24-wide GeGLU; ~10 roundings deep, each of the
    # largest values (measured 11 ulps).
    assert_close(got, want, ulps=64)


def test_prefill_block_caches_every_position_and_can_return_only_the_last():
    # The final block of a prefill: the cache gets all keys/values, the
    # output is the last position's row of the full computation.
    block = DecoderBlock(4, 2, 8, 24, query_pre_attn_scalar=8, attention_logit_soft_cap=3.0)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    block.build(x.shape)
    randomize(block, rng, 0.3)
    positions = np.array([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    valid = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask = ref.prefix_lm_mask(valid, np.zeros((2, 6), int))
    mask = np.concatenate([mask, np.zeros((2, 6, 3), bool)], axis=2)  # 3 free slots
    empty = np.zeros((2, 2, 9, 2, 8), "float32")
    full, full_cache = block(x, positions, mask, kv_cache=empty, cache_index=0)
    last, last_cache = block(x, positions, mask, kv_cache=empty, cache_index=0, last_only=True)
    assert last.shape == (2, 1, 16)
    # The last query row alone: the same sums, bit-equal (measured 0); 4 ulps
    # for a different split of the projections (the old bound allowed 7.8
    # for outputs near 0).
    assert_close(last, np.asarray(full)[:, -1:], ulps=4)
    np.testing.assert_array_equal(np.asarray(last_cache), np.asarray(full_cache))
    assert np.abs(np.asarray(full_cache)[:, :, :6]).min() > 0  # every position written
    # A mask over the new keys only (the prefill's): same output, same cache.
    own, own_cache = block(x, positions, mask[:, :, :6], kv_cache=empty, cache_index=0)
    # 6 keys instead of 9 (3 masked): the same terms, split otherwise
    # (measured 4 ulps).
    assert_close(own, full, ulps=32)
    np.testing.assert_array_equal(np.asarray(own_cache), np.asarray(full_cache))


def test_remat_keeps_last_only():
    block = DecoderBlock(
        num_query_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_dim=24,
        query_pre_attn_scalar=8,
    )
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    block.build(x.shape)
    randomize(block, rng, 0.3)
    positions = np.broadcast_to(np.arange(5), (2, 5))
    mask = np.broadcast_to(np.tril(np.ones((5, 5), bool)), (2, 5, 5))
    want = np.asarray(block(x, positions, mask, last_only=True))
    block.remat = True
    got = np.asarray(block(x, positions, mask, last_only=True))
    assert got.shape == want.shape == (2, 1, 16)
    # Remat recomputes the same forward: bit-equal (measured 0); 4 ulps for a
    # different fusion.
    assert_close(got, want, ulps=4)


def test_decoder_projections_are_lora_and_int8_ready():
    block = DecoderBlock(4, 2, 8, 24, query_pre_attn_scalar=8)
    block.build((None, None, 16))
    for layer in (block.attention.query, block.mlp.gate):
        assert isinstance(layer, (keras.layers.EinsumDense, keras.layers.Dense))
    block.attention.query.enable_lora(2)
    assert block.attention.query.lora_enabled
    block.mlp.gate.quantize("int8")
    assert str(block.mlp.gate._kernel.dtype) == "int8"
