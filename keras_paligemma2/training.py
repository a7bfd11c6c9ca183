"""Training pieces for `PaliGemma2CausalLM.fit`: loss, data, recipe, callbacks.

- `ResponseCrossEntropy`: cross-entropy on response + `<eos>` labels only,
  each example averaged over its own labels, then over the batch, with
  big_vision's label smoothing (its `trainers/proj/paligemma/train.py`);
  the pooled-token mean is an option. keras-hub divides by batch x length,
  padding included, so its loss shrinks as padding grows.
- `ResponseAccuracy`: next-token accuracy on the same labels, normalised
  as the loss.
- `RawBatches`: raw `{images, prompts, responses}` examples to preprocessed
  batches, shuffled per epoch from a seed, so a resumed run sees the same
  batches as an uninterrupted one.
- `big_vision_optimizer`: big_vision's transfer recipe (Adam, global gradient
  norm clipped at 1.0, linear warmup then cosine decay).
- `TrainingCheckpoint`: writes weights, optimizer state and position
  atomically, and resumes `fit` from them.
"""

import inspect
import json
import math
import os

import keras
import numpy as np
from keras import ops

from keras_paligemma2.saving import atomic_file
from keras_paligemma2.saving import read_state
from keras_paligemma2.saving import write_state


LOSS_NORMALIZATIONS = ("per_example", "per_token")


def _check_normalization(normalization):
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {LOSS_NORMALIZATIONS}; got {normalization!r}."
        )


