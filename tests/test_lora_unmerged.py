"""LoRA as `x @ W + (x @ A) @ B`: the numbers of Keras' own merged
formulation `x @ (W + A @ B)`, without forming the merged kernel."""

import jax
import keras
import numpy as np
import pytest
from helpers import assert_close

from keras_paligemma2.layers import projections

# (our class, Keras' class, constructor arguments, input shape): the
# decoder's query and output projections and an MLP projection.
CASES = {
    "query": (
        projections.EinsumDense,
        keras.layers.EinsumDense,
        dict(equation="btd,ndh->btnh", output_shape=(None, 4, 16)),
        (2, 5, 32),
    ),
    "output": (
        projections.EinsumDense,
        keras.layers.EinsumDense,
        dict(equation="btnh,nhd->btd", output_shape=(None, 32)),
        (2, 5, 4, 16),
    ),
    "vit_query": (
        projections.EinsumDense,
        keras.layers.EinsumDense,
        dict(equation="btw,wnh->btnh", output_shape=(None, 4, 16), bias_axes="nh"),
        (2, 5, 32),
    ),
    "mlp": (projections.Dense, keras.layers.Dense, dict(units=48, use_bias=False), (2, 5, 32)),
}


def _pair(case, rank=4, alpha=8.0, seed=0):
    ours_cls, keras_cls, kwargs, shape = CASES[case]
    rng = np.random.default_rng(seed)
    layers = []
    for cls in (ours_cls, keras_cls):
        layer = cls(**kwargs)
        layer.build(shape)
        layer.enable_lora(rank, lora_alpha=alpha)
        layers.append(layer)
    for ours, theirs in zip(*(layer.weights for layer in layers)):
        value = rng.normal(size=ours.shape).astype("float32")
        ours.assign(value)
        theirs.assign(value)
    return layers, rng.normal(size=shape).astype("float32")


def _loss_and_grads(layer, x):
    trainable = [v.value for v in layer.trainable_variables]
    frozen = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        y, _ = layer.stateless_call(trainable, frozen, x)
        return (y**2).sum() / 2, y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(trainable, x)
    return y, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_keras_merged_formulation(case):
    (ours, theirs), x = _pair(case)
    y_ours, (g_ours, gx_ours) = _loss_and_grads(ours, x)
    y_theirs, (g_theirs, gx_theirs) = _loss_and_grads(theirs, x)
    # Two float32 orders of the same sums over 32-64 terms of size ~1.
    assert_close(y_ours, y_theirs, ulps=64)
    assert_close(gx_ours, gx_theirs, ulps=256)
    for got, want in zip(g_ours, g_theirs):
        assert_close(got, want, ulps=256)


def test_step_holds_no_merged_kernel():
    # A wide projection and few tokens, as in LoRA fine-tuning: the merged
    # kernel (1024 x 1024 float32, 4 MiB) dominates Keras' step.
    memory = {}
    for name, cls in (("ours", projections.Dense), ("keras", keras.layers.Dense)):
        layer = cls(units=1024, use_bias=False)
        layer.build((8, 1024))
        layer.enable_lora(8)
        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x, layer=layer, frozen=frozen):
            y, _ = layer.stateless_call(trainable, frozen, x)
            return (y**2).sum()

        trainable = [v.value for v in layer.trainable_variables]
        x = jax.ShapeDtypeStruct((8, 1024), "float32")
        compiled = jax.jit(jax.grad(loss)).lower(trainable, x).compile()
        memory[name] = compiled.memory_analysis().temp_size_in_bytes
    kernel_bytes = 1024 * 1024 * 4
    assert memory["keras"] >= kernel_bytes  # the merged copy
    assert memory["ours"] < memory["keras"] - kernel_bytes // 2, memory
