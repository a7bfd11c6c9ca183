"""What each fine-tuning / inference scenario of issue 17 keeps per device,
counted on the real architecture, beside the planner's figure.

    python -m benchmarks.fit_memory [--only 3b]

For each scenario (224 px unless named, 32 prompt + 32 response tokens, LoRA
rank 8 on the decoder's attention and MLP, Adam, `remat="block"` and
`loss_chunk_size=128` unless said) it reports, in GiB per device:

- variables and optimizer slots: exact, from the variables a model built
  with the scenario's config holds (nothing allocated: built in a
  `StatelessScope` without values), in Keras' quantised form for int8 /
  int4 bases (the planner's formula, itself checked exact against Keras'
  own quantised variables in `tests/test_planner.py`), divided over the
  mesh for FSDP;
- saved: what the step's backward pass keeps, JAX's own list
  (`jax._src.ad_checkpoint.saved_residuals` of the training loss, every
  weight an argument, so only activations count), traced on abstract
  arrays at full width with 2 and 4 decoder layers and 1 and 2 ViT layers
  and extrapolated linearly to the real depths (a block's residuals do not
  depend on its depth);
- transient: the largest working set on top of that, counted the same way
  for the largest piece the backward pass recomputes at once: one decoder
  block without remat (what its recompute materialises) or one chunk of
  the vocabulary loss;
- their sum beside `distribution.plan`'s total, and the ratio.

Quantised bases change the variables, not what a remat block keeps (its
input alone), so their saved bytes are traced on the bfloat16 base. XLA's
own CPU peak is not printed: XLA:CPU upcasts bfloat16 matmuls and keeps far
more temporaries than XLA:GPU/TPU (issue 17), so it says nothing about a
16 GB chip. keras-hub's own PaliGemma with its own LoRA of the same shapes
(3B, batch 8) is counted the same way: keras-hub has no remat or chunked
loss, and its LoRA keeps `W + A @ B` for each adapted kernel.
"""

import argparse
import math
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from keras_paligemma2 import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2 import distribution as dist  # noqa: E402
from keras_paligemma2.checkpoints import presets  # noqa: E402
from keras_paligemma2.utils.keras_internals import forget_pending_initialization  # noqa: E402

GIB = 2**30
TEXT = 64  # 32 prompt + 32 response tokens
SCENARIOS = [
    # name, preset, mode, batch, quantization, mesh, target GiB
    ("3b_224 LoRA int4 b8", "pg2_3b_224", "lora", 8, "int4", (1, 1), 6),
    ("3b_224 LoRA bf16 b8", "pg2_3b_224", "lora", 8, None, (1, 1), 10),
    ("3b_448 LoRA bf16 b8", "pg2_3b_448", "lora", 8, None, (1, 1), 14),
    ("10b_224 LoRA int8 b4", "pg2_10b_224", "lora", 4, "int8", (1, 1), 14),
    ("10b_224 LoRA int4 b8", "pg2_10b_224", "lora", 8, "int4", (1, 1), 12),
    ("28b_224 generate int4 b1", "pg2_28b_224", "inference", 1, "int4", (1, 1), 20),
    ("10b_224 full FSDP v5e-8 b16", "pg2_10b_224", "full", 16, None, (8, 1), 14),
]


def _abstract(variables):
    return [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in variables]


def _build(config, mode, remat, chunk):
    """The task, built without values (nothing allocated)."""
    with keras.StatelessScope(initialize_variables=False):
        backbone = PaliGemma2Backbone(**config, dtype="bfloat16")
    forget_pending_initialization(backbone.variables)
    lm = PaliGemma2CausalLM(backbone)
    if mode == "lora":
        lm.enable_lora(8)  # the adapters (small) get values
    lm.compile(optimizer=keras.optimizers.SGD(0.1), remat=remat, loss_chunk_size=chunk)
    return lm


