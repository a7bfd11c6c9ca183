"""The memory planner: bytes per device for a config, mesh and mode, and `auto_distribution`."""

import dataclasses

import jax
import keras

from keras_paligemma2.distribution.meshes import meshes
from keras_paligemma2.distribution.meshes import model_parallel
from keras_paligemma2.distribution.meshes import model_weights
from keras_paligemma2.distribution.meshes import resolve_config
from keras_paligemma2.models.layouts import FSDP_MIN_SIZE  # noqa: F401 (part of this module's API)
from keras_paligemma2.models.layouts import MODEL_PREFERENCES  # noqa: F401
from keras_paligemma2.models.layouts import PathLayoutMap  # noqa: F401
from keras_paligemma2.models.layouts import element_count
from keras_paligemma2.models.layouts import variable_layout  # noqa: F401
from keras_paligemma2.utils.errors import InputError

# --- Memory planner ---------------------------------------------------------

MODES = ("inference", "lora", "full")
# Bytes of saved activations per token, per block, fitted to XLA's own
# accounting of a training step (`compiled.memory_analysis()`, CPU): the
# residual stream and norms (~4 D), the MLP (~3 F), the attention
# projections, RoPE and output (~12 N H) and the attention logits and
# probabilities (~4 N T, float32).
_RESIDUAL, _MLP, _HEADS, _SCORES = 4.0, 3.0, 12.4, 4.2


@dataclasses.dataclass
class Plan:
    """Bytes per device, by kind."""

    mesh_shape: tuple
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    kv_cache: int

    @property
    def total(self):
        return (
            self.parameters
            + self.gradients
            + self.optimizer_state
            + self.activations
            + self.kv_cache
        )

    def __str__(self):
        gib = 2**30
        parts = ", ".join(
            f"{k.replace('_', ' ')} {getattr(self, k) / gib:.2f}"
            for k in ("parameters", "gradients", "optimizer_state", "activations", "kv_cache")
        )
        return f"mesh {self.mesh_shape}: {self.total / gib:.2f} GiB per device ({parts})"


def _itemsize(dtype):
    return 2 if dtype in ("bfloat16", "float16") else 4


