"""Forward pass (text logits) of ours against keras-hub's PaliGemmaCausalLM.

    python -m benchmarks.forward [--batch 8] [--text 64] [--repeats 5]

Builds keras-hub's `PaliGemmaCausalLM` with the shared benchmark config and
random weights, saves it as a keras-hub preset, loads that preset into ours
(same weights), checks that both give the same text logits, then times each
model's jitted stateless forward after warm-up and reads XLA's memory
analysis of the compiled forward. keras-hub projects all image + text
positions onto the 257,152-word vocabulary and then slices the text ones;
ours projects only the text positions.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402

# The shared benchmark config (keras-hub argument names).
KERAS_HUB_CONFIG = dict(
    vocabulary_size=257_152,
    image_size=224,
    vit_patch_size=14,
    vit_num_layers=4,
    vit_hidden_dim=192,
    vit_num_heads=4,
    vit_intermediate_dim=768,
    num_layers=4,
    hidden_dim=256,
    num_query_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_dim=2048,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    use_sliding_window_attention=False,
    query_head_dim_normalize=True,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
)


def same_weights_pair(rng):
    """keras-hub's PaliGemmaCausalLM with random weights, and ours loaded from it."""
    theirs = keras_hub.models.PaliGemmaCausalLM(
        backbone=keras_hub.models.PaliGemmaBackbone(**KERAS_HUB_CONFIG), preprocessor=None
    )
    for v in theirs.backbone.weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.05)
    with tempfile.TemporaryDirectory() as preset:
        theirs.backbone.save_to_preset(preset)
        ours = PaliGemma2CausalLM.from_preset(preset)
    return theirs, ours


def jitted_forward(model):
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def forward(trainable, non_trainable, inputs):
        logits, _ = model.stateless_call(trainable, non_trainable, inputs)
        return logits

    return (
        lambda inputs: forward(trainable, non_trainable, inputs),
        forward,
        (trainable, non_trainable),
    )


def measure(name, model, inputs, repeats):
    run, forward, state = jitted_forward(model)
    start = time.perf_counter()
    compiled = forward.lower(*state, inputs).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    run(inputs).block_until_ready()  # Warm-up.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(inputs)
        out.block_until_ready()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    temp_mb = memory.temp_size_in_bytes / 2**20 if memory else float("nan")
    print(
        f"{name:10s} forward {median * 1e3:8.1f} ms (median of {repeats}), "
        f"compile {compile_s:5.1f} s, XLA temp memory {temp_mb:8.1f} MiB, "
        f"output {tuple(out.shape)}"
    )
    return median, temp_mb, np.asarray(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    theirs, ours = same_weights_pair(rng)

    response = np.zeros((args.batch, args.text), "int32")
    response[:, args.text // 2 :] = 1
    inputs = {
        "images": rng.uniform(-1, 1, (args.batch, 224, 224, 3)).astype("float32"),
        "token_ids": rng.integers(1, 257_152, (args.batch, args.text)).astype("int32"),
        "padding_mask": np.ones((args.batch, args.text), "int32"),
        "response_mask": response,
    }
    print(
        f"batch {args.batch}, 224 px (256 image tokens), {args.text} text tokens, float32, {jax.devices()[0].platform}"
    )
    ours_s, ours_mb, ours_out = measure("ours", ours, inputs, args.repeats)
    theirs_s, theirs_mb, theirs_out = measure("keras-hub", theirs, inputs, args.repeats)
    print(f"max |ours - keras-hub| text logits: {np.abs(ours_out - theirs_out).max():.2e}")
    print(f"speed-up {theirs_s / ours_s:.2f}x, XLA temp memory ratio {ours_mb / theirs_mb:.2f}")


if __name__ == "__main__":
    main()
