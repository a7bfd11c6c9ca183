"""Losses and metrics on response tokens (big_vision's trainer semantics)."""

import jax
import keras
from keras import ops

from keras_paligemma2.utils.errors import InputError

LOSS_NORMALIZATIONS = ("per_example", "per_token")


def _check_normalization(normalization):
    if normalization not in LOSS_NORMALIZATIONS:
        raise InputError(
            f"normalization must be one of {LOSS_NORMALIZATIONS}; got {normalization!r}."
        )


def reduce_over_responses(values, weights, normalization):
    """Per-token `values` (B, T) weighted by `weights` (B, T) to one number.

    "per_example" (big_vision's `trainers/proj/paligemma/train.py`): each
    example's weighted sum divided by its own weight (at least 1), then the
    mean over the batch, so an example without supervised tokens adds 0 and
    still counts in the mean. "per_token": one weighted mean over every
    token of the batch (long responses weigh more).

    Args:
        values: float tensor (B, T), per-token values (losses, or 0/1 hits).
        weights: float tensor (B, T), 1 on supervised tokens, 0 elsewhere.
        normalization: str, "per_example" or "per_token".

    Returns:
        A float scalar.
    """
    weighted = values * weights
    if normalization == "per_token":
        return ops.sum(weighted) / ops.maximum(ops.sum(weights), 1e-9)
    per_example = ops.sum(weighted, axis=-1) / ops.maximum(ops.sum(weights, axis=-1), 1.0)
    return ops.mean(per_example)


def token_cross_entropy(labels, logits, label_smoothing=0.0):
    """Per-token cross-entropy of `labels` under `logits`, in float32.

    Args:
        labels: int tensor (..., ), the target token of each position.
        logits: float tensor (..., V), any float dtype (taken in float32).
        label_smoothing: float in [0, 1): target `1 - label_smoothing` on
            the right token and `label_smoothing / (V - 1)` on each other one
            (big_vision's smoothing).

    Returns:
        float32 tensor shaped as `labels`.
    """
    logits = ops.cast(logits, "float32")
    log_normaliser = ops.logsumexp(logits, axis=-1)
    labels = ops.expand_dims(ops.cast(labels, "int32"), -1)
    picked = ops.squeeze(ops.take_along_axis(logits, labels, axis=-1), -1) - log_normaliser
    if not label_smoothing:
        return -picked
    off = label_smoothing / (logits.shape[-1] - 1)
    every = ops.sum(logits, axis=-1) - logits.shape[-1] * log_normaliser
    return -((1.0 - label_smoothing) * picked + off * (every - picked))


