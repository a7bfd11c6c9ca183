"""Checkpoint loading: wall time and peak memory against reading the file once.

    python -m benchmarks.load make DIR          # ~6 GB per format, random values
    python -m benchmarks.load measure DIR       # each load in a fresh process
    python -m benchmarks.load time PATH [--warm] [--quantization int8|int4]

`make` writes a 3B-shaped (pg2_3b_224) bfloat16 checkpoint with the real
tensor names and shapes, as a big_vision `.b16.npz` and as an HF transformers
directory (config.json + three safetensors shards), and, with `--keras-hub`,
an equivalent keras-hub preset. `measure` drops the page cache when it may
(else says so), times `cat FILE > /dev/null`, then runs `from_preset(path,
dtype="bfloat16")` in a fresh process per format and reports wall time and
peak RSS above the process's baseline after imports. The "floor" case reads
the file into new memory that it keeps (two threads, around the page cache
where allowed), the least any loader must do: on VMs where first-touching
fresh memory is slow, that, not the disk, bounds loading.
`time` runs one `from_preset` in a fresh process, the page cache dropped first
(kept with `--warm`), without the `cat`s: to compare two checkouts in turn,
run `python -m benchmarks.load time PATH` from each checkout in turn. With
`--quantization int8|int4` it loads straight into the quantised decoder
(`from_preset(..., quantization=)`): the peak RSS then shows whether the
float model was ever held.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile

import ml_dtypes
import numpy as np
from numpy.lib import format as npy_format

V = 257_152
D, L, N, K, H, F = 2304, 26, 8, 4, 256, 9216  # gemma2_2b
W, VL, VH, M, P = 1152, 27, 16, 4304, 256  # So400m/14 at 224 px


def big_vision_shapes():
    vit = "params/img/Transformer/encoderblock/"
    mha = vit + "MultiHeadDotProductAttention_0/"
    llm = "params/llm/layers/"
    shapes = {
        "params/img/embedding/kernel": (14, 14, 3, W),
        "params/img/embedding/bias": (W,),
        "params/img/pos_embedding": (1, P, W),
        "params/img/Transformer/encoder_norm/scale": (W,),
        "params/img/Transformer/encoder_norm/bias": (W,),
        "params/img/head/kernel": (W, D),
        "params/img/head/bias": (D,),
        "params/llm/embedder/input_embedding": (V, D),
        "params/llm/final_norm/scale": (D,),
        llm + "attn/q_einsum/w": (L, N, D, H),
        llm + "attn/kv_einsum/w": (L, 2, K, D, H),
        llm + "attn/attn_vec_einsum/w": (L, N, H, D),
        llm + "mlp/gating_einsum": (L, 2, D, F),
        llm + "mlp/linear": (L, F, D),
    }
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
        shapes[llm + norm + "/scale"] = (L, D)
    for i in (0, 1):
        shapes[vit + f"LayerNorm_{i}/scale"] = (VL, W)
        shapes[vit + f"LayerNorm_{i}/bias"] = (VL, W)
    shapes[vit + "MlpBlock_0/Dense_0/kernel"] = (VL, W, M)
    shapes[vit + "MlpBlock_0/Dense_0/bias"] = (VL, M)
    shapes[vit + "MlpBlock_0/Dense_1/kernel"] = (VL, M, W)
    shapes[vit + "MlpBlock_0/Dense_1/bias"] = (VL, W)
    for name in ("query", "key", "value"):
        shapes[mha + f"{name}/kernel"] = (VL, W, VH, W // VH)
        shapes[mha + f"{name}/bias"] = (VL, VH, W // VH)
    shapes[mha + "out/kernel"] = (VL, VH, W // VH, W)
    shapes[mha + "out/bias"] = (VL, W)
    return shapes


def hf_shapes():
    shapes = {
        "language_model.model.embed_tokens.weight": (257_216, D),
        "language_model.model.norm.weight": (D,),
        "multi_modal_projector.linear.weight": (D, W),
        "multi_modal_projector.linear.bias": (D,),
    }
    v = "vision_tower.vision_model."
    shapes[v + "embeddings.patch_embedding.weight"] = (W, 3, 14, 14)
    shapes[v + "embeddings.patch_embedding.bias"] = (W,)
    shapes[v + "embeddings.position_embedding.weight"] = (P, W)
    shapes[v + "post_layernorm.weight"] = (W,)
    shapes[v + "post_layernorm.bias"] = (W,)
    for i in range(VL):
        p = f"{v}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + norm + ".weight"] = (W,)
            shapes[p + norm + ".bias"] = (W,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (W, W)
            shapes[p + f"self_attn.{proj}.bias"] = (W,)
        shapes[p + "mlp.fc1.weight"] = (M, W)
        shapes[p + "mlp.fc1.bias"] = (M,)
        shapes[p + "mlp.fc2.weight"] = (W, M)
        shapes[p + "mlp.fc2.bias"] = (W,)
    for i in range(L):
        p = f"language_model.model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (N * H, D)
        shapes[p + "self_attn.k_proj.weight"] = (K * H, D)
        shapes[p + "self_attn.v_proj.weight"] = (K * H, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, N * H)
        shapes[p + "mlp.gate_proj.weight"] = (F, D)
        shapes[p + "mlp.up_proj.weight"] = (F, D)
        shapes[p + "mlp.down_proj.weight"] = (D, F)
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            shapes[p + norm + ".weight"] = (D,)
    return shapes


HF_CONFIG = {
    "model_type": "paligemma",
    "image_token_index": 257_152,
    "text_config": {
        "model_type": "gemma2",
        "hidden_size": D,
        "num_hidden_layers": L,
        "num_attention_heads": N,
        "num_key_value_heads": K,
        "head_dim": H,
        "intermediate_size": F,
        "query_pre_attn_scalar": H,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
        "rms_norm_eps": 1e-6,
        "vocab_size": 257_216,
    },
    "vision_config": {
        "hidden_size": W,
        "num_hidden_layers": VL,
        "num_attention_heads": VH,
        "intermediate_size": M,
        "patch_size": 14,
        "image_size": 224,
        "layer_norm_eps": 1e-6,
    },
}


def random_bf16(shape, rng):
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def make(directory, keras_hub_too):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    npz_path = os.path.join(directory, "paligemma2-3b-pt-224.b16.npz")
    with zipfile.ZipFile(npz_path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, shape in big_vision_shapes().items():
            array = random_bf16(shape, rng).view("V2")  # As the released files store bf16.
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                npy_format.write_array(member, array, allow_pickle=False)
    print("wrote", npz_path, os.path.getsize(npz_path) / 2**30, "GiB")

    from safetensors.numpy import save_file

    hf_dir = os.path.join(directory, "hf")
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(HF_CONFIG, f)
    names = list(hf_shapes().items())
    shards = [names[i::3] for i in range(3)]
    for index, shard in enumerate(shards):
        path = os.path.join(hf_dir, f"model-{index + 1:05d}-of-00003.safetensors")
        save_file({name: random_bf16(shape, rng) for name, shape in shard}, path)
        print("wrote", path)

    if keras_hub_too:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras_hub

        backbone = keras_hub.models.PaliGemmaBackbone(
            vocabulary_size=V,
            image_size=224,
            num_layers=L,
            num_query_heads=N,
            num_key_value_heads=K,
            hidden_dim=D,
            intermediate_dim=2 * F,
            head_dim=H,
            vit_patch_size=14,
            vit_num_heads=VH,
            vit_hidden_dim=W,
            vit_num_layers=VL,
            vit_intermediate_dim=M,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            attention_logit_soft_cap=50.0,
            final_logit_soft_cap=30.0,
            query_head_dim_normalize=True,
            dtype="bfloat16",
        )
        backbone.save_to_preset(os.path.join(directory, "keras_hub"))
        print("wrote", os.path.join(directory, "keras_hub"))


CHILD = r"""
import json, os, resource, sys, time
os.environ["KERAS_BACKEND"] = "jax"
import jax, keras, keras_hub, numpy
from keras_paligemma2 import PaliGemma2Backbone
kind, path = sys.argv[1], sys.argv[2]
quantization = sys.argv[3] if len(sys.argv) > 3 else None
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
if kind == "floor":
    # The least any loader must do: read the bytes into new memory it keeps
    # (64 MiB anonymous maps, two threads, around the page cache where the
    # file system allows, as our loader reads).
    import mmap, threading
    keep, chunk = [], 64 << 20
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    spans = [(name, offset) for name in files for offset in range(0, os.path.getsize(name), chunk)]
    def read(part):
        for name, offset in part:
            try:
                fd = os.open(name, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                fd = os.open(name, os.O_RDONLY)
            buffer = mmap.mmap(-1, chunk)
            view, done = memoryview(buffer), 0
            while done < chunk:
                count = os.preadv(fd, [view[done:]], offset + done)
                if not count:
                    break
                done += count
            view.release()
            os.close(fd)
            keep.append(buffer)
    threads = [threading.Thread(target=read, args=(spans[i::2],)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(json.dumps({"seconds": time.perf_counter() - start, "baseline": baseline,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "params": 0}))
    sys.exit()
if kind == "keras_hub_native":
    model = keras_hub.models.PaliGemmaBackbone.from_preset(path, dtype="bfloat16")
else:
    model = PaliGemma2Backbone.from_preset(path, dtype="bfloat16", quantization=quantization)
jax.block_until_ready([v.value for v in model.weights])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": peak,
                  "params": sum(int(numpy.prod(v.shape)) for v in model.weights),
                  "model_bytes": sum(v.value.nbytes for v in model.weights)}))
