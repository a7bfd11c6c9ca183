"""The attention function, RoPE and the mask builder against numpy_reference."""

import numpy as np
import pytest

import numpy_reference as ref
from keras_paligemma2.attention import apply_rope
from keras_paligemma2.attention import dot_product_attention
from keras_paligemma2.attention import make_attention_mask

rng = np.random.default_rng(0)


def _ragged_layout():
    # Two rows: image(3) + prefix(2) + suffix(3), second row padded by 2.
    valid = np.array([[1] * 8, [1] * 6 + [0] * 2])
    mask_ar = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
    return valid, mask_ar


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_attention_matches_reference(num_kv_heads, soft_cap):
    valid, mask_ar = _ragged_layout()
    mask = ref.prefix_lm_mask(valid, mask_ar)
    q = rng.normal(size=(2, 8, 4, 6)).astype("float32") * 3
    k = rng.normal(size=(2, 8, num_kv_heads, 6)).astype("float32")
    v = rng.normal(size=(2, 8, num_kv_heads, 6)).astype("float32")
    got = np.asarray(dot_product_attention(q, k, v, mask, soft_cap=soft_cap))
    want = ref.attention(q, k, v, mask, soft_cap)
    real = valid.astype(bool)  # Padded query rows are garbage by design.
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)


def test_soft_cap_changes_result():
    q = rng.normal(size=(1, 4, 2, 8)).astype("float32") * 10
    k = rng.normal(size=(1, 4, 2, 8)).astype("float32")
    v = rng.normal(size=(1, 4, 2, 8)).astype("float32")
    capped = np.asarray(dot_product_attention(q, k, v, soft_cap=2.0))
    uncapped = np.asarray(dot_product_attention(q, k, v))
    assert np.abs(capped - uncapped).max() > 1e-2


def test_attention_bfloat16_inputs_keep_float32_logits():
    q = rng.normal(size=(1, 5, 4, 8)).astype("float32") * 4
    k = rng.normal(size=(1, 5, 2, 8)).astype("float32")
    v = rng.normal(size=(1, 5, 2, 8)).astype("float32")
    bf16 = [np.asarray(x).astype("bfloat16") for x in (q, k, v)]
    got = dot_product_attention(*bf16, soft_cap=50.0)
    assert str(got.dtype) == "bfloat16"
    want = ref.attention(*[x.astype("float32") for x in bf16], soft_cap=50.0)
    np.testing.assert_allclose(np.asarray(got, "float32"), want, atol=3e-2)


def test_fully_masked_rows_stay_finite():
    q = rng.normal(size=(1, 3, 2, 4)).astype("float32")
    mask = np.zeros((1, 3, 3), bool)
    out = np.asarray(dot_product_attention(q, q, q, mask))
    assert np.isfinite(out).all()


def test_rope_matches_reference():
    x = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 200]])
    got = np.asarray(apply_rope(x, positions))
    np.testing.assert_allclose(got, ref.rope(x, positions), atol=1e-4)


def test_rope_is_relative():
    # Attention logits depend on position differences only.
    q = rng.normal(size=(1, 1, 1, 8)).astype("float32")
    k = rng.normal(size=(1, 1, 1, 8)).astype("float32")

    def logit(pq, pk):
        rq = np.asarray(apply_rope(q, np.array([[pq]])))
        rk = np.asarray(apply_rope(k, np.array([[pk]])))
        return float((rq * rk).sum())

    assert logit(5, 2) == pytest.approx(logit(105, 102), abs=1e-4)
    assert logit(5, 2) != pytest.approx(logit(5, 3), abs=1e-4)


def test_prefix_lm_mask_matches_big_vision():
    valid, mask_ar = _ragged_layout()
    got = np.asarray(make_attention_mask(valid, np.cumsum(mask_ar, 1)))
    np.testing.assert_array_equal(got, ref.prefix_lm_mask(valid, mask_ar))
    # Image + prefix see each other both ways; the suffix is causal.
    assert got[0, 0, 4] and got[0, 4, 0]
    assert got[0, 6, 5] and not got[0, 5, 6]


@pytest.mark.parametrize("window", [1, 2, 4, 100])
def test_sliding_window_mask_matches_hf_semantics(window):
    valid, mask_ar = _ragged_layout()
    got = np.asarray(
        make_attention_mask(valid, np.cumsum(mask_ar, 1), sliding_window=window)
    )
    np.testing.assert_array_equal(got, ref.hf_sliding_mask(valid, mask_ar, window))
