"""The attention function, RoPE and the mask builder against numpy_reference."""

import numpy as np
import numpy_reference as ref
import pytest
from helpers import assert_close

from keras_paligemma2.layers.attention import IMPLEMENTATIONS
from keras_paligemma2.layers.attention import apply_rope
from keras_paligemma2.layers.attention import attention_implementation
from keras_paligemma2.layers.attention import choose_implementation
from keras_paligemma2.layers.attention import dot_product_attention
from keras_paligemma2.layers.attention import make_attention_mask

rng = None  # Reseeded from each test's id (conftest).

# "pallas" runs the fused kernel in Pallas interpret mode on CPU.
with_each_implementation = pytest.mark.parametrize("implementation", IMPLEMENTATIONS)


def _ragged_layout():
    # Two rows: image(3) + prefix(2) + suffix(3), second row padded by 2.
    valid = np.array([[1] * 8, [1] * 6 + [0] * 2])
    mask_ar = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
    return valid, mask_ar


@with_each_implementation
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_attention_matches_reference(num_kv_heads, soft_cap, implementation):
    valid, mask_ar = _ragged_layout()
    mask = ref.prefix_lm_mask(valid, mask_ar)
    q = rng.normal(size=(2, 8, 4, 6)).astype("float32") * 3
    k = rng.normal(size=(2, 8, num_kv_heads, 6)).astype("float32")
    v = rng.normal(size=(2, 8, num_kv_heads, 6)).astype("float32")
    with attention_implementation(implementation):
        got = np.asarray(dot_product_attention(q, k, v, mask, soft_cap=soft_cap))
    want = ref.attention(q, k, v, mask, soft_cap)
    real = valid.astype(bool)  # Padded query rows are garbage by design.
    # float32 against a float64 reference: q x 3 gives logits up to ~20, whose
    # rounding softmax's exp carries into the weights, then 8-term sums of
    # values ~1. Measured 9 ulps of the largest output.
    assert_close(got[real], want[real], ulps=48)


@with_each_implementation
@pytest.mark.parametrize("masked", [False, True])
def test_no_implementation_drops_the_soft_cap(implementation, masked):
    q = rng.normal(size=(1, 4, 2, 8)).astype("float32") * 10
    k = rng.normal(size=(1, 4, 2, 8)).astype("float32")
    v = rng.normal(size=(1, 4, 2, 8)).astype("float32")
    mask = np.tril(np.ones((1, 4, 4), bool)) if masked else None
    with attention_implementation(implementation):
        capped = np.asarray(dot_product_attention(q, k, v, mask, soft_cap=2.0))
        uncapped = np.asarray(dot_product_attention(q, k, v, mask))
    assert np.abs(capped - uncapped).max() > 1e-2
    # As test_attention_matches_reference: 48 ulps (measured 7.5).
    assert_close(capped, ref.attention(q, k, v, mask, 2.0), ulps=48)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("masked", [False, True])
def test_soft_capped_or_masked_attention_never_goes_to_a_kernel_without_them(platform, masked):
    # jax.nn.dot_product_attention (cuDNN) has no soft-cap: only attention
    # with neither soft-cap nor mask (the ViT's) may be sent there.
    for name in IMPLEMENTATIONS:
        assert choose_implementation(name, masked, 50.0, platform) != "jax_nn"
    plain = choose_implementation("auto", masked, None, platform)
    assert plain == ("jax_nn" if platform == "gpu" and not masked else "xla")