"""


def drop_page_cache():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def files_of(path):
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path))]
    return [path]


def measure(directory, with_keras_hub=True, only=None):
    cases = [
        (
            "floor: read the .npz into new memory",
            "floor",
            os.path.join(directory, "paligemma2-3b-pt-224.b16.npz"),
        ),
        ("big_vision .b16.npz", "ours", os.path.join(directory, "paligemma2-3b-pt-224.b16.npz")),
        ("HF safetensors (3 shards)", "ours", os.path.join(directory, "hf")),
    ]
    if with_keras_hub and os.path.isdir(os.path.join(directory, "keras_hub")):
        cases.append(("keras-hub preset, into ours", "ours", os.path.join(directory, "keras_hub")))
        cases.append(
            (
                "keras-hub preset, keras-hub itself",
                "keras_hub_native",
                os.path.join(directory, "keras_hub"),
            )
        )
    if only:
        cases = [c for c in cases if only in c[0]]
    rows = []
    for label, kind, path in cases:
        size = sum(os.path.getsize(f) for f in files_of(path))
        dropped = drop_page_cache()
        start = time.perf_counter()
        for f in files_of(path):
            subprocess.run(f"cat '{f}' > /dev/null", shell=True, check=True)
        cold_read = time.perf_counter() - start
        start = time.perf_counter()
        for f in files_of(path):
            subprocess.run(f"cat '{f}' > /dev/null", shell=True, check=True)
        warm_read = time.perf_counter() - start
        dropped_again = drop_page_cache()
        out = (
            subprocess.run(
                [sys.executable, "-c", CHILD, kind, path],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        result = json.loads(out)
        above = result["peak"] - result["baseline"]
        rows.append(
            (label, size, cold_read, warm_read, result["seconds"], above, dropped and dropped_again)
        )
        print(
            f"{label}: {size / 2**30:.2f} GiB, cat {cold_read:.1f} s cold / {warm_read:.1f} s warm, "
            f"load {result['seconds']:.1f} s ({result['seconds'] / cold_read:.2f}x cold read), "
            f"peak RSS above baseline {above / 2**30:.2f} GiB ({above / size:.2f}x file), "
            f"page cache {'dropped' if dropped else 'NOT dropped'}, params {result['params']:,}",
            flush=True,
        )
    return rows


def time_one(path, warm=False, quantization=None):
    dropped = warm or drop_page_cache()
    out = (
        subprocess.run(
            [sys.executable, "-c", CHILD, "ours", path] + ([quantization] if quantization else []),
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    result = json.loads(out)
    above = result["peak"] - result["baseline"]
    cache = (
        "warm page cache"
        if warm
        else ("page cache dropped" if dropped else "page cache NOT dropped")
    )
    size = sum(os.path.getsize(f) for f in files_of(path))
    print(
        f"{path}{f' into {quantization}' if quantization else ''}: load {result['seconds']:.1f} s, "
        f"peak RSS above baseline {above / 2**30:.2f} GiB ({above / size:.2f}x the file's "
        f"{size / 2**30:.2f} GiB), model {result['model_bytes'] / 2**30:.2f} GiB, {cache}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["make", "measure", "time"])
    parser.add_argument(
        "directory", help="the benchmark directory (make, measure) or one checkpoint (time)"
    )
    parser.add_argument("--warm", action="store_true", help="keep the page cache (time)")
    parser.add_argument(
        "--quantization", choices=["int8", "int4"], help="load straight into int8 / int4 (time)"
    )
    parser.add_argument(
        "--keras-hub", action="store_true", help="also write a keras-hub preset (make)"
    )
    parser.add_argument(
        "--skip-keras-hub", action="store_true", help="measure only our formats (measure)"
    )
    parser.add_argument(
        "--only", help="measure only the cases whose label contains this text (measure)"
    )
    args = parser.parse_args()
    if args.command == "make":
        make(args.directory, args.keras_hub)
    elif args.command == "time":
        time_one(args.directory, args.warm, args.quantization)
    else:
        measure(args.directory, with_keras_hub=not args.skip_keras_hub, only=args.only)


if __name__ == "__main__":
    main()
