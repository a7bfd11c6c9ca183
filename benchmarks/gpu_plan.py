"""The memory planner against a real device: pg2_3b-shaped weights through
`auto_distribution`, then the peak memory JAX reports.

    python -m benchmarks.gpu_plan inference 16
    python -m benchmarks.gpu_plan full 8

(`benchmarks/gpu.sh plan` runs both, one process each, so that each peak is
its own.) Random bfloat16 weights, 224 px, 64 text tokens (inference: a
64-token prompt and 64 new tokens, greedy); full fine-tuning with Adam.
"""

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_paligemma2 import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2 import distribution as dist  # noqa: E402
from keras_paligemma2.checkpoints.presets import preset_config  # noqa: E402

TEXT = 64


def main():
    mode, batch = sys.argv[1], int(sys.argv[2])
    tiny = "--tiny" in sys.argv
    config = preset_config("pg2_3b_224")
    if tiny:
        config.update(num_layers=2, hidden_dim=256, num_query_heads=4, num_key_value_heads=2, head_dim=64,
                      intermediate_dim=512, vit_num_layers=2, vit_hidden_dim=192, vit_num_heads=4,
                      vit_intermediate_dim=384, query_pre_attn_scalar=64)  # fmt: skip
    device = jax.devices()[0]
    memory = (device.memory_stats() or {}).get("bytes_limit", 16 * 2**30)
    distribution, planned = dist.auto_distribution(
        config, mode, batch, TEXT, "bfloat16", device_memory=memory, max_new_tokens=TEXT
    )
    print(f"{device.device_kind}: {mode}, batch {batch}; planned {planned}", flush=True)
    rng = np.random.default_rng(0)
    with distribution.scope():
        start = time.perf_counter()
        lm = PaliGemma2CausalLM(PaliGemma2Backbone(**config, dtype="bfloat16"))
        print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
        images = rng.uniform(-1, 1, (batch, 224, 224, 3)).astype("float32")
        tokens = rng.integers(3, config["vocabulary_size"], (batch, TEXT)).astype("int32")
        if mode == "inference":
            x = {"images": images, "token_ids": tokens, "padding_mask": np.ones_like(tokens)}
            lm.generate(x, max_new_tokens=TEXT, stop_token_ids=None, strip_prompt=True)
        else:
            if mode == "lora":
                lm.enable_lora(8)
            lm.compile(optimizer=keras.optimizers.Adam(1e-5))
            response = np.zeros_like(tokens)
            response[:, TEXT // 2 :] = 1
            x = {
                "images": images,
                "token_ids": tokens,
                "padding_mask": np.ones_like(tokens),
                "response_mask": response,
            }
            for _ in range(2):
                lm.train_on_batch(x, tokens, sample_weight=response.astype("float32"))
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"]
        print(
            f"measured peak {peak / 2**30:.2f} GiB; planned total {planned.total / 2**30:.2f} GiB "
            f"({planned.total / peak:.2f}x)",
            flush=True,
        )
    else:
        print("this device reports no peak memory", flush=True)


if __name__ == "__main__":
    main()
