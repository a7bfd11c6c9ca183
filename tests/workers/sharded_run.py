"""One process of a sharded run on a ("batch", "model") = (2, 4) mesh of 8 devices
(tests/test_multiprocess.py runs it as 1 process of 8 simulated CPU devices, and as
2 processes of 4 under jax.distributed on localhost).

    python tests/workers/sharded_run.py PORT PROCESS_ID NUM_PROCESSES OUT_DIR

Loads the bv_tiny checkpoint sharded (FSDP), decodes greedily, takes two SGD steps
through `fit` with a TrainingCheckpoint (Orbax, each process writing its shards) and
restores that checkpoint into a fresh sharded model; then fits a tiny model with a
tokenizer on raw examples (each process its share of each batch). Process 0 writes what it saw to
OUT_DIR/result.npz: tokens, losses, every variable after training and after restoring
(gathered from every process).
"""

import os
import pathlib
import sys

import jax

port, process_id, processes, out = sys.argv[1:5]
process_id, processes = int(process_id), int(processes)
if processes > 1:
    jax.distributed.initialize(f"localhost:{port}", processes, process_id)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: helpers

import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from keras_paligemma2 import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2 import distribution as dist  # noqa: E402
from keras_paligemma2.training.callbacks import TrainingCheckpoint  # noqa: E402
from keras_paligemma2.training.data import RawBatches  # noqa: E402

CHECKPOINT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "bv_tiny" / "tiny_f32.npz"
BATCH, LENGTH = 8, 6


def host(value):
    value = value.value if hasattr(value, "value") else value
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def raw_examples_fit():
    """`fit` on raw examples (a tokenizer's model): every process passes all of them, and
    `RawBatches` makes each process's share of every batch."""
    from helpers import WORDS
    from helpers import tiny_config
    from helpers import tiny_lm
    from helpers import tiny_tokenizer

    overrides = dict(vit_num_layers=1, num_layers=1)
    vocabulary = tiny_tokenizer(WORDS).vocabulary_size()
    config = tiny_config(vocabulary_size=vocabulary, **overrides)
    keras.distribution.set_distribution(dist.model_parallel(config, (2, 4), fsdp=True))
    keras.utils.set_random_seed(0)  # initial values (then replaced) must agree across processes
    lm = tiny_lm(seed=2, scale=0.2, **overrides)
    lm.compile(optimizer=keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(1)
    data = {
        "images": rng.integers(0, 256, (8, 28, 28, 3)).astype("uint8"),
        "prompts": ["caption en", "answer en what colour", "how many", "detect cat"] * 2,
        "responses": ["a red circle", "green", "two", "cat"] * 2,
    }
    history = lm.fit(data, batch_size=4, epochs=1, shuffle=False, verbose=0)
    assert keras.distribution.distribution().auto_shard_dataset  # left as it was
    # What each process made of the first batch, every process's share side by side.
    x, _, _ = RawBatches(lm.preprocessor, data, batch_size=4, shuffle=False)[0]
    first = multihost_utils.process_allgather(x["token_ids"])
    first = first.reshape(-1, first.shape[-1])
    return np.asarray(history.history["loss"]), first, {v.path: host(v) for v in lm.variables}


def main():
    assert len(jax.devices()) == 8, jax.devices()
    config = PaliGemma2Backbone.from_preset(CHECKPOINT, load_weights=False).get_config()
    config = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}
    distribution = dist.model_parallel(config, (2, 4), fsdp=True)
    distribution.auto_shard_dataset = False  # each process passes its own rows to fit
    keras.distribution.set_distribution(distribution)
    lm = PaliGemma2CausalLM.from_preset(CHECKPOINT)
    vocabulary = lm.backbone.vocabulary_size
    rng = np.random.default_rng(0)  # the same global batch in every process
    size = lm.backbone.image_size
    images = rng.uniform(-1, 1, (BATCH, size, size, 3)).astype("float32")
    token_ids = rng.integers(3, vocabulary, (BATCH, LENGTH)).astype("int32")
    response = np.zeros((BATCH, LENGTH), "int32")
    response[:, 3:] = 1
    labels = rng.integers(0, vocabulary, (BATCH, LENGTH)).astype("int32")
    greedy = lm.generate(
        {"images": images, "token_ids": token_ids, "padding_mask": np.ones_like(token_ids)},
        max_new_tokens=5,
        stop_token_ids=None,
        strip_prompt=True,
    )["token_ids"]
    # fit takes each process's own rows of each global batch (Keras' distribute_data_input):
    # step s's global batch is rows 4s..4s+3, of which process p holds its share.
    share = BATCH // 2 // processes
    rows = np.concatenate(
        [
            np.arange(4 * step + share * process_id, 4 * step + share * (process_id + 1))
            for step in (0, 1)
        ]
    )
    x = {
        "images": images[rows],
        "token_ids": token_ids[rows],
        "padding_mask": np.ones_like(token_ids[rows]),
        "response_mask": response[rows],
    }
    initial_gate = host(lm.backbone.decoder_blocks[0].mlp.gate.kernel)
    lm.compile(optimizer=keras.optimizers.SGD(0.1))
    history = lm.fit(
        x,
        labels[rows],
        sample_weight=response[rows].astype("float32"),
        batch_size=share,  # two steps of a global batch of 4
        shuffle=False,
        epochs=1,
        verbose=0,
        callbacks=[TrainingCheckpoint(os.path.join(out, "checkpoint"))],
    )
    trained = {v.path: host(v) for v in lm.variables}
    fresh = PaliGemma2CausalLM.from_preset(CHECKPOINT)
    fresh.compile(optimizer=keras.optimizers.SGD(0.1))
    restored = TrainingCheckpoint(os.path.join(out, "checkpoint"))
    restored.set_model(fresh)
    restored.on_train_begin()
    sharded = fresh.backbone.decoder_blocks[0].mlp.gate.kernel.value
    after = {v.path: host(v) for v in fresh.variables}
    raw_losses, raw_first_batch, raw_trained = raw_examples_fit()
    if process_id == 0:
        np.savez(
            os.path.join(out, "result.npz"),
            greedy=greedy,
            initial_gate=initial_gate,
            losses=np.asarray(history.history["loss"]),
            addressable=len(sharded.addressable_shards),
            **{"trained/" + k: v for k, v in trained.items()},
            **{"restored/" + k: v for k, v in after.items()},
            raw_losses=raw_losses,
            raw_first_batch=raw_first_batch,
            **{"raw/" + k: v for k, v in raw_trained.items()},
        )


main()
