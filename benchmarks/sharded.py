"""Loading a mid-size model into shards on 8 simulated devices.

    python benchmarks/sharded.py [--mesh 2 4]

Writes a mid-size PaliGemma 2 (random float32 weights, about 0.5 B
parameters: SigLIP-like ViT of 12 x 768, Gemma 2 decoder of 12 x 1536 with
the real 257,152-word vocabulary) as a Keras preset, then loads it with no
distribution and under `model_parallel` on the mesh, timing each load and
reading the bytes each device holds; the planner's parameter bytes are
printed beside them, and one greedy decode checks the sharded model.
"""

import argparse
import os
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, nargs=2, default=[2, 4])
    args = parser.parse_args()
    mesh = tuple(args.mesh)
    with tempfile.TemporaryDirectory() as preset:
        keras.utils.set_random_seed(0)
        PaliGemma2Backbone(**CONFIG).save_to_preset(preset)
        size = sum(os.path.getsize(os.path.join(preset, f)) for f in os.listdir(preset))
        print(f"{jax.device_count()} {jax.devices()[0].platform} devices; preset {size / 2**30:.2f} GiB", flush=True)

        start = time.perf_counter()
        single = PaliGemma2CausalLM.from_preset(preset)
        print(f"one device: load {time.perf_counter() - start:.1f} s, "
              f"{max(per_device_bytes(single).values()) / 2**30:.2f} GiB on the busiest device", flush=True)
        del single

        for fsdp in (False, True):
            distribution = dist.model_parallel(CONFIG, mesh, fsdp=fsdp)
            with distribution.scope():
                start = time.perf_counter()
                lm = PaliGemma2CausalLM.from_preset(preset)
                seconds = time.perf_counter() - start
                held = per_device_bytes(lm)
                planned = dist.plan(CONFIG, mesh, "inference", dtype="float32", fsdp=fsdp).parameters
                x = {
                    "images": np.zeros((mesh[0], 224, 224, 3), "float32"),
                    "token_ids": np.full((mesh[0], 4), 2, "int32"),
                    "padding_mask": np.ones((mesh[0], 4), "int32"),
                }
                tokens = lm.generate(x, max_new_tokens=4, stop_token_ids=None)["token_ids"]
            print(
                f"mesh {mesh} fsdp={fsdp}: load {seconds:.1f} s, per device "
                f"{min(held.values()) / 2**30:.3f}-{max(held.values()) / 2**30:.3f} GiB "
                f"(planner {planned / 2**30:.3f} GiB), greedy tokens {tokens.shape}",
                flush=True,
            )
            del lm


if __name__ == "__main__":
    main()
