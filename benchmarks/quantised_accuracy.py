"""What quantising costs in task accuracy: `pg2_tiny_shapes` on held-out
scenes, float against int8 and int4 kernels (round to nearest, Keras' own
`quantize`) and GPTQ (calibrated, Keras' solver), decoder only and with the
ViT.

    python -m benchmarks.quantised_accuracy [--images 300] [--only gptq]

Round-to-nearest rows load the shipped preset straight into the quantised
form (`from_preset(..., quantization=, quantize_vision=)`) or, for grouped
int4, quantise after loading (`Int4QuantizationConfig(block_size=32)`);
GPTQ rows calibrate with `lm.quantize("gptq", GPTQConfig(...))` on 128
training-format examples (seed 1, never evaluated). Every row runs
`keras_paligemma2.apps.shapes.evaluate` on the same scenes (seed 10,000,
the one `accuracy.json` records), greedy decoding, and measures the output
error: the mean absolute difference of the backbone's final hidden states
from the float model's, over 64 more training-format examples (seed 2),
relative to their mean magnitude. Keras' int8 layers also quantise their
inputs per token (int8 x int8 matmuls); its int4 and GPTQ layers compute
with the dequantised kernel.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.apps import shapes  # noqa: E402

RAW = ("images", "prompts", "responses")
# name, how, quantize_vision; how: None, a from_preset quantization, or a
# (mode, config) for `lm.quantize`.
ROWS = [
    ("float32 (as shipped)", None, False),
    ("int8 decoder", "int8", False),
    ("int8 decoder + ViT", "int8", True),
    ("int4 decoder", "int4", False),
    ("int4 decoder + ViT", "int4", True),
    ("int4 groups of 32, decoder + ViT", ("int4", dict(block_size=32)), True),
    ("GPTQ 4-bit groups of 32, decoder", ("gptq", dict(weight_bits=4)), False),
    ("GPTQ 4-bit groups of 32, decoder + ViT", ("gptq", dict(weight_bits=4)), True),
    ("GPTQ 3-bit groups of 32, decoder + ViT", ("gptq", dict(weight_bits=3)), True),
]
METRICS = ("caption", "count", "colour", "detection_recall", "detection_precision")


def calibration_batches(count=128, batch_size=32, seed=1):
    """Training-format batches of raw examples for GPTQ."""
    examples = shapes.training_examples(count, seed=seed)
    return [
        {key: examples[key][i : i + batch_size] for key in RAW} for i in range(0, count, batch_size)
    ]


def quantised_model(how, quantize_vision):
    """`pg2_tiny_shapes` quantised as a row of `ROWS` says."""
    if how is None or isinstance(how, str):
        return PaliGemma2CausalLM.from_preset(
            "pg2_tiny_shapes", quantization=how, quantize_vision=quantize_vision
        )
    mode, options = how
    lm = PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")
    if mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(**options)
    else:
        config = keras.quantizers.GPTQConfig(
            dataset=calibration_batches(), tokenizer=None, group_size=32, **options
        )
    lm.quantize(mode, config=config, quantize_vision=quantize_vision)
    return lm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--only", default="", help="rows whose name contains this")
    args = parser.parse_args()
    reference = PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")
    held = shapes.training_examples(64, seed=2)
    inputs = reference.preprocessor({key: held[key] for key in RAW})[0]
    want = np.asarray(reference.backbone(inputs))
    print("| model | " + " | ".join(METRICS) + " | output error | weights MiB | seconds |")
    print("|---" * (len(METRICS) + 4) + "|")
    for name, how, vision in ROWS:
        if args.only.lower() not in name.lower():
            continue
        start = time.perf_counter()
        lm = quantised_model(how, vision)
        error = np.abs(np.asarray(lm.backbone(inputs)) - want).mean() / np.abs(want).mean()
        scores = shapes.evaluate(lm, count=args.images, seed=args.seed)
        size = sum(v.value.nbytes for v in lm.backbone.weights) / 2**20
        cells = " | ".join(f"{scores[m]:.3f}" for m in METRICS)
        seconds = time.perf_counter() - start
        print(f"| {name} | {cells} | {error:.4f} | {size:.1f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
