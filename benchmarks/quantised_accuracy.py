"""What quantising costs in task accuracy: `pg2_tiny_shapes` on held-out
scenes, float against int8 and int4 kernels (round to nearest, Keras' own
`quantize`), decoder only and with the ViT.

    python -m benchmarks.quantised_accuracy [--images 300]

Each row loads the shipped preset straight into the quantised form
(`from_preset(..., quantization=, quantize_vision=)`) and runs
`keras_paligemma2.apps.shapes.evaluate` on the same scenes (seed 10,000, the
one `accuracy.json` records), greedy decoding. Keras' int8 layers also
quantise their inputs per token (int8 x int8 matmuls); its int4 layers
compute with the dequantised kernel.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.apps import shapes  # noqa: E402

ROWS = [
    ("float32 (as shipped)", None, False),
    ("int8 decoder", "int8", False),
    ("int8 decoder + ViT", "int8", True),
    ("int4 decoder", "int4", False),
    ("int4 decoder + ViT", "int4", True),
]
METRICS = ("caption", "count", "colour", "detection_recall", "detection_precision")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=10_000)
    args = parser.parse_args()
    print("| model | " + " | ".join(METRICS) + " | weights MiB | seconds |")
    print("|---" * (len(METRICS) + 3) + "|")
    for name, quantization, vision in ROWS:
        start = time.perf_counter()
        lm = PaliGemma2CausalLM.from_preset(
            "pg2_tiny_shapes", quantization=quantization, quantize_vision=vision
        )
        scores = shapes.evaluate(lm, count=args.images, seed=args.seed)
        size = sum(v.value.nbytes for v in lm.backbone.weights) / 2**20
        cells = " | ".join(f"{scores[m]:.3f}" for m in METRICS)
        print(f"| {name} | {cells} | {size:.1f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