def saved_bytes(config, batch, mode, remat, chunk):
    """Bytes the training loss's backward pass keeps (non-argument residuals)."""
    lm = _build(config, mode, remat, chunk)
    size = config["image_size"]
    x = {
        "images": jax.ShapeDtypeStruct((batch, size, size, 3), "float32"),
        "token_ids": jax.ShapeDtypeStruct((batch, TEXT), "int32"),
        "padding_mask": jax.ShapeDtypeStruct((batch, TEXT), "int32"),
        "response_mask": jax.ShapeDtypeStruct((batch, TEXT), "int32"),
    }
    y = jax.ShapeDtypeStruct((batch, TEXT), "int32")
    weights = jax.ShapeDtypeStruct((batch, TEXT), "float32")

    def loss(trainable, frozen, x, y, weights):
        value, _ = lm.compute_loss_and_updates(
            trainable, frozen, [], x, y, weights, training=True, optimizer_variables=[]
        )
        return value

    residuals = saved_residuals(
        loss,
        _abstract(lm.trainable_variables),
        _abstract(lm.non_trainable_variables),
        x,
        y,
        weights,
    )
    return sum(
        math.prod(aval.shape) * aval.dtype.itemsize
        for aval, source in residuals
        if not source.startswith("from the argument")
    )


def extrapolated_saved(config, batch, mode, remat, chunk):
    """saved_bytes at the config's depths, from 2/4 decoder and 1/2 ViT layers."""

    def at(layers, vit_layers):
        return saved_bytes(
            {**config, "num_layers": layers, "vit_num_layers": vit_layers},
            batch,
            mode,
            remat,
            chunk,
        )

    base = at(2, 1)
    per_decoder = (at(4, 1) - base) / 2
    per_vit = at(2, 2) - base
    rest = base - 2 * per_decoder - per_vit
    total = rest + config["num_layers"] * per_decoder + config["vit_num_layers"] * per_vit
    return total, per_decoder, per_vit


def variable_bytes(config, mode, quantization, mesh):
    """(weights, optimizer slots + gradients) in bytes per device."""
    planned = dist.plan(
        config, mesh, mode, 1, TEXT, "bfloat16", quantization=quantization, fsdp=mesh[0] > 1
    )
    if quantization is None:
        # Counted here from the variables themselves (the planner's shard
        # arithmetic is checked against placed shards in the tests).
        with keras.StatelessScope(initialize_variables=False):
            backbone = PaliGemma2Backbone(**config, dtype="bfloat16")
        forget_pending_initialization(backbone.variables)
        weights = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in backbone.weights)
        weights = weights / (mesh[0] * mesh[1])
    else:
        weights = planned.parameters
    return weights, planned.gradients + planned.optimizer_state


def run(scenario):
    name, preset, mode, batch, quantization, mesh, target = scenario
    config = dict(presets.preset_config(preset))
    per_device_batch = batch // mesh[0]
    options = dict(remat="block", loss_chunk_size=128) if mode != "inference" else {}
    planned = dist.plan(
        config,
        mesh,
        mode,
        batch,
        TEXT,
        "bfloat16",
        quantization=quantization,
        fsdp=mesh[0] > 1,
        **options,
    )
    weights, training_state = variable_bytes(config, mode, quantization, mesh)
    if mode == "inference":
        # Generation keeps no backward pass: the KV cache and the prefill's
        # transients are the planner's (checked against XLA in the tests).
        total = weights + planned.kv_cache + planned.activations
        print(
            f"{name}: weights {weights / GIB:.2f}, KV cache {planned.kv_cache / GIB:.2f}, "
            f"prefill {planned.activations / GIB:.2f}; sum {total / GIB:.2f} GiB; planner "
            f"{planned.total / GIB:.2f} ({planned.total / total:.2f}x); target {target}",
            flush=True,
        )
        return name, total, planned.total, target
    saved, per_decoder, _ = extrapolated_saved(config, per_device_batch, mode, "block", 128)
    _, no_remat_block, _ = extrapolated_saved(config, per_device_batch, mode, False, 128)
    chunk_transient = 3 * 128 * config["vocabulary_size"] * 4
    transient = max(no_remat_block, chunk_transient)
    total = weights + training_state + saved + transient
    print(
        f"{name}: weights {weights / GIB:.2f}, grads + Adam {training_state / GIB:.2f}, saved "
        f"{saved / GIB:.2f} ({per_decoder / 2**20:.1f} MiB per decoder block), transient "
        f"{transient / GIB:.2f}; sum {total / GIB:.2f} GiB; planner {planned.total / GIB:.2f} "
        f"({planned.total / total:.2f}x); target {target}",
        flush=True,
    )
    return name, total, planned.total, target


KERAS_HUB_TARGETS = [
    # keras-hub's names for Gemma's attention and MLP projections (its ViT's
    # attention shares the first four: adapted too, as keras-hub would).
    "query",
    "key",
    "value",
    "attention_output",
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
]


