"""Training step of ours against keras-hub's PaliGemmaCausalLM, same weights.

    python -m benchmarks.train [--steps 3]

Shared benchmark config (see forward.py), random float32 weights made in
keras-hub's model and saved as a keras-hub preset, which both models load.
Batch 8, 224 px, 64 text tokens (32 prompt, 32 response), Adam 1e-4. Each
(model, mode) runs in its own process so that its peak RSS is its own: full
fine-tuning, and LoRA rank 8 (ours on the decoder attention and MLP
projections, our default; keras-hub on its default query and value
projections). Step time: median of `--steps` `train_on_batch` calls after
two warm-up calls (the first compiles). Peak memory: the process's peak
resident set (ru_maxrss), weights, data and compiled step included.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

BATCH, TEXT = 8, 64


def batch(rng):
    import numpy as np

    response = np.zeros((BATCH, TEXT), "int32")
    response[:, TEXT // 2 :] = 1
    x = {
        "images": rng.uniform(-1, 1, (BATCH, 224, 224, 3)).astype("float32"),
        "token_ids": rng.integers(1, 257_152, (BATCH, TEXT)).astype("int32"),
        "padding_mask": np.ones((BATCH, TEXT), "int32"),
        "response_mask": response,
    }
    y = rng.integers(1, 257_152, (BATCH, TEXT)).astype("int32")
    return x, y, response.astype("float32")


def run_one(model_name, mode, preset, steps):
    """In a child process: build, compile, time; print one JSON line."""
    import keras
    import keras_hub
    import numpy as np

    if model_name == "ours":
        from keras_paligemma2 import PaliGemma2CausalLM

        model = PaliGemma2CausalLM.from_preset(preset)
        if mode == "lora":
            model.enable_lora(8)
        model.compile(optimizer=keras.optimizers.Adam(1e-4))
    else:
        model = keras_hub.models.PaliGemmaCausalLM(
            backbone=keras_hub.models.PaliGemmaBackbone.from_preset(preset), preprocessor=None
        )
        if mode == "lora":
            model.backbone.enable_lora(8)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
    x, y, w = batch(np.random.default_rng(0))
    start = time.perf_counter()
    model.train_on_batch(x, y, sample_weight=w)
    first = time.perf_counter() - start
    model.train_on_batch(x, y, sample_weight=w)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.train_on_batch(x, y, sample_weight=w)
        times.append(time.perf_counter() - start)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "step_s": statistics.median(times),
                "first_s": first,
                "peak_rss_gb": peak / 1e9,
                "trainable": trainable,
                "loss": float(np.asarray(loss).reshape(-1)[0]),
            }
        )
    )


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--child", nargs=3, metavar=("MODEL", "MODE", "PRESET"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        run_one(*args.child, args.steps)
        return

    import keras_hub
    import numpy as np

    from benchmarks.forward import KERAS_HUB_CONFIG

    with tempfile.TemporaryDirectory() as preset:
        rng = np.random.default_rng(0)
        source = keras_hub.models.PaliGemmaBackbone(**KERAS_HUB_CONFIG)
        for v in source.weights:
            v.assign(rng.normal(size=v.shape).astype("float32") * 0.05)
        source.save_to_preset(preset)
        del source
        print(
            f"batch {BATCH}, 224 px, {TEXT} text tokens, float32, shared benchmark config",
            flush=True,
        )
        results = {}
        for mode in ("full", "lora"):
            for name in ("ours", "keras-hub"):
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.train",
                        "--steps",
                        str(args.steps),
                        "--child",
                        name,
                        mode,
                        preset,
                    ],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                )
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                if out.returncode or not lines:
                    print(out.stderr[-3000:])
                    raise SystemExit(f"{name} {mode} failed")
                r = json.loads(lines[-1])
                results[(name, mode)] = r
                print(
                    f"{mode:4s} {name:9s}: {r['step_s']:6.2f} s/step, peak RSS {r['peak_rss_gb']:5.2f} GB, "
                    f"first step {r['first_s']:5.1f} s, {r['trainable']:,} trainable, loss {r['loss']:.3f}",
                    flush=True,
                )
            ours, theirs = results[("ours", mode)], results[("keras-hub", mode)]
            print(
                f"{mode:4s} keras-hub / ours: step {theirs['step_s'] / ours['step_s']:.2f}x, "
                f"peak memory ours / keras-hub {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
