"""Batch prediction against a loop of single `generate` calls, on
`pg2_tiny_shapes` (CPU).

    python -m benchmarks.predict [--requests 128] [--batch-size 16] [--devices N]

Writes `--requests` drawn scenes (seed 30, every task of the shapes data:
captions, counts, colours, detection) as PNG files with a requests JSONL in
a temporary directory, then times, after one warm-up pass of each (compiles
happen there): `keras_paligemma2.apps.prediction.predict` over all of them
(batches by prompt length, results appended per batch), and the same
requests one `lm.generate` call each. Greedy, 24 new tokens at most.
Prints examples/s of each and their ratio, and checks both wrote the same
answers. `--devices N` simulates N CPU devices (XLA's host platform count)
and loads the model under `DataParallel` over them, so that `predict` splits
each batch over them (the single calls, batch 1, run on one).
"""

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
if "--devices" in sys.argv:  # before JAX starts
    count = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.apps import prediction  # noqa: E402
from keras_paligemma2.apps import shapes  # noqa: E402

TOKENS = dict(max_new_tokens=24)


def write_requests(root, count, seed=30):
    examples = shapes.training_examples(count, seed=seed)
    (root / "img").mkdir()
    with open(root / "requests.jsonl", "w") as f:
        for i, (image, prompt) in enumerate(zip(examples["images"], examples["prompts"])):
            PIL.Image.fromarray(image).save(root / "img" / f"{i}.png")
            f.write(json.dumps({"id": i, "image": f"img/{i}.png", "prefix": prompt}) + "\n")
    return prediction.read_requests(root / "requests.jsonl")


def single_calls(lm, requests):
    return {
        r["id"]: lm.generate(
            {"images": np.asarray(PIL.Image.open(r["image"])), "prompts": r["prefix"]}, **TOKENS
        )
        for r in requests
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices")
    args = parser.parse_args()
    scope = (
        keras.distribution.DataParallel(devices=jax.local_devices()).scope()
        if args.devices > 1
        else contextlib.nullcontext()
    )
    with scope:
        measure(args)


def measure(args):
    lm = PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        requests = write_requests(root, args.requests)
        prediction.predict(lm, requests, root / "warm.jsonl", args.batch_size, **TOKENS)
        single_calls(lm, requests)
        start = time.perf_counter()
        prediction.predict(lm, requests, root / "out.jsonl", args.batch_size, **TOKENS)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        alone = single_calls(lm, requests)
        looped = time.perf_counter() - start
        with open(root / "out.jsonl") as f:
            written = {r["id"]: r["prediction"] for r in map(json.loads, f)}
    same = sum(written[i] == alone[i] for i in alone)
    n = len(requests)
    print(
        f"{n} requests, batch {args.batch_size}, {len(jax.local_devices())} device(s): "
        f"predict {n / batched:.1f} examples/s "
        f"({batched:.1f} s), single generate calls {n / looped:.1f} examples/s ({looped:.1f} s): "
        f"{looped / batched:.2f}x; same answers {same}/{n}"
    )


if __name__ == "__main__":
    main()
