"""A small fine-tune with a TrainingCheckpoint every batch; run as a script it is
killed (SIGKILL) at the moment Orbax commits step KILL_AT: everything written, the
step directory not yet renamed into place (tests/test_training.py imports `train`).

    python tests/workers/crash_mid_save.py DIRECTORY KILL_AT
"""

import os
import re
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from helpers import tiny_lm  # noqa: E402

from keras_paligemma2.training.callbacks import TrainingCheckpoint  # noqa: E402


def train(directory=None):
    """Three epochs of 3 batches; returns the trained variables by path."""
    keras.utils.set_random_seed(3)
    lm = tiny_lm(seed=4, scale=0.2, vit_num_layers=1, num_layers=1)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(0)
    data = {
        "images": rng.integers(0, 256, (12, 28, 28, 3)).astype("uint8"),
        "prompts": ["caption en"] * 12,
        "responses": ["a red circle", "a blue square", "green", "two"] * 3,
    }
    callbacks = [] if directory is None else [TrainingCheckpoint(directory, every_n_steps=1)]
    lm.fit(data, batch_size=4, epochs=3, seed=5, verbose=0, callbacks=callbacks)
    return {v.path: np.asarray(v.value) for v in lm.variables}


if __name__ == "__main__":
    directory, kill_at = sys.argv[1], int(sys.argv[2])
    rename = os.rename

    def rename_or_die(src, dst, *args, **kwargs):
        if re.fullmatch(rf"{kill_at}\.orbax-checkpoint-tmp.*", os.path.basename(os.fspath(src))):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)

    os.rename = rename_or_die
    train(directory)
