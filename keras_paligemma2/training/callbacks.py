"""Callbacks `fit` uses: resumable checkpoints, non-finite loss, epoch order."""

import json
import math
import os

import keras

from keras_paligemma2.training import lora
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.files import atomic_file
from keras_paligemma2.utils.keras_internals import set_initial_epoch
from keras_paligemma2.utils.tensor_files import read_state
from keras_paligemma2.utils.tensor_files import write_state


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

    What trains is part of the state: the LoRA adapters (unmerged, with
    their rank and alpha), quantised layers and trainable flags are recorded
    in `progress.json`. A fresh model gets them from `restore_setup(model)`
    before `compile`; `fit` refuses a model set up differently from the
    checkpoint (it would resume a different training).

    Args:
        directory: str or path-like, where `state.safetensors` and
            `progress.json` are kept (created at the first save).
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

    def _setup(self):
        if not os.path.exists(self.progress_path):
            return None
        with open(self.progress_path) as f:
            return json.load(f).get("training_setup")

    def restore_setup(self, model):
        """Gives a freshly built model the adapters, quantisation and
        trainable flags the checkpoint was trained with (call before
        `compile`); a no-op without a checkpoint or for a model already set
        up so.

        Args:
            model: the `PaliGemma2CausalLM` (or backbone) to resume.
        """
        setup = self._setup()
        backbone = getattr(model, "backbone", model)
        if setup is None or lora.training_setup(backbone) == setup:
            return
        lora.apply_training_setup(backbone, setup)

    def _check_setup(self):
        setup = self._setup()
        if setup is None:
            return
        have = lora.training_setup(getattr(self.model, "backbone", self.model))
        differ = [key for key in setup if have.get(key) != setup[key]]
        if differ:
            raise InputError(
                f"The checkpoint in {self.directory} was trained with other "
                f"{', '.join(differ)} than this model has (adapters: "
                f"{_count(setup['lora_adapters'])} saved, {_count(have['lora_adapters'])} here; "
                f"quantised layers: {_count(setup['quantized_layers'])} saved, "
                f"{_count(have['quantized_layers'])} here). Call "
                "TrainingCheckpoint(directory).restore_setup(model) on the freshly built "
                "model before compile() to resume it."
            )

    def completed_epochs(self):
        """Epochs the saved state has finished (0 without a checkpoint)."""
        if not os.path.exists(self.progress_path):
            return 0
        with open(self.progress_path) as f:
            return int(json.load(f)["epoch"])

    def on_train_begin(self, logs=None):
        """Restores the saved state, if any, and sets `fit`'s initial epoch.

        Args:
            logs: dict or None, from Keras (unused).
        """
        epoch = self.completed_epochs()
        if not epoch:
            return
        self._check_setup()
        read_state(self.state_path, self._variables())
        set_initial_epoch(self.model, epoch)
        print(f"Resumed from {self.directory} after epoch {epoch}.")

    def on_epoch_end(self, epoch, logs=None):
        """Saves the state unless the epoch's loss is not finite.

        Args:
            epoch: int, the epoch just finished (0-based).
            logs: dict of the epoch's metrics, from Keras (`loss` is checked).
        """
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            return
        os.makedirs(self.directory, exist_ok=True)
        write_state(self.state_path, self._variables())
        with atomic_file(self.progress_path, "w") as f:
            setup = lora.training_setup(getattr(self.model, "backbone", self.model))
            json.dump({"epoch": epoch + 1, "training_setup": setup}, f)


def _count(entries):
    return len(entries or ())


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` with an error naming the epoch and step where the loss
    stopped being finite (no checkpoint is written for that epoch)."""

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        """Remembers the epoch, for the error message.

        Args:
            epoch: int, the epoch starting (0-based).
            logs: dict or None, from Keras (unused).
        """
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        """Raises a FloatingPointError if the loss is NaN or infinite.

        Args:
            batch: int, the step just finished within the epoch (0-based).
            logs: dict of the step's metrics, from Keras (`loss` is checked).
        """
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
    """Tells a `RawBatches` which epoch is starting (its shuffle order).

    Args:
        batches: the `RawBatches` whose `epoch` to set.
    """

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        """Sets `batches.epoch`.

        Args:
            epoch: int, the epoch starting (0-based).
            logs: dict or None, from Keras (unused).
        """
        self.batches.epoch = epoch
