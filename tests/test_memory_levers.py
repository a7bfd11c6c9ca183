"""Training memory levers: the chunked vocabulary loss and the remat
policies give the plain step's numbers while keeping less for the backward
pass."""

import jax
import keras
import numpy as np
import pytest
from helpers import assert_close
from helpers import backbone_inputs
from helpers import tiny_lm
from jax._src.ad_checkpoint import saved_residuals

from keras_paligemma2.training.losses import ResponseCrossEntropy
from keras_paligemma2.utils.errors import InputError

VOCABULARY = 512  # Large enough that the logits dominate what a step keeps.


def _batch(seed=0, batch=3, length=7):
    rng = np.random.default_rng(seed)
    x = backbone_inputs(rng, batch=batch, length=length, vocabulary_size=VOCABULARY)
    x["padding_mask"][0, -2:] = 0  # A padded row: its tail has no weight.
    y = rng.integers(1, VOCABULARY, (batch, length)).astype("int32")
    weights = (x["response_mask"] * x["padding_mask"]).astype("float32")
    return x, y, weights


def _task(**compile_kwargs):
    lm = tiny_lm(seed=3, words=None, vocabulary_size=VOCABULARY, num_layers=2, vit_num_layers=1)
    lm.compile(optimizer=keras.optimizers.SGD(0.1), **compile_kwargs)
    lm.optimizer.build(lm.trainable_variables)
    return lm


def _loss_fn(lm):
    """The step's stateless loss as a function of the trainable values."""
    frozen = [v.value for v in lm.non_trainable_variables]
    optimizer = [v.value for v in lm.optimizer.variables]

    def loss(trainable, x, y, weights):
        value, (_, predictions, _, _) = lm.compute_loss_and_updates(
            trainable, frozen, [], x, y, weights, training=True, optimizer_variables=optimizer
        )
        return value, predictions

    return loss


def _plain_loss_fn(lm, smoothing):
    """The loss as the model's logits and `ResponseCrossEntropy` give it."""
    frozen = [v.value for v in lm.non_trainable_variables]
    cross_entropy = ResponseCrossEntropy(smoothing)

    def loss(trainable, x, y, weights):
        logits, _ = lm.stateless_call(trainable, frozen, x, training=True)
        return cross_entropy(y, logits, weights), keras.ops.argmax(logits, axis=-1)

    return loss


def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    # With label smoothing, both terms of the loss (without: the `fit` test
    # below compares losses and metrics).
    smoothing = 0.1
    x, y, weights = _batch()
    plain = _task(label_smoothing=smoothing)
    chunked = _task(label_smoothing=smoothing, loss_chunk_size=5)  # 21 tokens: a padded chunk.
    trainable = [v.value for v in plain.trainable_variables]
    (want, want_ids), want_grads = jax.value_and_grad(
        _plain_loss_fn(plain, smoothing), has_aux=True
    )(trainable, x, y, weights)
    (got, got_ids), got_grads = jax.value_and_grad(_loss_fn(chunked), has_aux=True)(
        trainable, x, y, weights
    )
    # The same float32 logits per token, reduced in the same order; only
    # XLA's fusion differs (measured within 2 ulps of the loss ~6).
    assert_close(got, want, ulps=8)
    np.testing.assert_array_equal(got_ids, want_ids)
    for variable, g, w in zip(plain.trainable_variables, got_grads, want_grads):
        # Gradients through a chunk's recomputed logits: each a sum over
        # 512 vocabulary terms and 21 tokens, scale its largest entry.
        assert_close(
            g, w, ulps=64, scale=max(np.abs(np.asarray(w)).max(), 1e-3), err_msg=variable.path
        )


def _residual_bytes(fn, *args):
    """Bytes the backward pass keeps: residuals that are not arguments."""
    return sum(
        int(np.prod(aval.shape)) * aval.dtype.itemsize
        for aval, source in saved_residuals(fn, *args)
        if not source.startswith("from the argument")
    )


def test_chunked_loss_keeps_no_vocabulary_logits():
    x, y, weights = _batch()
    plain, chunked = _task(), _task(loss_chunk_size=4)
    trainable = [v.value for v in plain.trainable_variables]
    kept_plain = _residual_bytes(
        lambda t: _plain_loss_fn(plain, 0.0)(t, x, y, weights)[0], trainable
    )
    kept_chunked = _residual_bytes(lambda t: _loss_fn(chunked)(t, x, y, weights)[0], trainable)
    logits = 3 * 7 * VOCABULARY * 4  # (B, T, V) float32
    chunk_inputs = 24 * 32 * 4  # 21 tokens padded to 6 chunks of 4, width 32, float32
    # The plain step keeps the logits' softmax; the chunked one keeps each
    # chunk's hidden states instead (measured: 42,713 bytes fewer).
    assert kept_plain - kept_chunked >= logits - chunk_inputs, (kept_plain, kept_chunked)


def test_fit_with_chunked_loss_reports_the_plain_metrics():
    x, y, weights = _batch(seed=1, batch=4)
    logs = []
    for chunk in (None, 6):
        lm = _task(loss_chunk_size=chunk)
        history = lm.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, verbose=0)
        logs.append({k: v[0] for k, v in history.history.items()})
    assert logs[0].keys() == logs[1].keys()
    for name in logs[0]:
        # Loss ~6 and accuracy in [0, 1] through two fusions of one step.
        assert_close(logs[1][name], logs[0][name], ulps=16, err_msg=name)


def test_remat_policies_give_the_gradients_and_keep_less():
    x, y, weights = _batch()
    trainable = None
    grads, kept = {}, {}
    for policy in (None, "block", "matmuls"):
        lm = _task() if policy is None else _task(remat=policy)
        trainable = trainable or [v.value for v in lm.trainable_variables]
        fn = _plain_loss_fn(lm, 0.0)
        grads[policy] = jax.grad(lambda t, fn=fn: fn(t, x, y, weights)[0])(trainable)
        kept[policy] = _residual_bytes(lambda t, fn=fn: fn(t, x, y, weights)[0], trainable)
    for policy in ("block", "matmuls"):
        for variable, g, w in zip(lm.trainable_variables, grads[policy], grads[None]):
            # The same forward recomputed, fused otherwise by XLA: sums over
            # the batch and two blocks in another order (measured 8 ulps of
            # the largest entry at most).
            assert_close(
                g,
                w,
                ulps=32,
                scale=max(np.abs(np.asarray(w)).max(), 1e-3),
                err_msg=f"{policy}: {variable.path}",
            )
    assert kept["block"] < kept["matmuls"] < kept[None], kept


def test_bad_lever_settings_are_explained():
    lm = tiny_lm(seed=0, words=None, num_layers=1, vit_num_layers=1)
    with pytest.raises(InputError, match="remat must be"):
        lm.compile(remat="everything")
    with pytest.raises(InputError, match="positive number of tokens"):
        lm.compile(loss_chunk_size=0)
    with pytest.raises(InputError, match="'auto' loss"):
        lm.compile(loss="mse", loss_chunk_size=8)