def test_auto_on_gpu_sends_plain_attention_to_jax_nn_exactly(monkeypatch):
    import jax

    calls = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(
        jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    q = rng.normal(size=(2, 6, 4, 8)).astype("float32") * 3
    k = rng.normal(size=(2, 6, 2, 8)).astype("float32")
    with attention_implementation("auto"):
        plain = np.asarray(dot_product_attention(q, k, k))
        capped = np.asarray(dot_product_attention(q, k, k, soft_cap=5.0))
    assert len(calls) == 1
    # As test_attention_matches_reference: 48 ulps (measured 7.3 and 5.4).
    assert_close(plain, ref.attention(q, k, k), ulps=48)
    assert_close(capped, ref.attention(q, k, k, soft_cap=5.0), ulps=48)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        with attention_implementation("flash"):
            pass


@pytest.mark.parametrize("soft_cap", [None, 50.0])
def test_pallas_kernel_over_many_tiles_and_its_gradients(soft_cap):
    import jax

    from keras_paligemma2.layers.flash_attention import flash_attention

    # Lengths that fill no tile exactly; two rows of different prefix
    # lengths and padding, so every tile sees a different mask.
    valid = np.ones((2, 37), int)
    valid[1, 30:] = 0
    mask_ar = np.zeros((2, 37), int)
    mask_ar[0, 20:] = 1
    mask_ar[1, 25:30] = 1
    mask = ref.prefix_lm_mask(valid, mask_ar)
    q = rng.normal(size=(2, 37, 4, 16)).astype("float32") * 4
    k = rng.normal(size=(2, 37, 2, 16)).astype("float32")
    v = rng.normal(size=(2, 37, 2, 16)).astype("float32")
    got = np.asarray(flash_attention(q, k, v, mask, soft_cap, 16, 8))
    # Online softmax over 5 key tiles: each tile rescales the running sums by
    # exp(m_old - m_new), a few more roundings than one softmax, on logits up
    # to ~40 (q x 4). Measured 37 ulps: 44 is what the old 1e-5 allowed.
    assert_close(got, ref.attention(q, k, v, mask, soft_cap), ulps=44)

    def loss(attend):
        return lambda q, k, v: (attend(q, k, v) * v.sum()).sum()

    fused = jax.grad(
        loss(lambda q, k, v: flash_attention(q, k, v, mask, soft_cap, 16, 8)), (0, 1, 2)
    )(q, k, v)
    with attention_implementation("xla"):
        exact = jax.grad(
            loss(lambda q, k, v: dot_product_attention(q, k, v, mask, soft_cap=soft_cap)), (0, 1, 2)
        )(q, k, v)
    for a, b in zip(fused, exact):
        # The kernel's backward is the XLA attention's own vjp (_flash_bwd), so
        # only v's v.sum() term sees the kernel's forward (44 ulps of values
        # ~1, against gradients of 100 to 5000): bit-equal here (measured 0).
        assert_close(a, b, ulps=8)


@with_each_implementation
def test_attention_bfloat16_inputs_keep_float32_logits(implementation):
    q = rng.normal(size=(1, 5, 4, 8)).astype("float32") * 4
    k = rng.normal(size=(1, 5, 2, 8)).astype("float32")
    v = rng.normal(size=(1, 5, 2, 8)).astype("float32")
    bf16 = [np.asarray(x).astype("bfloat16") for x in (q, k, v)]
    with attention_implementation(implementation):
        got = dot_product_attention(*bf16, soft_cap=50.0)
    assert str(got.dtype) == "bfloat16"
    want = ref.attention(*[x.astype("float32") for x in bf16], soft_cap=50.0)
    # bfloat16 in and out (float32 logits): the output's own rounding and the
    # probabilities' on the way, in bfloat16 ulps of the largest output.
    # Measured 0.87; 2 is what the old 3e-2 allowed.
    assert_close(got, want, ulps=2, dtype="bfloat16")


@with_each_implementation
def test_fully_masked_rows_stay_finite(implementation):
    q = rng.normal(size=(1, 3, 2, 4)).astype("float32")
    mask = np.zeros((1, 3, 3), bool)
    with attention_implementation(implementation):
        out = np.asarray(dot_product_attention(q, q, q, mask))
    assert np.isfinite(out).all()
    # As big_vision: a row that sees nothing averages every value.
    # Weights 1/3 (rounded) times 3 values, summed: a few roundings of values
    # ~1. Measured 1.8 ulps.
    assert_close(out, np.broadcast_to(q.mean(1, keepdims=True), q.shape), ulps=8)


def test_rope_matches_reference():
    x = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 200]])
    got = np.asarray(apply_rope(x, positions))
    # float32 angles up to 200 rad against float64 ones: an angle rounds by up
    # to 200 EPS, which sin/cos pass on times values ~3 (then a 2-term
    # rotation). Measured 1.4 ulps: this head_dim's timescales are exact.
    assert_close(got, ref.rope(x, positions), ulps=256)


def test_rope_is_relative():
    # Attention logits depend on position differences only.
    q = rng.normal(size=(1, 1, 1, 8)).astype("float32")
    k = rng.normal(size=(1, 1, 1, 8)).astype("float32")

    def logit(pq, pk):
        rq = np.asarray(apply_rope(q, np.array([[pq]])))
        rk = np.asarray(apply_rope(k, np.array([[pk]])))
        return float((rq * rk).sum())

    # Angles up to 105 rad in float32 (rounded by up to 105 EPS) rotate q and k,
    # then an 8-term dot product of values ~1: measured 1 ulp of the logit.
    assert_close(logit(5, 2), logit(105, 102), ulps=128)
    # Another distance really changes the logit (by 0.95 here): 1e-4, far
    # above the 128 ulps (3e-5) above, is no roundoff; a larger number would
    # be the stricter check.
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
    got = np.asarray(make_attention_mask(valid, np.cumsum(mask_ar, 1), sliding_window=window))
    np.testing.assert_array_equal(got, ref.hf_sliding_mask(valid, mask_ar, window))