def keras_hub_saved_bytes(config, batch):
    """saved_bytes for keras-hub's own PaliGemma with its own LoRA (rank 8,
    `KERAS_HUB_TARGETS`), its task's loss (full logits, Keras' sparse
    cross-entropy), no remat: keras-hub has no other settings."""
    import keras_hub

    with keras.StatelessScope(initialize_variables=False):
        backbone = keras_hub.models.PaliGemmaBackbone(
            vocabulary_size=config["vocabulary_size"],
            image_size=config["image_size"],
            num_layers=config["num_layers"],
            num_query_heads=config["num_query_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            hidden_dim=config["hidden_dim"],
            intermediate_dim=2 * config["intermediate_dim"],
            head_dim=config["head_dim"],
            vit_patch_size=config["patch_size"],
            vit_num_heads=config["vit_num_heads"],
            vit_hidden_dim=config["vit_hidden_dim"],
            vit_num_layers=config["vit_num_layers"],
            vit_intermediate_dim=config["vit_intermediate_dim"],
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            attention_logit_soft_cap=config["attention_logit_soft_cap"],
            final_logit_soft_cap=config["final_logit_soft_cap"],
            query_head_dim_normalize=True,
            dtype="bfloat16",
        )
    forget_pending_initialization(backbone.variables)
    backbone.enable_lora(8, target_layer_names=KERAS_HUB_TARGETS)
    lm = keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=None)
    lm.compile(optimizer=keras.optimizers.SGD(0.1), sampler="greedy")
    size = config["image_size"]
    x = {
        "images": jax.ShapeDtypeStruct((batch, size, size, 3), "float32"),
        "token_ids": jax.ShapeDtypeStruct((batch, TEXT), "int32"),
        "padding_mask": jax.ShapeDtypeStruct((batch, TEXT), "int32"),
        "response_mask": jax.ShapeDtypeStruct((batch, TEXT), "int32"),
    }
    y = jax.ShapeDtypeStruct((batch, TEXT), "int32")
    weights = jax.ShapeDtypeStruct((batch, TEXT), "float32")

    def loss(trainable, frozen, x, y, weights):
        value, _ = lm.compute_loss_and_updates(
            trainable, frozen, [], x, y, weights, training=True, optimizer_variables=[]
        )
        return value

    residuals = saved_residuals(
        loss,
        _abstract(lm.trainable_variables),
        _abstract(lm.non_trainable_variables),
        x,
        y,
        weights,
    )
    return sum(
        math.prod(aval.shape) * aval.dtype.itemsize
        for aval, source in residuals
        if not source.startswith("from the argument")
    )


def keras_hub_lora(preset="pg2_3b_224", batch=8):
    """keras-hub's LoRA of the same shapes, counted as ours is."""
    config = dict(presets.preset_config(preset))

    def at(layers, vit_layers):
        return keras_hub_saved_bytes(
            {**config, "num_layers": layers, "vit_num_layers": vit_layers}, batch
        )

    base = at(2, 1)
    per_decoder = (at(4, 1) - base) / 2
    per_vit = at(2, 2) - base
    rest = base - 2 * per_decoder - per_vit
    saved = rest + config["num_layers"] * per_decoder + config["vit_num_layers"] * per_vit
    weights, training_state = variable_bytes(config, "lora", None, (1, 1))
    total = weights + training_state + saved
    print(
        f"keras-hub's own LoRA {preset} b{batch} (its targets {', '.join(KERAS_HUB_TARGETS)}; no "
        f"remat or chunked loss in keras-hub): weights {weights / GIB:.2f}, grads + Adam about "
        f"{training_state / GIB:.2f}, saved {saved / GIB:.2f} ({per_decoder / 2**20:.1f} MiB per "
        f"decoder block); sum {total / GIB:.2f} GiB",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the scenarios whose name contains this text")
    parser.add_argument("--skip-keras-hub", action="store_true")
    args = parser.parse_args()
    rows = [run(s) for s in SCENARIOS if not args.only or args.only in s[0]]
    if not args.skip_keras_hub:
        keras_hub_lora()
    print("\n| scenario | counted GiB | planner GiB | planner / counted | target |")
    print("|---|---|---|---|---|")
    for name, total, planned, target in rows:
        print(
            f"| {name} | {total / GIB:.2f} | {planned / GIB:.2f} | {planned / total:.2f} | {target} |"
        )


if __name__ == "__main__":
    main()