def plan(
    config,
    mesh_shape=(1, 1),
    mode="inference",
    batch_size=1,
    sequence_length=64,
    dtype="bfloat16",
    lora_rank=8,
    fsdp=None,
    remat=False,
    max_new_tokens=64,
):
    """Per-device memory of running `config` on a ("batch", "model") mesh.

    Args:
        config: a backbone config dict or a registered preset name.
        mesh_shape: (data, model) axis sizes.
        mode: "inference" (generate: weights, KV cache for the prompt plus
            `max_new_tokens`, prefill activations), "lora" (rank
            `lora_rank` adapters on the decoder attention and MLP, Adam) or
            "full" (every weight trains, Adam).
        batch_size: int, global batch; split over the data axis.
        sequence_length: int, text tokens per example (image tokens come on top).
        dtype: the weights' dtype ("bfloat16", "float32", or
            "mixed_bfloat16": float32 weights, bfloat16 compute).
        fsdp: shard weights over the data axis too; default True for
            training on a mesh with a data axis, False for inference.
        lora_rank: int, the adapters' rank for mode "lora" (default 8).
        remat: training recomputes each block in the backward pass.
        max_new_tokens: int, generated tokens the KV cache holds for mode
            "inference" (default 64).

    Returns:
        A `Plan` of bytes per device.

    Parameter bytes are exact (the layouts of `layout_map`); activations are
    an estimate fitted to XLA's accounting (within 30% in the tests).
    """
    config = resolve_config(config)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}; got {mode!r}.")
    data, model = (int(s) for s in mesh_shape)
    if fsdp is None:
        fsdp = mode != "inference" and data > 1
    sizes = {"batch": data, "model": model}
    weight_bytes = _itemsize("float32" if dtype == "mixed_bfloat16" else dtype)
    compute_bytes = _itemsize("bfloat16" if dtype == "mixed_bfloat16" else dtype)
    parameters = 0
    for path, shape in model_weights(config):
        layout = variable_layout(path, shape, sizes, fsdp=fsdp)
        split = 1
        for axis in layout:
            split *= sizes[axis] if axis else 1
        parameters += element_count(shape) // split * weight_bytes
    gradients = optimizer_state = 0
    if mode == "full":
        gradients = parameters
        optimizer_state = 2 * parameters  # Adam's two moments, in the weights' dtype
    elif mode == "lora":
        lora = _lora_parameters(config, lora_rank) * 4  # float32, replicated
        gradients, optimizer_state = lora, 2 * lora
        parameters += lora
    local_batch = -(-batch_size // data)
    activations = _activations(
        config, mode, local_batch, sequence_length, model, compute_bytes, remat
    )
    kv_cache = 0
    if mode == "inference":
        patches = (config["image_size"] // config["patch_size"]) ** 2
        cache_len = patches + sequence_length + max_new_tokens
        kv = config["num_key_value_heads"] * config["head_dim"]
        kv_split = (
            model
            if (config["num_key_value_heads"] % model == 0 or config["head_dim"] % model == 0)
            else 1
        )
        kv_cache = (
            2 * config["num_layers"] * local_batch * cache_len * kv * compute_bytes // kv_split
        )
    return Plan(
        (data, model),
        int(parameters),
        int(gradients),
        int(optimizer_state),
        int(activations),
        int(kv_cache),
    )


def _lora_parameters(config, rank):
    d, f, layers = config["hidden_dim"], config["intermediate_dim"], config["num_layers"]
    n, k, h = config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]
    per_layer = (
        (n * d * rank + rank * h)  # query (N, D, H): A (N, D, r), B (r, H)
        + 2 * (k * d * rank + rank * h)  # key, value
        + (n * h * rank + rank * d)  # output (N, H, D)
        + 2 * (d * rank + rank * f)  # gate, up (D, F)
        + (f * rank + rank * d)  # down (F, D)
    )
    return layers * per_layer


def _block_bytes(tokens, width, mlp, heads, head_dim, keys, model, itemsize):
    """Saved activations of one block for `tokens` tokens."""
    sharded = _MLP * mlp + _HEADS * heads * head_dim + _SCORES * heads * keys * 4 / itemsize
    return tokens * (_RESIDUAL * width + sharded / model) * itemsize


def _activations(config, mode, batch, text, model, itemsize, remat):
    patches = (config["image_size"] // config["patch_size"]) ** 2 * config.get("num_images", 1)
    seq = patches + text
    d, layers = config["hidden_dim"], config["num_layers"]
    decoder = _block_bytes(
        batch * seq,
        d,
        config["intermediate_dim"],
        config["num_query_heads"],
        config["head_dim"],
        seq,
        model,
        itemsize,
    )
    w = config["vit_hidden_dim"]
    vit = _block_bytes(
        batch * patches,
        w,
        config["vit_intermediate_dim"],
        config["vit_num_heads"],
        w // config["vit_num_heads"],
        patches,
        model,
        itemsize,
    )
    logits = 2 * batch * text * config["vocabulary_size"] * 4 / model
    if mode == "inference":
        # Prefill: one block's transients at a time; logits of the last position.
        return max(decoder, vit) + batch * config["vocabulary_size"] * 4
    vit_layers = config["vit_num_layers"] if mode == "full" else 1  # a frozen ViT saves nothing
    if remat:
        # Block inputs are kept; one block's activations are rebuilt at a time.
        return layers * batch * seq * d * itemsize + decoder + vit + logits
    return layers * decoder + vit_layers * vit + logits


def auto_distribution(
    config,
    mode="inference",
    batch_size=1,
    sequence_length=64,
    dtype="bfloat16",
    devices=None,
    device_memory=None,
    headroom=0.9,
    **plan_kwargs,
):
    """Chooses a ("batch", "model") mesh for the devices present.

    Tries every mesh that uses all devices, from the most data-parallel to
    the most model-parallel, and returns `(distribution, plan)` for the
    first whose plan fits `headroom` x `device_memory` bytes per device (by
    default the memory JAX reports for the first device). If none fits,
    raises a ValueError saying what would: more devices, LoRA, remat.

    Args:
        config: a backbone config dict or a registered preset name.
        mode: "inference" (default), "lora" or "full", as `plan` takes.
        batch_size: int, global batch (default 1); the data axis must divide it.
        sequence_length: int, text tokens per example (default 64).
        dtype: str, the weights' dtype as `plan` takes (default "bfloat16").
        devices: list of Keras device names or None (every device).
        device_memory: int or None, bytes per device; None asks JAX (its
            `bytes_limit`; a ValueError where JAX does not report it).
        headroom: float, the share of `device_memory` a plan may use (0.9).
        **plan_kwargs: passed to `plan` (`lora_rank`, `fsdp`, `remat`,
            `max_new_tokens`).

    Returns:
        `(keras.distribution.ModelParallel, Plan)` of the chosen mesh.
    """

    devices = list(devices or keras.distribution.list_devices())
    if device_memory is None:
        first = jax.devices()[0]
        device_memory = (first.memory_stats() or {}).get("bytes_limit")
        if device_memory is None:
            raise InputError(
                f"JAX does not report the memory of {first.platform} devices; pass device_memory=bytes."
            )
    budget = headroom * device_memory
    shapes = meshes(len(devices), batch_size)
    plans = [
        plan(config, shape, mode, batch_size, sequence_length, dtype, **plan_kwargs)
        for shape in shapes
    ]
    for candidate in plans:
        if candidate.total <= budget:
            fsdp = plan_kwargs.get("fsdp")
            fsdp = mode != "inference" and candidate.mesh_shape[0] > 1 if fsdp is None else fsdp
            return model_parallel(config, candidate.mesh_shape, devices, fsdp=fsdp), candidate
    best = min(plans, key=lambda p: p.total)
    hints = []
    for count in (2, 4, 8, 16, 32, 64, 128, 256):
        more = len(devices) * count
        if any(
            plan(config, s, mode, batch_size, sequence_length, dtype, **plan_kwargs).total <= budget
            for s in meshes(more, batch_size)
        ):
            hints.append(f"{more} such devices")
            break
    if mode == "full":
        hints.append("LoRA (mode='lora')")
    if mode != "inference" and not plan_kwargs.get("remat"):
        hints.append("remat=True")
    if batch_size > 1:
        hints.append("a smaller batch")
    raise InputError(
        f"{mode} with batch {batch_size} does not fit {len(devices)} device(s) of "
        f"{device_memory / 2**30:.1f} GiB: the best layout needs {best}. "
        f"What could fit: {', or '.join(hints) or 'nothing simple'}."
    )
