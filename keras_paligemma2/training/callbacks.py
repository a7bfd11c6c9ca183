"""Callbacks `fit` uses: resumable checkpoints, non-finite loss, epoch order."""

import math
import os

import jax
import keras

from keras_paligemma2.training import lora
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.keras_internals import set_initial_epoch


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the training state through Orbax every `every_n_steps` batches
    and at each epoch end; `fit` resumes from the newest.

    Each checkpoint is a step directory of `directory` (named by the number
    of batches trained) holding the state (every model variable, LoRA ones
    included, and the optimizer's, by variable path; with a sharded model
    each process writes only its own shards) and the progress (epoch, batch
    within it, what trains). Orbax writes into a temporary directory renamed
    into place when every process is done, so a crash mid-save never leaves a
    checkpoint that restores wrong: the previous one is used. The newest
    `keep` are kept. A step whose loss is not finite is never saved.

    When `fit` starts and a checkpoint exists, the state is restored into the
    model's own layouts and training goes on from the saved position: with
    raw examples (`RawBatches`, whose batches depend only on the epoch
    number) from the very next batch, mid-epoch included, so the finished run
    has the same weights as an uninterrupted one. Other data resumes only
    from epoch ends (a mid-epoch checkpoint is then refused: the data
    position is unknown).

    What trains is part of the state: the LoRA adapters (unmerged, with
    their rank and alpha), quantised layers and trainable flags are recorded
    in the progress. A fresh model gets them from `restore_setup(model)`
    before `compile`; `fit` refuses a model set up differently from the
    checkpoint (it would resume a different training). Adapters alone still
    export with `save_lora_weights(path.safetensors)`.

    Args:
        directory: str or path-like, where the step directories are kept (created at the
            first save; shared storage when several processes train).
        every_n_steps: None (default: epoch ends only) or int, also save after every that
            many batches.
        keep: int, how many of the newest checkpoints to keep (default 2).
        async_save: bool (default True): writing happens in the background while training
            goes on; the next save, the end of `fit` and a restore wait for it.
    """

    def __init__(self, directory, every_n_steps=None, keep=2, async_save=True):
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise InputError(f"every_n_steps must be None or >= 1; got {every_n_steps}.")
        if int(keep) < 1:
            raise InputError(f"keep must be at least 1; got {keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.keep = int(keep)
        self.async_save = bool(async_save)
        self._manager = None
        self._epoch = 0
        self._batches = 0  # batches trained in all, the step directories' number
        self._synced_step = None  # the checkpoint the model's variables hold
        self.start = 0  # batches of the current epoch done before this fit call (a resume)

    def _checkpoints(self, create=False):
        if self._manager is None:
            if not create and not os.path.isdir(self.directory):
                return None
            import orbax.checkpoint as ocp

            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=self.keep,
                    enable_async_checkpointing=self.async_save,
                    create=True,
                ),
            )
        return self._manager

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

    def progress(self):
        """The newest checkpoint's progress: a dict with `epoch` (epochs finished), `step`
        (batches of the next epoch finished), `batches` (in all) and `training_setup`;
        None without a checkpoint."""
        manager = self._checkpoints()
        step = None if manager is None else manager.latest_step()
        if step is None:
            return None
        import orbax.checkpoint as ocp

        restored = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
        return dict(restored["progress"])

    def completed_epochs(self):
        """Epochs the newest checkpoint has finished (0 without a checkpoint)."""
        progress = self.progress()
        return 0 if progress is None else int(progress["epoch"])

    def restore_setup(self, model):
        """Gives a freshly built model the adapters, quantisation and
        trainable flags the checkpoint was trained with (call before
        `compile`); a no-op without a checkpoint or for a model already set
        up so.

        Args:
            model: the `PaliGemma2CausalLM` (or backbone) to resume.
        """
        progress = self.progress()
        backbone = getattr(model, "backbone", model)
        if progress is None or lora.training_setup(backbone) == progress["training_setup"]:
            return
        lora.apply_training_setup(backbone, progress["training_setup"])

    def _check_setup(self, setup):
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

    def on_train_begin(self, logs=None):
        """Restores the newest checkpoint, if any (unless the model holds it already), and
        sets `fit`'s initial epoch.

        Args:
            logs: dict or None, from Keras (unused).
        """
        progress = self.progress()
        if progress is None:
            return
        self._check_setup(progress["training_setup"])
        step = self._checkpoints().latest_step()
        if step != self._synced_step:
            import orbax.checkpoint as ocp

            variables = self._variables()
            target = {
                key: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_sharding(v))
                for key, v in variables.items()
            }
            restored = self._checkpoints().restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                    )
                ),
            )["state"]
            saved, have = set(restored), set(variables)
            if saved != have:
                raise InputError(
                    f"The checkpoint in {self.directory} (step {step}) holds other variables "
                    f"than this model: missing {sorted(have - saved)[:5]}, unexpected "
                    f"{sorted(saved - have)[:5]}."
                )
            for key, variable in variables.items():
                variable.assign(restored[key])
            self._synced_step = step
            where = f"epoch {progress['epoch']}" + (
                f", step {progress['step']}" if progress["step"] else ""
            )
            print(f"Resumed from {self.directory} after {where}.")
        self._batches = int(progress["batches"])
        set_initial_epoch(self.model, int(progress["epoch"]))

    def on_epoch_begin(self, epoch, logs=None):
        """Remembers the epoch.

        Args:
            epoch: int, the epoch starting (0-based).
            logs: dict or None, from Keras (unused).
        """
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        """Counts the batch; every `every_n_steps` batches, saves (loss finite).

        Args:
            batch: int, the step just finished within this `fit` call's epoch.
            logs: dict of the step's metrics, from Keras (`loss` is checked).
        """
        self._batches += 1
        last = batch + 1 == (self.params or {}).get("steps")  # the epoch end saves it
        if self.every_n_steps and self._batches % self.every_n_steps == 0 and not last:
            self._save(logs, self._epoch, self.start + batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        """Saves at the epoch end unless the epoch's loss is not finite.

        Args:
            epoch: int, the epoch just finished (0-based).
            logs: dict of the epoch's metrics, from Keras (`loss` is checked).
        """
        self._save(logs, epoch + 1, 0)

    def on_train_end(self, logs=None):
        """Waits for a save still being written.

        Args:
            logs: dict or None, from Keras (unused).
        """
        self.wait()

    def wait(self):
        """Returns once a save being written in the background is complete."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def _save(self, logs, epoch, step):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            return
        manager = self._checkpoints(create=True)
        if manager.latest_step() == self._batches:
            return  # saved already (an epoch of no batches)
        import orbax.checkpoint as ocp

        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()  # the variables hold the last step's values
        state = {key: v.value for key, v in self._variables().items()}
        setup = lora.training_setup(getattr(self.model, "backbone", self.model))
        progress = {
            "epoch": epoch,
            "step": step,
            "batches": self._batches,
            "training_setup": setup,
        }
        manager.save(
            self._batches,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), progress=ocp.args.JsonSave(progress)
            ),
        )
        self._synced_step = self._batches


def _sharding(variable):
    value = variable.value
    return getattr(value, "sharding", None)


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
