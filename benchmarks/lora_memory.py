"""LoRA step memory, unmerged (ours) against Keras' merged formulation.

Compiles one LoRA training step (gradients of the response cross-entropy
with respect to the adapters) of a `pg2_3b_224`-shaped backbone cut to
`--layers` decoder layers and one ViT layer (float32 by default: XLA:CPU
upcasts bfloat16 matmuls, adding float32 copies of every kernel to both
formulations), and prints XLA's
memory analysis for two formulations of the same adapters: ours
(`x @ W + (x @ A) @ B`) and Keras' own (`x @ (W + A @ B)`, its `kernel`
property), put back for the second run. Nothing runs: the step is only
compiled. XLA:CPU keeps more temporaries than XLA:GPU/TPU, so compare the
two rows with each other, not with an accelerator's peak.

    python -m benchmarks.lora_memory --layers 2 --batch 8
"""

import argparse
import math
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from keras_paligemma2 import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.checkpoints import presets  # noqa: E402
from keras_paligemma2.layers import projections  # noqa: E402
from keras_paligemma2.training import lora  # noqa: E402

GIB = 2**30


def step_memory(layers, batch, text, rank, dtype):
    config = {**presets.preset_config("pg2_3b_224"), "num_layers": layers, "vit_num_layers": 1}
    backbone = PaliGemma2Backbone(**config, dtype=dtype)
    lora.enable_lora(backbone, rank, targets=("attention", "mlp"))  # decoder only
    lm = PaliGemma2CausalLM(backbone)  # text logits (B, T, V), as fit computes them
    trainable = [v.value for v in lm.trainable_variables]
    # Abstract: the frozen weights are arguments, not constants folded into the program.
    frozen = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in lm.non_trainable_variables]
    inputs = {
        "images": jax.ShapeDtypeStruct((batch, 224, 224, 3), "float32"),
        "token_ids": jax.ShapeDtypeStruct((batch, text), "int32"),
        "padding_mask": jax.ShapeDtypeStruct((batch, text), "int32"),
        "response_mask": jax.ShapeDtypeStruct((batch, text), "int32"),
    }

    def loss(trainable, frozen, inputs):
        logits, _ = lm.stateless_call(trainable, frozen, inputs)
        logits = logits.astype("float32")
        labels = inputs["token_ids"]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
        return (nll * inputs["response_mask"]).sum()

    compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, inputs).compile()
    analysis = compiled.memory_analysis()
    # What the backward pass keeps: residuals that are not the step's arguments.
    residuals = saved_residuals(loss, trainable, frozen, inputs)
    kept = sum(
        math.prod(aval.shape) * aval.dtype.itemsize
        for aval, source in residuals
        if not source.startswith("from the argument")
    )
    return analysis.temp_size_in_bytes, analysis.argument_size_in_bytes, kept


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    args = parser.parse_args()
    rows = {
        "ours (unmerged)": step_memory(args.layers, args.batch, args.text, args.rank, args.dtype)
    }
    ours_calls = projections.Dense.call, projections.EinsumDense.call
    projections.Dense.call = keras.layers.Dense.call
    projections.EinsumDense.call = keras.layers.EinsumDense.call
    try:
        rows["Keras merged"] = step_memory(
            args.layers, args.batch, args.text, args.rank, args.dtype
        )
    finally:
        projections.Dense.call, projections.EinsumDense.call = ours_calls
    print(
        f"pg2_3b_224 shapes, {args.layers} decoder layers + 1 ViT layer, {args.dtype}, batch "
        f"{args.batch}, {args.text} text tokens, LoRA rank {args.rank} on attention + MLP"
    )
    for name, (temp, arguments, kept) in rows.items():
        print(
            f"{name:18s} XLA temp {temp / GIB:7.3f} GiB   arguments {arguments / GIB:7.3f} GiB   "
            f"kept for the backward pass {kept / GIB:7.3f} GiB"
        )
    for index, what in ((0, "XLA temp"), (2, "kept for the backward pass")):
        more = rows["ours (unmerged)"][index] - rows["Keras merged"][index]
        print(
            f"{what}, ours minus Keras': {more / 2**20:+.1f} MiB "
            f"({more / args.layers / 2**20:+.1f} per decoder layer)"
        )


if __name__ == "__main__":
    main()
