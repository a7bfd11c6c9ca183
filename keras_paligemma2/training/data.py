"""Raw examples to preprocessed batches for `fit`, in a resumable order."""

import inspect
import io
import math
import os

import jax
import keras
import numpy as np
import PIL.Image

from keras_paligemma2.preprocessing.preprocessor import PaliGemma2CausalLMPreprocessor
from keras_paligemma2.utils.errors import InputError


class RawBatches(keras.utils.PyDataset):
    """Raw examples, batched and preprocessed on the fly.

    `examples`: a dict with `images` (array or list, one per example),
    `prompts` and `responses` (lists of strings). Each epoch visits the
    examples in an order drawn from `seed` and the epoch number alone (set
    by the `EpochOrder` callback that `fit` adds), so batch `i` of epoch `e`
    is the same in every run, a resumed one included. Under `jax.distributed`
    every process holds the same examples and makes its own share of each
    (global) batch. The last incomplete batch is dropped when shuffling.
    Batches are made in order, in the training thread (`workers=1`), so none
    is made before its epoch is set.

    Args:
        preprocessor: the task's preprocessor, turning a raw batch into
            `(x, y, sample_weight)`.
        examples: dict of `images`, `prompts` and `responses`, one entry per
            example (a ValueError if lengths differ, keys lack or it is empty).
        batch_size: int, examples per (global) batch (default 32; None also
            gives 32), a multiple of the number of processes.
        shuffle: bool (default True); False keeps the given order and the
            last, smaller batch.
        seed: int (default 0), with the epoch number, the shuffle order.
    """

    def __init__(self, preprocessor, examples, batch_size=32, shuffle=True, seed=0):
        super().__init__()
        if not isinstance(examples, dict):
            raise InputError(f"Pass a dict of examples; got {type(examples).__name__}.")
        missing = [k for k in ("images", "prompts", "responses") if k not in examples]
        if missing:
            raise InputError(
                f"Training examples lack {missing}; pass images, prompts and responses."
            )
        lengths = {k: len(examples[k]) for k in ("images", "prompts", "responses")}
        if len(set(lengths.values())) != 1:
            raise InputError(
                f"images, prompts and responses must have one entry per example; got {lengths}."
            )
        self.preprocessor = preprocessor
        self.examples = examples
        self.count = lengths["prompts"]
        if self.count == 0:
            raise InputError("No training examples given.")
        self.batch_size = int(batch_size or 32)
        if self.batch_size % jax.process_count():
            raise InputError(
                f"batch_size {self.batch_size} must divide by the number of processes "
                f"({jax.process_count()}): each makes an equal share of every batch."
            )
        last = self.count % self.batch_size
        if not shuffle and last % jax.process_count():
            raise InputError(
                f"The last batch ({last} of {self.count} examples) does not divide among "
                f"{jax.process_count()} processes; drop or add examples, or shuffle "
                "(which drops the last incomplete batch)."
            )
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0  # batches of the epoch to skip (a resumed epoch)

    def epoch_length(self):
        """Batches in a whole epoch."""
        if self.shuffle:
            return max(self.count // self.batch_size, 1)
        return math.ceil(self.count / self.batch_size)

    def __len__(self):
        return self.epoch_length() - self.start

    def order(self, epoch):
        """The example order of `epoch` (computed once per epoch).

        Args:
            epoch: int, the epoch (0-based).

        Returns:
            int array (count,), the example indices in visiting order.
        """
        if getattr(self, "_order", (None,))[0] != epoch:
            rows = np.arange(self.count)
            if self.shuffle:
                rows = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            self._order = (epoch, rows)
        return self._order[1]

    def __getitem__(self, index):
        index += self.start
        rows = self.order(self.epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        processes = jax.process_count()
        if processes > 1:
            # Each process makes its own share of the global batch (what Keras'
            # multi-process `fit` takes from each).
            share = len(rows) // processes
            rows = rows[jax.process_index() * share : (jax.process_index() + 1) * share]
        batch = {k: _take(self.examples[k], rows) for k in ("images", "prompts", "responses")}
        try:
            return _preprocess(self.preprocessor, batch)
        except ValueError as error:
            # The preprocessor counts within the batch; name the examples.
            raise InputError(
                f"Batch {index} (examples {rows.tolist()} of the data set): {error}"
            ) from error


def preprocessed_dataset(data, preprocessor, image_rank=4):
    """A `tf.data.Dataset` or generator of raw batches, preprocessed.

    Batches that are already `(x, y, sample_weight)` pass through. In a
    `tf.data` pipeline the preprocessor (NumPy and SentencePiece) runs as a
    `tf.numpy_function`; strings arrive as bytes and are decoded as UTF-8.

    Args:
        data: a `tf.data.Dataset` or a generator yielding dicts of `images`,
            `prompts` and `responses` (one batch each), or `(x, y,
            sample_weight)` batches.
        preprocessor: the task's preprocessor, or None (then raw batches are a
            ValueError).
        image_rank: int, the rank of the preprocessed `images` (4: (B, S, S, 3);
            5 with several images per example).

    Returns:
        A dataset, or a generator, of `(x, y, sample_weight)` batches.
    """
    if inspect.isgenerator(data):
        return (_preprocess_raw(preprocessor, batch) for batch in data)
    import tensorflow as tf

    spec = data.element_spec
    if not (isinstance(spec, dict) and "prompts" in spec):
        return data
    if preprocessor is None:
        raise InputError("Raw examples need a preprocessor; this model has none.")
    keys = ("images", "prompts", "responses")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise InputError(
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
        raise InputError("Raw examples need a preprocessor; this model has none.")
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

        try:
            return PIL.Image.open(io.BytesIO(value))
        except (OSError, ValueError) as error:
            raise InputError(
                f"An image given as {len(value)} bytes is neither an existing file "
                f"path nor a decodable image ({error})."
            ) from error
    return value


def _take(values, rows):
    if isinstance(values, np.ndarray):
        return values[rows]
    return [values[i] for i in rows]