def chunked_token_cross_entropy(logits_fn, hidden, labels, chunk_size, label_smoothing=0.0):
    """`token_cross_entropy(labels, logits_fn(hidden))` and the argmax
    predictions, without ever holding more than `chunk_size` tokens' logits.

    The tokens are cut into chunks of `chunk_size`; each chunk's float32
    logits (chunk_size, V) are formed, reduced to a loss and a prediction per
    token and dropped, and formed again in the backward pass (the chunk is
    rematerialised), so neither pass keeps the (B, T, V) logits: for
    PaliGemma's 257,152-token vocabulary that is 1 MiB per token in float32.

    Args:
        logits_fn: function from hidden states (n, D) to logits (n, V), the
            task's output projection (soft cap included).
        hidden: float tensor (B, T, D), the text positions' final hidden states.
        labels: int tensor (B, T), the next-token labels.
        chunk_size: int, tokens per chunk (the last one padded).
        label_smoothing: float, as `token_cross_entropy`.

    Returns:
        (losses float32 (B, T), predictions int32 (B, T)).
    """
    batch, length, width = hidden.shape
    count = batch * length
    chunks = -(-count // chunk_size)
    padding = chunks * chunk_size - count
    flat_hidden = jax.numpy.pad(hidden.reshape(count, width), ((0, padding), (0, 0)))
    flat_labels = jax.numpy.pad(labels.reshape(count).astype("int32"), (0, padding))

    @jax.checkpoint
    def chunk(args):
        chunk_hidden, chunk_labels = args
        logits = ops.cast(logits_fn(chunk_hidden), "float32")
        losses = token_cross_entropy(chunk_labels, logits, label_smoothing)
        return losses, jax.numpy.argmax(logits, axis=-1).astype("int32")

    losses, predictions = jax.lax.map(
        chunk,
        (
            flat_hidden.reshape(chunks, chunk_size, width),
            flat_labels.reshape(chunks, chunk_size),
        ),
    )
    return (
        losses.reshape(-1)[:count].reshape(batch, length),
        predictions.reshape(-1)[:count].reshape(batch, length),
    )


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class ResponseCrossEntropy(keras.losses.Loss):
    """Next-token cross-entropy from logits on the response + `<eos>` labels.

    Called with labels (B, T), logits (B, T, V) and sample weights (B, T),
    1 on response + `<eos>` labels and 0 on the prompt, the separator and
    padding (as the preprocessor makes them). Logits are taken in float32.

    Args:
        label_smoothing: float in [0, 1): big_vision's smoothing, target
            `1 - label_smoothing` on the right token and
            `label_smoothing / (V - 1)` on each other one.
        normalization: "per_example" (default, big_vision's training loss:
            each example's mean over its own supervised tokens, then the
            batch mean) or "per_token" (the batch's supervised tokens pooled
            into one mean).
        name: str, the loss name.
        **kwargs: passed to `keras.losses.Loss` (`dtype`); a `reduction` is
            dropped, as `normalization` decides.
    """

    def __init__(
        self,
        label_smoothing=0.0,
        normalization="per_example",
        name="response_cross_entropy",
        **kwargs,
    ):
        kwargs.pop("reduction", None)  # The normalization decides.
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise InputError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
        _check_normalization(normalization)
        self.label_smoothing = label_smoothing
        self.normalization = normalization

    def call(self, y_true, y_pred):
        """Per-token losses (B, T), before weighting.

        Args:
            y_true: int tensor (B, T), the next-token labels.
            y_pred: float tensor (B, T, V), the logits (any float dtype).

        Returns:
            float32 tensor (B, T), the smoothed cross-entropy of each token.
        """
        return token_cross_entropy(y_true, y_pred, self.label_smoothing)

    def __call__(self, y_true, y_pred, sample_weight=None):
        losses = self.call(y_true, y_pred)
        if sample_weight is None:
            weights = ops.ones_like(losses)
        else:
            weights = ops.cast(sample_weight, "float32")
        return reduce_over_responses(losses, weights, self.normalization)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        config.update(label_smoothing=self.label_smoothing, normalization=self.normalization)
        return config


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class ResponseAccuracy(keras.metrics.Metric):
    """Next-token accuracy on the response + `<eos>` labels, normalised as
    the loss: "per_example" averages each example's accuracy over examples
    (those without supervised tokens count 0, as in the loss), "per_token"
    pools every supervised token. Pass it in `weighted_metrics` (it reads
    the sample weights as the response mask).

    Args:
        normalization: "per_example" or "per_token", as
            `ResponseCrossEntropy`.
        name: str, the metric name (default "accuracy").
        **kwargs: passed to `keras.metrics.Metric` (`dtype`).
    """

    def __init__(self, normalization="per_example", name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        _check_normalization(normalization)
        self.normalization = normalization
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds one batch to the running accuracy.

        Args:
            y_true: int tensor (B, T), the next-token labels.
            y_pred: float tensor (B, T, V), the logits; or int (B, T), the
                predicted tokens (what a chunked-loss training step gives).
            sample_weight: float tensor (B, T) or None, the response mask;
                None counts every token.
        """
        predicted = y_pred if len(y_pred.shape) == 2 else ops.argmax(y_pred, axis=-1)
        correct = ops.cast(
            ops.equal(ops.cast(predicted, "int32"), ops.cast(y_true, "int32")), "float32"
        )
        if sample_weight is None:
            weights = ops.ones_like(correct)
        else:
            weights = ops.cast(sample_weight, "float32")
        if self.normalization == "per_token":
            total, count = ops.sum(correct * weights), ops.sum(weights)
        else:
            per_example = ops.sum(correct * weights, -1) / ops.maximum(ops.sum(weights, -1), 1.0)
            total, count = ops.sum(per_example), ops.cast(ops.shape(per_example)[0], "float32")
        self.total.assign_add(ops.cast(total, self.dtype))
        self.count.assign_add(ops.cast(count, self.dtype))

    def result(self):
        return self.total / ops.maximum(self.count, 1e-9)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        config = super().get_config()
        config.update(normalization=self.normalization)
        return config
