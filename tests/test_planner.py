"""The memory planner against real shard sizes and XLA's own accounting."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

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
def test_activation_estimate_covers_xla_cpu(config, batch, length, mode):
    xla = _xla_training_temp_bytes(config, batch, length, lora=mode == "lora")
    planned = dist.plan(
        config, (1, 1), mode, batch, length, dtype="float32", lora_rank=4
    ).activations
    # XLA:CPU reuses buffers the saved-residual count of `plan` keeps apart
    # (measured: the plan 1.5-1.9x XLA:CPU's temporaries): XLA:CPU is not
    # the target (see benchmarks/RESULTS.md); the plan must not count less.
    assert planned >= 0.9 * xla, (planned, xla)


def _saved_residual_bytes(config, batch, length, mode, dtype, remat, chunk, quantization):
    """What JAX keeps for the backward pass of the task's training loss:
    saved residuals that are neither arguments nor the frozen weights."""
    lm = PaliGemma2CausalLM(PaliGemma2Backbone(**config, dtype=dtype))
    if quantization:
        lm.backbone.quantize(quantization, quantize_vision=False)
    if mode == "lora":
        lm.enable_lora(4)
    lm.compile(optimizer=keras.optimizers.SGD(0.1), remat=remat, loss_chunk_size=chunk)
    lm.optimizer.build(lm.trainable_variables)
    frozen = [v.value for v in lm.non_trainable_variables]
    optimizer = [v.value for v in lm.optimizer.variables]
    size = config["image_size"]
    x = {
        "images": jnp.zeros((batch, size, size, 3)),
        "token_ids": jnp.zeros((batch, length), "int32"),
        "padding_mask": jnp.ones((batch, length), "int32"),
        "response_mask": jnp.ones((batch, length), "int32"),
    }
    y, w = jnp.zeros((batch, length), "int32"), jnp.ones((batch, length))

    def loss(trainable):
        return lm.compute_loss_and_updates(
            trainable, frozen, [], x, y, w, training=True, optimizer_variables=optimizer
        )[0]

    trainable = [v.value for v in lm.trainable_variables]
    return sum(
        int(np.prod(aval.shape)) * aval.dtype.itemsize
        for aval, source in saved_residuals(loss, trainable)
        if not source.startswith(("from the argument", "from a constant"))
    )


@pytest.mark.parametrize(
    "mode, dtype, remat, chunk, quantization",
    [
        # One case per formula (the others measured by hand, 0.97-1.01).
        ("full", "float32", False, None, None),
        ("lora", "bfloat16", "matmuls", None, None),
        ("full", "bfloat16", "block", None, None),
        ("lora", "bfloat16", False, 16, "int8"),
        ("lora", "bfloat16", "block", 16, "int4"),
    ],
)
def test_saved_activations_within_15_percent_of_jax(mode, dtype, remat, chunk, quantization):
    # Measured on this config: 0.92-1.01 of JAX's count for every option.
    counted = _saved_residual_bytes(CONFIG, 4, 32, mode, dtype, remat, chunk, quantization)
    planned = dist.plan(
        CONFIG,
        (1, 1),
        mode,
        4,
        32,
        dtype=dtype,
        lora_rank=4,
        remat=remat,
        loss_chunk_size=chunk,
        quantization=quantization,
    ).saved_activations
    assert 0.85 * counted <= planned <= 1.15 * counted, (planned, counted)


def test_quantised_bases_count_keras_own_variables():
    # Parameter bytes of int8 / int4 bases: what Keras' quantize leaves.
    # One layer of each stack: the count is per layer (Keras' int4 quantize
    # is slow in eager mode).
    config = dict(CONFIG, num_layers=1, vit_num_layers=1)
    for mode in ("int8", "int4"):
        backbone = PaliGemma2Backbone(**config, dtype="bfloat16")
        backbone.quantize(mode, quantize_vision=False)
        placed = sum(v.value.nbytes for v in backbone.weights)
        planned = dist.plan(config, (1, 1), "inference", dtype="bfloat16", quantization=mode)
        assert planned.parameters == placed, (mode, planned.parameters, placed)
    with pytest.raises(ValueError, match="do not train"):
        dist.plan(CONFIG, mode="full", quantization="int4")


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
