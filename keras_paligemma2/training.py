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
- `BigVisionAdam` / `big_vision_optimizer`: big_vision's optimizer chain
  (`big_vision/optax.py`): optax's global-norm clip and Adam, the cosine
  schedule with warmup, weight decay scaled by the schedule on the
  parameters its decay mask names.
- `TrainingCheckpoint`: writes weights, optimizer state and position
  atomically, and resumes `fit` from them.
"""

import inspect
import json
import math
import os
import re

import keras
import numpy as np
from keras import ops

from keras_paligemma2.checkpoints.big_vision import big_vision_name
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


def big_vision_warmup_steps(total_steps, warmup_fraction):
    """Warmup steps as big_vision's `utils.steps("warmup", ...)` counts a
    `warmup_percent`: rounded (half to even), at least 1 when non-zero."""
    steps = total_steps * warmup_fraction
    return max(1, round(steps)) if steps else 0


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class BigVisionSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """big_vision's `utils.create_learning_rate_schedule` ("cosine"), times
    a peak rate.

    `rate(c) = peak * 0.5 * (1 + cos(pi * clip((c - w) / (T - w), 0, 1)))
    * min(1, c / w)` at update count c (0 for the first update, so the first
    update moves nothing while a warmup runs, as in big_vision).

    Args:
        total_steps: int, T, the number of updates.
        peak: float, the rate at the end of the warmup (1.0 gives
            big_vision's multiplier itself).
        warmup_steps: int, w; big_vision requires w < T (or T <= 1).
    """

    def __init__(self, total_steps, peak=1.0, warmup_steps=0):
        total_steps, warmup_steps = int(total_steps), int(warmup_steps)
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1; got {total_steps}.")
        if total_steps > 1 and not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must be below total_steps ({total_steps})."
            )
        self.total_steps = total_steps
        self.peak = float(peak)
        self.warmup_steps = warmup_steps

    def multiplier(self, step):
        step = ops.cast(step, "float32")
        warmup = float(self.warmup_steps)
        progress = (step - warmup) / float(self.total_steps - warmup or 1)
        value = 0.5 * (1.0 + ops.cos(math.pi * ops.clip(progress, 0.0, 1.0)))
        if self.warmup_steps:
            value = value * ops.minimum(1.0, step / warmup)
        return value

    def __call__(self, step):
        return self.peak * self.multiplier(step)

    def get_config(self):
        return dict(total_steps=self.total_steps, peak=self.peak, warmup_steps=self.warmup_steps)


def big_vision_schedule(total_steps, learning_rate=3e-5, warmup_fraction=0.05):
    """Linear warmup over `warmup_fraction` of the steps, then cosine to 0,
    as big_vision's PaliGemma transfer configs (`decay_type="cosine"`,
    `warmup_percent`)."""
    return BigVisionSchedule(
        total_steps, learning_rate, big_vision_warmup_steps(int(total_steps), warmup_fraction)
    )


# big_vision's default `wd_mults`: only parameters whose big_vision name ends
# in "/kernel" decay, i.e. the ViT's and the projection's kernels, not
# Gemma's einsum weights, embeddings, norms or biases.
BIG_VISION_DECAY_MULTS = ((r".*/kernel$", 1.0),)


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class BigVisionAdam(keras.optimizers.Optimizer):
    """big_vision's optimizer chain (`big_vision/optax.py` `make`) for Adam.

    Each update, with c the number of updates so far and s(c) the schedule
    multiplier (`BigVisionSchedule`, 1 at its peak):

        g = clip_by_global_norm(gradients, global_clipnorm)   # optax's
        adam = m_hat / (sqrt(v_hat + epsilon_root) + epsilon)  # optax scale_by_adam
        p -= s(c) * (learning_rate * adam + weight_decay * mult(p) * p)

    Weight decay is decoupled and scaled by the schedule, not by the
    learning rate (big_vision's configs therefore write wd = 0.1 x lr), and
    applies to the parameters `weight_decay_mults` names: (regex, mult)
    pairs matched in full against each parameter's big_vision name, the
    first match deciding, as big_vision's `wd_mults`. Adam's epsilon is added
    to the bias-corrected second moment's root (optax), not to the raw one
    (Keras' `Adam`, 1e-7).

    Args:
        total_steps: int, the number of updates (the schedule's length).
        learning_rate: float, the peak learning rate (`config.lr`).
        warmup_fraction: float, big_vision's `warmup_percent`.
        weight_decay: float, `config.wd` (0 for none).
        weight_decay_mults: (regex, float) pairs over big_vision parameter
            names (`BIG_VISION_DECAY_MULTS` by default), or a function from
            a Keras variable to its multiplier. Variables with no big_vision
            name (LoRA adapters) match no pattern and never decay.
        global_clipnorm: float or None, `config.grad_clip_norm`.
        beta_1: float, Adam's b1 (0.9).
        beta_2: float, Adam's b2 (0.999, the PaliGemma configs').
        epsilon: float, optax's eps (1e-8).
        epsilon_root: float, optax's eps_root (0).
        gradient_accumulation_steps: int or None; updates then happen every
            that many steps, with the mean gradient, and the schedule counts
            updates.
        name: str.
    """

    def __init__(
        self,
        total_steps,
        learning_rate=3e-5,
        warmup_fraction=0.05,
        weight_decay=0.0,
        weight_decay_mults=BIG_VISION_DECAY_MULTS,
        global_clipnorm=1.0,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        epsilon_root=0.0,
        gradient_accumulation_steps=None,
        name="big_vision_adam",
        **kwargs,
    ):
        for unsupported in ("clipnorm", "clipvalue", "weight_decay_decouple"):
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(
                    f"BigVisionAdam takes no {unsupported}: big_vision clips by global norm."
                )
        schedule = big_vision_schedule(total_steps, learning_rate, warmup_fraction)
        super().__init__(
            learning_rate=schedule,
            name=name,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.peak_learning_rate = float(learning_rate)
        self.warmup_fraction = float(warmup_fraction)
        self.bv_weight_decay = float(weight_decay or 0.0)
        self.weight_decay_mults = (
            weight_decay_mults
            if callable(weight_decay_mults)
            else tuple((str(p), float(m)) for p, m in weight_decay_mults)
        )
        self.bv_global_clipnorm = global_clipnorm
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.epsilon_root = epsilon_root

    def decay_multiplier(self, variable):
        """The weight-decay multiplier of `variable` (0: not decayed)."""
        if callable(self.weight_decay_mults):
            return float(self.weight_decay_mults(variable))
        name = big_vision_name(variable.path)
        if name is None:
            return 0.0
        for pattern, mult in self.weight_decay_mults:
            if re.fullmatch(pattern, name):
                return mult
        return 0.0

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Keras Adam's slot names, so that training states saved with the
        # earlier Adam-based recipe still restore.
        self._mu, self._nu = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        self._decay = {v.path: self.decay_multiplier(v) for v in var_list}

    def _clip_gradients(self, grads):
        # optax.clip_by_global_norm: kept below the norm, else g / |g| * norm.
        # Keras calls this once per update, after any accumulation.
        if not self.bv_global_clipnorm:
            return grads
        present = [g for g in grads if g is not None]
        norm = ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in present))
        limit = float(self.bv_global_clipnorm)
        return [
            None
            if g is None
            else ops.where(norm < limit, g, g / ops.cast(norm, g.dtype) * ops.cast(limit, g.dtype))
            for g in grads
        ]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        # Updates so far (on JAX, Keras restores `iterations` with the other
        # optimizer variables on accumulating steps, so it counts updates).
        count = self.iterations
        t = ops.cast(count + 1, dtype)
        mu = self._mu[self._get_variable_index(variable)]
        nu = self._nu[self._get_variable_index(variable)]
        self.assign(mu, (1.0 - self.beta_1) * gradient + self.beta_1 * mu)
        self.assign(nu, (1.0 - self.beta_2) * ops.square(gradient) + self.beta_2 * nu)
        mu_hat = mu / (1.0 - ops.power(ops.cast(self.beta_1, dtype), t))
        nu_hat = nu / (1.0 - ops.power(ops.cast(self.beta_2, dtype), t))
        update = mu_hat / (ops.sqrt(nu_hat + self.epsilon_root) + self.epsilon)
        update = update * ops.cast(self.peak_learning_rate, dtype)
        mult = self._decay.get(variable.path, 0.0)
        if self.bv_weight_decay and mult:
            update = update + ops.cast(self.bv_weight_decay * mult, dtype) * variable
        update = update * ops.cast(self.schedule.multiplier(count), dtype)
        self.assign_sub(variable, update)

    def get_config(self):
        config = super().get_config()
        config.pop("learning_rate", None)
        if callable(self.weight_decay_mults):
            raise ValueError(
                "A BigVisionAdam with a function for weight_decay_mults cannot be serialised."
            )
        config.update(
            total_steps=self.total_steps,
            learning_rate=self.peak_learning_rate,
            warmup_fraction=self.warmup_fraction,
            weight_decay=self.bv_weight_decay,
            weight_decay_mults=[list(m) for m in self.weight_decay_mults],
            global_clipnorm=self.bv_global_clipnorm,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            epsilon_root=self.epsilon_root,
        )
        return config


def big_vision_optimizer(total_steps, **kwargs):
    """big_vision's PaliGemma transfer recipe: a `BigVisionAdam`, whose
    defaults are its transfer configs' (`optax_name="scale_by_adam"`, b2
    0.999, `grad_clip_norm=1.0`, cosine schedule with `warmup_percent`,
    `wd` decoupled and scaled by the schedule). Keyword arguments as
    `BigVisionAdam` (`learning_rate`, `warmup_fraction`, `weight_decay`,
    `weight_decay_mults`, `gradient_accumulation_steps`, ...).
    """
    return BigVisionAdam(total_steps, **kwargs)


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
        raise ValueError(
            f"The dataset's elements lack {missing}; give images, prompts and responses."
        )

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
    return [
        v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()
    ]


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