def reduce_over_responses(values, weights, normalization):
    """Per-token `values` (B, T) weighted by `weights` (B, T) to one number.

    "per_example" (big_vision's `trainers/proj/paligemma/train.py`): each
    example's weighted sum divided by its own weight (at least 1), then the
    mean over the batch, so an example without supervised tokens adds 0 and
    still counts in the mean. "per_token": one weighted mean over every
    token of the batch (long responses weigh more).
    """
    weighted = values * weights
    if normalization == "per_token":
        return ops.sum(weighted) / ops.maximum(ops.sum(weights), 1e-9)
    per_example = ops.sum(weighted, axis=-1) / ops.maximum(ops.sum(weights, axis=-1), 1.0)
    return ops.mean(per_example)


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
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
        _check_normalization(normalization)
        self.label_smoothing = label_smoothing
        self.normalization = normalization

    def call(self, y_true, y_pred):
        """Per-token losses (B, T), before weighting."""
        logits = ops.cast(y_pred, "float32")
        log_normaliser = ops.logsumexp(logits, axis=-1)
        labels = ops.expand_dims(ops.cast(y_true, "int32"), -1)
        picked = ops.squeeze(ops.take_along_axis(logits, labels, axis=-1), -1) - log_normaliser
        if not self.label_smoothing:
            return -picked
        off = self.label_smoothing / (logits.shape[-1] - 1)
        every = ops.sum(logits, axis=-1) - logits.shape[-1] * log_normaliser
        return -((1.0 - self.label_smoothing) * picked + off * (every - picked))

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
        name: str, the metric name.
    """

    def __init__(self, normalization="per_example", name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        _check_normalization(normalization)
        self.normalization = normalization
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        correct = ops.cast(
            ops.equal(ops.argmax(y_pred, axis=-1), ops.cast(y_true, "int32")), "float32"
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


def big_vision_schedule(total_steps, learning_rate=3e-5, warmup_fraction=0.05):
    """Linear warmup over `warmup_fraction` of the steps, then cosine to 0."""
    total_steps = int(total_steps)
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1; got {total_steps}.")
    warmup = int(round(total_steps * warmup_fraction))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
        alpha=0.0,
    )


def big_vision_optimizer(
    total_steps,
    learning_rate=3e-5,
    warmup_fraction=0.05,
    weight_decay=None,
    global_clipnorm=1.0,
    gradient_accumulation_steps=None,
):
    """big_vision's PaliGemma transfer recipe as a Keras optimizer.

    Adam (b1 0.9, b2 0.999), gradients clipped to global norm 1.0, learning
    rate rising linearly over the first `warmup_fraction` of `total_steps`
    then decaying to 0 along a cosine; `weight_decay` is decoupled (AdamW)
    when given.
    """
    schedule = big_vision_schedule(total_steps, learning_rate, warmup_fraction)
    common = dict(
        learning_rate=schedule,
        beta_1=0.9,
        beta_2=0.999,
        global_clipnorm=global_clipnorm,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    if weight_decay:
        return keras.optimizers.AdamW(weight_decay=weight_decay, **common)
    return keras.optimizers.Adam(**common)


class RawBatches(keras.utils.PyDataset):
    """Raw examples, batched and preprocessed on the fly.

    `examples`: a dict with `images` (array or list, one per example),
    `prompts` and `responses` (lists of strings). Each epoch visits the
    examples in an order drawn from `seed` and the epoch number alone (set
    by the `EpochOrder` callback that `fit` adds), so batch `i` of epoch `e`
    is the same in every run, a resumed one included. The last incomplete
    batch is dropped when shuffling. Batches are made in order, in the
    training thread (`workers=1`), so none is made before its epoch is set.
    """

    def __init__(self, preprocessor, examples, batch_size=32, shuffle=True, seed=0):
        super().__init__()
        if not isinstance(examples, dict):
            raise ValueError(f"Pass a dict of examples; got {type(examples).__name__}.")
        missing = [k for k in ("images", "prompts", "responses") if k not in examples]
        if missing:
            raise ValueError(
                f"Training examples lack {missing}; pass images, prompts and responses."
            )
        lengths = {k: len(examples[k]) for k in ("images", "prompts", "responses")}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"images, prompts and responses must have one entry per example; got {lengths}."
            )
        self.preprocessor = preprocessor
        self.examples = examples
        self.count = lengths["prompts"]
        if self.count == 0:
            raise ValueError("No training examples given.")
        self.batch_size = int(batch_size or 32)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        if self.shuffle:
            return max(self.count // self.batch_size, 1)
        return math.ceil(self.count / self.batch_size)

    def order(self, epoch):
        """The example order of `epoch` (computed once per epoch)."""
        if getattr(self, "_order", (None,))[0] != epoch:
            rows = np.arange(self.count)
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            self._order = (epoch, rows)
        return self._order[1]

    def __getitem__(self, index):
        rows = self.order(self.epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        batch = {k: _take(self.examples[k], rows) for k in ("images", "prompts", "responses")}
        try:
            return _preprocess(self.preprocessor, batch)
        except ValueError as error:
            # The preprocessor counts within the batch; name the examples.
            raise ValueError(
                f"Batch {index} (examples {rows.tolist()} of the data set): {error}"
            ) from error


def preprocessed_dataset(data, preprocessor, image_rank=4):
    """A `tf.data.Dataset` or generator of raw batches, preprocessed.

    Batches that are already `(x, y, sample_weight)` pass through. In a
    `tf.data` pipeline the preprocessor (NumPy and SentencePiece) runs as a
    `tf.numpy_function`; strings arrive as bytes and are decoded as UTF-8.
    """
    if inspect.isgenerator(data):
        return (_preprocess_raw(preprocessor, batch) for batch in data)
    import tensorflow as tf

    spec = data.element_spec
    if not (isinstance(spec, dict) and "prompts" in spec):
        return data
    if preprocessor is None:
        raise ValueError("Raw examples need a preprocessor; this model has none.")
    keys = ("images", "prompts", "responses")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise ValueError(f"The dataset's elements lack {missing}; give images, prompts and responses.")

    def run(*values):
        x, y, weights = _preprocess_raw(preprocessor, dict(zip(keys, values)))
        return (
            x["images"].astype(np.float32),
            x["token_ids"].astype(np.int32),
            x["padding_mask"].astype(np.int32),
            x["response_mask"].astype(np.int32),
            np.asarray(y, np.int32),
            np.asarray(weights, np.float32),
        )

    def mapped(batch):
        out = tf.numpy_function(
            run,
            [batch[k] for k in keys],
            [tf.float32, tf.int32, tf.int32, tf.int32, tf.int32, tf.float32],
        )
        images, token_ids, padding_mask, response_mask, labels, weights = out
        images.set_shape([None] * image_rank)
        for tensor in (token_ids, padding_mask, response_mask, labels, weights):
            tensor.set_shape([None, None])
        x = {
            "images": images,
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "response_mask": response_mask,
        }
        return x, labels, weights

    return data.map(mapped, num_parallel_calls=1).prefetch(2)


def _preprocess_raw(preprocessor, batch):
    if not (isinstance(batch, dict) and "prompts" in batch):
        return batch
    if preprocessor is None:
        raise ValueError("Raw examples need a preprocessor; this model has none.")
    batch = dict(batch)
    for key in ("prompts", "responses"):
        if key in batch:
            batch[key] = _strings(batch[key])
    images = batch.get("images")
    if isinstance(images, np.ndarray) and images.dtype == object:
        batch["images"] = [_image(i) for i in images]
    elif isinstance(images, (list, tuple)):
        batch["images"] = [_image(i) for i in images]
    return _preprocess(preprocessor, batch)


def _preprocess(preprocessor, batch):
    """Our preprocessor runs NumPy code: call it without Keras' layer
    wrapper, whose errors repeat every argument (whole images) around ours."""
    from keras_paligemma2.preprocessor import PaliGemma2CausalLMPreprocessor

    if isinstance(preprocessor, PaliGemma2CausalLMPreprocessor):
        return preprocessor.call(batch)
    return preprocessor(batch)


def _strings(values):
    if isinstance(values, (str, bytes)):
        values = [values]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]


def _image(value):
    """A path (str or bytes) or encoded image bytes, as the converter takes them."""
    if isinstance(value, bytes):
        if os.path.exists(value.decode("utf-8", "ignore")):
            return value.decode("utf-8")
        import io

        import PIL.Image

        try:
            return PIL.Image.open(io.BytesIO(value))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"An image given as {len(value)} bytes is neither an existing file "
                f"path nor a decodable image ({error})."
            ) from error
    return value


def _take(values, rows):
    if isinstance(values, np.ndarray):
        return values[rows]
    return [values[i] for i in rows]


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the training state at each epoch end; resumes `fit` from it.

    The state (every model variable, LoRA ones included, and the optimizer's)
    is written by variable path to a temporary file and renamed over the
    previous one, so an interrupted save leaves the last good checkpoint in
    place; an epoch whose loss is not finite is never saved. When `fit`
    starts and a checkpoint exists, the state is restored and training goes
    on from the next epoch; with `RawBatches` (whose batches depend only on
    the epoch number) the finished run has the same weights as an
    uninterrupted one. Use `steps_per_epoch` to checkpoint more often.
    """

    def __init__(self, directory):
        super().__init__()
        self.directory = os.fspath(directory)
        self.state_path = os.path.join(self.directory, "state.safetensors")
        self.progress_path = os.path.join(self.directory, "progress.json")

    def _variables(self):
        """{key: variable}; optimizer variables under "optimizer/", without
        the optimizer's own name (which Keras numbers per instance)."""
        model = self.model
        named = {v.path: v for v in model.variables}
        optimizer = model.optimizer
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            for v in optimizer.variables:
                named["optimizer/" + v.path.split("/", 1)[-1]] = v
        return named

    def completed_epochs(self):
        """Epochs the saved state has finished (0 without a checkpoint)."""
        if not os.path.exists(self.progress_path):
            return 0
        with open(self.progress_path) as f:
            return int(json.load(f)["epoch"])

    def on_train_begin(self, logs=None):
        epoch = self.completed_epochs()
        if not epoch:
            return
        read_state(self.state_path, self._variables())
        # `fit` reads this at its start (keras' own BackupAndRestore does too).
        self.model._initial_epoch = epoch
        print(f"Resumed from {self.directory} after epoch {epoch}.")

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            return
        os.makedirs(self.directory, exist_ok=True)
        write_state(self.state_path, self._variables())
        with atomic_file(self.progress_path, "w") as f:
            json.dump({"epoch": epoch + 1}, f)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` with an error naming the epoch and step where the loss
    stopped being finite (no checkpoint is written for that epoch)."""

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"The training loss became {float(loss)} at epoch {self._epoch + 1}, "
                f"step {batch + 1}. Training stopped; checkpoints of earlier "
                "epochs are kept. Lower the learning rate, keep gradient "
                "clipping on, or train in float32 / mixed_bfloat16 rather than "
                "pure bfloat16 or float16."
            )


class EpochOrder(keras.callbacks.Callback):
    """Tells a `RawBatches` which epoch is starting (its shuffle order)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch
