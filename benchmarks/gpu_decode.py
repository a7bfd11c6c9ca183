"""Decoding speed of a real-sized model on one accelerator, against the memory roofline.

    python -m benchmarks.gpu_decode [--preset pg2_3b_224] [--batches 1 16] [--peer]

(`benchmarks/gpu.sh` runs it on the lent GPU machine.) Builds
`PaliGemma2CausalLM` with the preset's shapes and random bfloat16 weights
(nothing is downloaded: decoding cost does not depend on the values), feeds
random 224 px images and 16-token prompts, and times `generate` for N1 and
N2 new tokens with no stop token, after a warm-up call of each shape.

- Decode step: (T(N2) - T(N1)) / (N2 - N1); tokens/s = batch / step.
- Prefill + first token: T(N1) - (N1 - 1) * step (no extra compile).
- Roofline: a decode step must read every decoder weight once (the tied
  embedding table too: it makes the logits) plus the KV cache it attends
  over; the roofline step time is those bytes over the device bandwidth
  measured here (a large elementwise op, bytes read + written). The fraction
  reported is roofline time / measured step time.
- `--peer`: the same shapes in keras-hub's `PaliGemmaCausalLM` (its own
  random bfloat16 weights), timed the same way at `max_length` 16 + N.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.generate import PROMPT  # noqa: E402
from benchmarks.generate import inputs  # noqa: E402
from benchmarks.generate import timed_rounds  # noqa: E402
from keras_paligemma2 import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.checkpoints.presets import preset_config  # noqa: E402

# The shared CPU benchmark config, for a quick check of this script.
TINY = dict(
    vit_num_layers=4, vit_hidden_dim=192, vit_num_heads=4, vit_intermediate_dim=768,
    num_layers=4, hidden_dim=256, num_query_heads=4, num_key_value_heads=2,
    head_dim=64, intermediate_dim=1024, query_pre_attn_scalar=64,
)  # fmt: skip


def benchmark_config(preset, tiny):
    """The preset's backbone config (or the tiny CPU one); prints the device."""
    config = preset_config(preset)
    if tiny:
        config.update(TINY)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    return config, device


def measured_bandwidth(gib=2):
    """Bytes read + written per second by a large on-device elementwise op."""
    x = jnp.ones((gib * 2**30 // 2,), jnp.bfloat16)
    double = jax.jit(lambda x: x * 2)
    double(x).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        double(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


def decode_bytes(config, batch, cache_len, itemsize=2):
    """Bytes one decode step reads: decoder weights + the KV cache."""
    d, f, layers = config["hidden_dim"], config["intermediate_dim"], config["num_layers"]
    n, k, h = config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]
    per_layer = d * h * (2 * n + 2 * k) + 3 * d * f + 4 * d
    weights = layers * per_layer + config["vocabulary_size"] * d + d
    cache = layers * 2 * batch * cache_len * k * h
    return weights * itemsize, cache * itemsize


def keras_hub_model(config):
    """keras-hub's PaliGemmaCausalLM with the same shapes (its argument names)."""
    import keras_hub

    backbone = keras_hub.models.PaliGemmaBackbone(
        vocabulary_size=config["vocabulary_size"],
        image_size=config["image_size"],
        vit_patch_size=config["patch_size"],
        vit_num_layers=config["vit_num_layers"],
        vit_hidden_dim=config["vit_hidden_dim"],
        vit_num_heads=config["vit_num_heads"],
        vit_intermediate_dim=config["vit_intermediate_dim"],
        num_layers=config["num_layers"],
        hidden_dim=config["hidden_dim"],
        num_query_heads=config["num_query_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        intermediate_dim=2 * config["intermediate_dim"],
        attention_logit_soft_cap=config["attention_logit_soft_cap"],
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=False,
        query_head_dim_normalize=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        dtype="bfloat16",
    )
    model = keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler="greedy")
    return model


def measure(name, model_generate, batch, lengths, repeats, rng):
    n1, n2 = lengths
    # Both lengths timed round by round, so a disturbance falls on both alike.
    results = timed_rounds({n: lambda n=n: model_generate(batch, n, rng) for n in lengths}, repeats)
    (t1, c1), (t2, _) = results[n1], results[n2]
    step = (t2 - t1) / (n2 - n1)
    prefill = t1 - (n1 - 1) * step
    print(
        f"{name:9s} batch {batch:3d}: T({n1}) {t1 * 1e3:8.1f} ms, T({n2}) {t2 * 1e3:8.1f} ms, "
        f"decode {step * 1e3:6.2f} ms/step = {batch / step:8.1f} tokens/s, "
        f"prefill+first {prefill * 1e3:7.1f} ms, compile {c1:5.1f} s",
        flush=True,
    )
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pg2_3b_224")
    parser.add_argument("--tiny", action="store_true", help="the small CPU config (script check)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--lengths", type=int, nargs=2, default=[32, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", action="store_true", help="also time keras-hub")
    args = parser.parse_args()
    config, _ = benchmark_config(args.preset, args.tiny)
    bandwidth = measured_bandwidth(1 if args.tiny else 2)
    print(f"measured bandwidth: {bandwidth / 1e12:.3f} TB/s (read + write)", flush=True)

    start = time.perf_counter()
    backbone = PaliGemma2Backbone(**config, dtype="bfloat16")
    ours = PaliGemma2CausalLM(backbone=backbone, preprocessor=None)
    print(
        f"ours: {args.preset}{' (tiny)' if args.tiny else ''} shapes, "
        f"{backbone.count_params() / 1e9:.3f} B params, bfloat16, "
        f"built in {time.perf_counter() - start:.1f} s",
        flush=True,
    )

    def ours_generate(batch, new, rng):
        x = inputs(batch, PROMPT, rng)
        out = ours.generate(x, max_new_tokens=new, stop_token_ids=None, strip_prompt=True)
        np.asarray(out["token_ids"])

    rng = np.random.default_rng(0)
    num_image = (config["image_size"] // config["patch_size"]) ** 2
    steps = {}
    for batch in args.batches:
        step = measure("ours", ours_generate, batch, args.lengths, args.repeats, rng)
        # The last decode step attends over the whole cache: the upper bound.
        cache_len = num_image + PROMPT + args.lengths[1]
        weights, cache = decode_bytes(config, batch, cache_len)
        print(
            f"          roofline: {weights / 1e9:.2f} GB weights + {cache / 1e9:.3f} GB KV cache "
            f"per step -> {(weights + cache) / bandwidth * 1e3:.2f} ms; reached "
            f"{(weights + cache) / bandwidth / step:.0%} (weights only: "
            f"{weights / bandwidth / step:.0%})",
            flush=True,
        )
        steps[batch] = step

    if args.peer:
        del ours, backbone
        start = time.perf_counter()
        theirs = keras_hub_model(config)
        print(f"keras-hub: built in {time.perf_counter() - start:.1f} s", flush=True)

        def theirs_generate(batch, new, rng):
            x = inputs(batch, PROMPT + new, rng)
            out = theirs.generate(x, max_length=PROMPT + new, stop_token_ids=None)
            np.asarray(out["token_ids"])

        for batch in args.batches:
            step = measure("keras-hub", theirs_generate, batch, args.lengths, args.repeats, rng)
            print(f"          keras-hub / ours decode step: {step / steps[batch]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
