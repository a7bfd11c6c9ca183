"""Loading a mid-size model into shards on 8 simulated devices.

    python -m benchmarks.sharded [--mesh 2 4]

Writes a mid-size PaliGemma 2 (random float32 weights, about 0.5 B
parameters: SigLIP-like ViT of 12 x 768, Gemma 2 decoder of 12 x 1536 with
the real 257,152-word vocabulary) as a Keras preset, then loads it with no
distribution and under `model_parallel` on the mesh, timing each load and
reading the bytes each device holds and the peak RSS above the baseline
after imports (each load in a fresh process); the planner's parameter bytes are printed beside them,
and one greedy decode checks the sharded model.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_paligemma2 import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2 import distribution as dist  # noqa: E402

CONFIG = dict(
    image_size=224, patch_size=14, vit_hidden_dim=768, vit_num_layers=12, vit_num_heads=12,
    vit_intermediate_dim=3072, vocabulary_size=257_152, num_layers=12, hidden_dim=1536,
    num_query_heads=8, num_key_value_heads=4, head_dim=192, intermediate_dim=6144,
)  # fmt: skip


def per_device_bytes(model):
    held = {d: 0 for d in jax.devices()}
    for v in model.weights:
        for shard in v.value.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return held


def _memory_gib(field):
    """VmHWM (peak) or VmRSS (now) of this process. Unlike `ru_maxrss`, which a
    child inherits from its parent across fork and exec, VmHWM is the
    process's own."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def load(preset, mesh, fsdp):
    """One load (no distribution when `mesh` is None), in this process."""
    baseline = _memory_gib("VmRSS")
    scope = (
        dist.model_parallel(CONFIG, mesh, fsdp=fsdp).scope() if mesh else contextlib.nullcontext()
    )
    with scope:
        start = time.perf_counter()
        lm = PaliGemma2CausalLM.from_preset(preset)
        seconds = time.perf_counter() - start
        load_peak = _memory_gib("VmHWM") - baseline
        held = per_device_bytes(lm)
        batch = mesh[0] if mesh else 1
        x = {
            "images": np.zeros((batch, 224, 224, 3), "float32"),
            "token_ids": np.full((batch, 4), 2, "int32"),
            "padding_mask": np.ones((batch, 4), "int32"),
        }
        lm.generate(
            x, max_new_tokens=4, stop_token_ids=None, strip_prompt=True
        )  # Sharded decoding runs.
    peak = _memory_gib("VmHWM") - baseline
    line = f"load {seconds:.1f} s, per device {min(held.values()) / 2**30:.3f}-{max(held.values()) / 2**30:.3f} GiB"
    if mesh:
        planned = dist.plan(CONFIG, mesh, "inference", dtype="float32", fsdp=fsdp).parameters
        line += f" (planner {planned / 2**30:.3f} GiB)"
    print(
        f"{line}; peak RSS above the {baseline:.2f} GiB after imports: {load_peak:.2f} GiB after loading, "
        f"{peak:.2f} GiB after a greedy decode",
        flush=True,
    )


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: one load in a fresh process
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    mesh = tuple(args.mesh)
    if args.load:
        return load(args.load, None if mesh == (1, 1) else mesh, args.fsdp)
    with tempfile.TemporaryDirectory() as preset:
        keras.utils.set_random_seed(0)
        PaliGemma2Backbone(**CONFIG).save_to_preset(preset)
        size = sum(os.path.getsize(os.path.join(preset, f)) for f in os.listdir(preset))
        print(
            f"{jax.device_count()} {jax.devices()[0].platform} devices; preset {size / 2**30:.2f} GiB",
            flush=True,
        )
        # Each load in a fresh process, so that its peak RSS is its own.
        runs = [("one device", ["--mesh", "1", "1"])] + [
            (f"mesh {mesh} fsdp={fsdp}", ["--mesh", *map(str, mesh)] + (["--fsdp"] if fsdp else []))
            for fsdp in (False, True)
        ]
        for name, extra in runs:
            print(f"{name}:", flush=True)
            subprocess.run(
                [sys.executable, "-m", "benchmarks.sharded", "--load", preset, *extra],
                check=True,
                cwd=REPO,
            )


if __name__ == "__main__":
    main()
