"""The memory planner against real shard sizes and XLA's own accounting."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2 import distribution as dist
from keras_paligemma2.training.losses import ResponseCrossEntropy

CONFIG = dict(
    image_size=56,
    patch_size=14,
    vit_hidden_dim=64,
    vit_num_layers=2,
    vit_num_heads=4,
    vit_intermediate_dim=256,
    vocabulary_size=1000,
    num_layers=3,
    hidden_dim=128,
    num_query_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_dim=512,
)


@pytest.mark.parametrize(
    "mesh_shape, fsdp, dtype",
    [
        ((1, 8), False, "bfloat16"),
        ((2, 4), True, "float32"),
        ((4, 2), True, "bfloat16"),
        ((8, 1), False, "float32"),
    ],
)
def test_parameter_bytes_equal_the_shards_actually_placed(mesh_shape, fsdp, dtype):
    config = dict(CONFIG, vocabulary_size=1003)  # a vocabulary no axis divides
    distribution = dist.model_parallel(config, mesh_shape, fsdp=fsdp)
    with distribution.scope():
        backbone = PaliGemma2Backbone(**config, dtype=dtype)
    device = jax.devices()[0]
    placed = sum(
        shard.data.nbytes
        for v in backbone.weights
        for shard in v.value.addressable_shards
        if shard.device == device
    )
    planned = dist.plan(config, mesh_shape, "inference", dtype=dtype, fsdp=fsdp).parameters
    assert planned == placed


def _xla_training_temp_bytes(config, batch, length, lora):
    lm = PaliGemma2CausalLM(PaliGemma2Backbone(**config))
    if lora:
        lm.enable_lora(4)
    loss_fn = ResponseCrossEntropy()
    trainable = [v.value for v in lm.trainable_variables]
    frozen = [v.value for v in lm.non_trainable_variables]

    def loss(trainable, x, y, w):
        logits, _ = lm.stateless_call(trainable, frozen, x, training=True)
        return loss_fn(y, logits, sample_weight=w)

    size = config["image_size"]
    x = {
        "images": jnp.zeros((batch, size, size, 3)),
        "token_ids": jnp.zeros((batch, length), "int32"),
        "padding_mask": jnp.ones((batch, length), "int32"),
        "response_mask": jnp.ones((batch, length), "int32"),
    }
    y, w = jnp.zeros((batch, length), "int32"), jnp.ones((batch, length))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(trainable, x, y, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "config, batch, length, mode",
    [
        (CONFIG, 4, 32, "full"),
        (CONFIG, 4, 32, "lora"),
        (
            dict(
                CONFIG,
                num_layers=5,
                hidden_dim=96,
                intermediate_dim=384,
                num_query_heads=6,
                num_key_value_heads=3,
                head_dim=16,
                image_size=84,
            ),
            6,
            40,
            "full",
        ),
    ],
)
def test_activation_estimate_within_30_percent_of_xla(config, batch, length, mode):
    xla = _xla_training_temp_bytes(config, batch, length, lora=mode == "lora")
    planned = dist.plan(
        config, (1, 1), mode, batch, length, dtype="float32", lora_rank=4
    ).activations
    assert 0.7 * xla <= planned <= 1.3 * xla, (planned, xla)


def test_plan_splits_memory_the_expected_way():
    one = dist.plan("pg2_10b_224", (1, 1), "full", 8, 64)
    eight = dist.plan("pg2_10b_224", (1, 8), "full", 8, 64)
    assert one.gradients == one.parameters and one.optimizer_state == 2 * one.parameters
    assert 7.5 < one.parameters / eight.parameters <= 8  # norms stay replicated
    inference = dist.plan("pg2_10b_224", (1, 1), "inference", 1, 64)
    assert inference.parameters == 9_662_409_456 * 2  # every weight once, bfloat16
    assert inference.gradients == inference.optimizer_state == 0 and inference.kv_cache > 0
    lora = dist.plan("pg2_3b_224", (1, 1), "lora", 8, 64)
    assert lora.gradients < 0.02 * lora.parameters
    assert (
        dist.plan("pg2_3b_224", (1, 1), "full", 8, 64, remat=True).activations
        < dist.plan("pg2_3b_224", (1, 1), "full", 8, 64).activations
    )
    with pytest.raises(ValueError, match="mode must be"):
        dist.plan(CONFIG, mode="train")


def test_auto_distribution_picks_a_mesh_or_says_what_would_fit():
    devices = keras.distribution.list_devices()
    distribution, chosen = dist.auto_distribution(
        "pg2_10b_224", "inference", 8, device_memory=16 * 2**30, devices=devices
    )
    assert (
        chosen.total <= 0.9 * 16 * 2**30 and chosen.mesh_shape[1] > 1
    )  # 19 GB of weights cannot stay whole
    assert isinstance(distribution, keras.distribution.ModelParallel)
    with pytest.raises(
        ValueError,
        match=r"does not fit 8 device\(s\) of 16.0 GiB.*What could fit: \d+ such devices",
    ):
        dist.auto_distribution("pg2_28b_224", "full", 8, device_memory=16 * 2**30, devices=devices)
    small, chosen = dist.auto_distribution(
        CONFIG, "full", 8, device_memory=16 * 2**30, devices=devices
    )
    assert chosen.mesh_shape == (8, 1)  # fits data-parallel: no model axis needed
    assert np.isfinite(chosen.total)
