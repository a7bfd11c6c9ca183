"""LoRA training step of a real-sized model on one accelerator: examples/s and MFU.

    python -m benchmarks.gpu_train [--preset pg2_3b_224] [--batches 16] [--remat]
        [--loss-chunk-size 128] [--quantization int4]

(`benchmarks/gpu.sh train` runs it on the lent GPU machine.) Builds
`PaliGemma2CausalLM` with the preset's shapes and random bfloat16 weights,
enables LoRA (rank 8, decoder attention + MLP: the default targets), and
times `train_on_batch` on random images and 64 text tokens (32 prompt, 32
response) after two warm-up steps (the first compiles). `--quantization`
builds the decoder's kernels straight in Keras' int8 / int4 form (a
`DTypePolicyMap` by layer path, as a saved quantised model is rebuilt), with
random integer values: QLoRA's shapes without a float model to quantise
(Keras quantises in numpy on the host: minutes for 10B).

Model FLOPs per example, counted from the shapes (matmuls and attention;
norms and elementwise work left out): the frozen ViT and projection run
forward only (2 x params x 256 patches), the decoder forward and the
backward pass to its activations (2 x 2 x params x 320 tokens, attention
included); weight gradients only for the LoRA adapters. MFU = those FLOPs x
examples/s over the chip's dense bf16 peak (`--peak-tflops`, 989 for an H100
SXM). The usual 6 x params x tokens convention for full fine-tuning is
printed beside it for comparison.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.gpu_decode import benchmark_config  # noqa: E402
from keras_paligemma2 import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.layers import projections  # noqa: E402
from keras_paligemma2.utils.keras_internals import forget_pending_initialization  # noqa: E402

PROMPT, RESPONSE = 32, 32


def step_flops(config):
    """(LoRA step model FLOPs, 6N-convention FLOPs) per example."""
    d, f, layers = config["hidden_dim"], config["intermediate_dim"], config["num_layers"]
    n, k, h = config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]
    w, vf, vl = config["vit_hidden_dim"], config["vit_intermediate_dim"], config["vit_num_layers"]
    patches = (config["image_size"] // config["patch_size"]) ** 2
    text = PROMPT + RESPONSE
    tokens = patches + text
    vit_params = vl * (4 * w * w + 2 * w * vf) + 3 * config["patch_size"] ** 2 * w + w * d
    vit = 2 * vit_params * patches + vl * 4 * patches * patches * w
    dec_params = layers * (d * h * (2 * n + 2 * k) + 3 * d * f)
    dec = 2 * dec_params * tokens + layers * 4 * tokens * tokens * n * h
    logits = 2 * text * d * config["vocabulary_size"]
    lora_step = vit + 2 * (dec + logits)
    six_n = 6 * (dec_params + config["vocabulary_size"] * d) * tokens + 6 * vit_params * patches
    return lora_step, six_n


def quantised_backbone(config, mode):
    """The backbone with its decoder kernels built as Keras' `mode` layers
    (never a float kernel), given random integer values on the device."""
    with keras.StatelessScope(initialize_variables=False):
        probe = PaliGemma2Backbone(**config, dtype="bfloat16")
    policy = "int8_from_bfloat16" if mode == "int8" else "int4/128_from_bfloat16"
    policies = keras.dtype_policies.DTypePolicyMap(default_policy="bfloat16")
    for layer in probe._flatten_layers():
        if projections.quantizes_layer(layer, quantize_vision=False):
            policies[layer.path] = keras.dtype_policies.get(policy)
    forget_pending_initialization(probe.variables)  # valueless; never to be initialised
    del probe
    backbone = PaliGemma2Backbone(**config, dtype=policies)
    key = jax.random.key(0)
    for variable in backbone.weights:
        if variable.dtype == "int8":  # int8 values, or two int4 values a byte
            key, draw = jax.random.split(key)
            variable.assign(jax.random.randint(draw, variable.shape, -128, 128, jnp.int8))
        elif variable.path.endswith("kernel_scale"):
            variable.assign(jnp.full(variable.shape, 0.01, variable.dtype))
    return backbone


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pg2_3b_224")
    parser.add_argument("--tiny", action="store_true", help="the small CPU config (script check)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--loss-chunk-size", type=int, default=None)
    parser.add_argument("--quantization", choices=["int8", "int4"], default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    config, device = benchmark_config(args.preset, args.tiny)
    start = time.perf_counter()
    if args.quantization:
        backbone = quantised_backbone(config, args.quantization)
    else:
        backbone = PaliGemma2Backbone(**config, dtype="bfloat16")
    lm = PaliGemma2CausalLM(backbone)
    lm.enable_lora(args.rank)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        remat=args.remat,
        loss_chunk_size=args.loss_chunk_size,
    )
    lora = sum(int(np.prod(v.shape)) for v in lm.trainable_variables)
    weight_bytes = sum(v.value.nbytes for v in lm.backbone.weights)
    print(
        f"{args.preset}{' (tiny)' if args.tiny else ''} shapes, {weight_bytes / 2**30:.2f} GiB of "
        f"weights ({args.quantization or 'bfloat16'} decoder), LoRA rank {args.rank}: "
        f"{lora / 1e6:.2f} M trainable (float32), remat {args.remat}, loss chunk "
        f"{args.loss_chunk_size}, built in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    flops, six_n = step_flops(config)
    rng = np.random.default_rng(0)
    size = config["image_size"]
    for batch in args.batches:
        length = PROMPT + RESPONSE
        x = {
            "images": rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32"),
            "token_ids": rng.integers(3, config["vocabulary_size"], (batch, length)).astype(
                "int32"
            ),
            "padding_mask": np.ones((batch, length), "int32"),
            "response_mask": np.zeros((batch, length), "int32"),
        }
        x["response_mask"][:, PROMPT:] = 1
        y = rng.integers(3, config["vocabulary_size"], (batch, length)).astype("int32")
        weights = x["response_mask"].astype("float32")
        start = time.perf_counter()
        lm.train_on_batch(x, y, sample_weight=weights)
        compile_s = time.perf_counter() - start
        lm.train_on_batch(x, y, sample_weight=weights)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss = lm.train_on_batch(x, y, sample_weight=weights)
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        rate = batch / step
        print(
            f"batch {batch:3d}: {step * 1e3:7.1f} ms/step, {rate:7.1f} examples/s, "
            f"{flops * rate / 1e12:6.1f} TFLOP/s model = MFU {flops * rate / 1e12 / args.peak_tflops:.1%} "
            f"(6N convention: {six_n * rate / 1e12 / args.peak_tflops:.1%}), "
            f"first step {compile_s:5.1f} s, loss {float(np.asarray(loss).reshape(-1)[0]):.3f}",
            flush=True,
        )
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            print(
                f"          peak device memory {stats['peak_bytes_in_use'] / 2**30:.1f} GiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
