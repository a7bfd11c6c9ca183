"""The memory planner: bytes per device for a config, mesh and mode, and `auto_distribution`."""

import dataclasses

import jax
import keras

from keras_paligemma2.distribution.meshes import meshes
from keras_paligemma2.distribution.meshes import model_parallel
from keras_paligemma2.distribution.meshes import model_weights
from keras_paligemma2.distribution.meshes import resolve_config
from keras_paligemma2.layers import projections
from keras_paligemma2.layers.remat import remat_policy
from keras_paligemma2.models.layouts import FSDP_MIN_SIZE  # noqa: F401 (part of this module's API)
from keras_paligemma2.models.layouts import MODEL_PREFERENCES  # noqa: F401
from keras_paligemma2.models.layouts import PathLayoutMap  # noqa: F401
from keras_paligemma2.models.layouts import element_count
from keras_paligemma2.models.layouts import variable_layout  # noqa: F401
from keras_paligemma2.utils.errors import InputError

# --- Memory planner ---------------------------------------------------------

MODES = ("inference", "lora", "full")
# Inference (prefill): bytes per token of one block's transients, fitted to
# XLA's accounting of a forward pass: the residual stream and norms (~4 D),
# the MLP (~3 F), the attention projections, RoPE and output (~12 N H) and
# the attention logits and probabilities (~4 N T, float32).
_RESIDUAL, _MLP, _HEADS, _SCORES = 4.0, 3.0, 12.4, 4.2


@dataclasses.dataclass
class Plan:
    """Bytes per device, by kind. `activations` is `saved_activations` (what
    the backward pass keeps: JAX's saved residuals of the step) plus
    `transient` (the largest working set on top of them: one block's
    recompute, the logits' gradient, a dequantised kernel)."""

    mesh_shape: tuple
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    kv_cache: int
    saved_activations: int = 0
    transient: int = 0

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
    return {"bfloat16": 2, "float16": 2, "float32": 4, None: 4}[dtype]


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
    quantization=None,
    quantize_vision=False,
    loss_chunk_size=None,
    mu_dtype=None,
):
    """Per-device memory of running `config` on a ("batch", "model") mesh.

    Args:
        config: a backbone config dict or a registered preset name.
        mesh_shape: (data, model) axis sizes.
        mode: "inference" (generate: weights, KV cache for the prompt plus
            `max_new_tokens`, prefill activations), "lora" (rank
            `lora_rank` adapters on the decoder attention and MLP, float32,
            Adam) or "full" (every weight trains, Adam).
        batch_size: int, global batch; split over the data axis.
        sequence_length: int, text tokens per example (image tokens come on top).
        dtype: the weights' dtype ("bfloat16", "float32", or
            "mixed_bfloat16": float32 weights, bfloat16 compute).
        lora_rank: int, the adapters' rank for mode "lora" (default 8).
        fsdp: shard weights over the data axis too; default True for
            training on a mesh with a data axis, False for inference.
        remat: as `PaliGemma2CausalLM.compile`: False, True / "block" or
            "matmuls".
        max_new_tokens: int, generated tokens the KV cache holds for mode
            "inference" (default 64).
        quantization: None, "int8" or "int4": the decoder's projection
            kernels in Keras' quantised form (`backbone.quantize(mode,
            filters=lambda layer: layer.path.startswith("decoder_block"))`);
            inference or LoRA only.
        quantize_vision: bool; the ViT's and the image projection's kernels
            quantised too (`backbone.quantize(mode)` without filters).
        loss_chunk_size: None or int, as `compile(loss_chunk_size=)`: the
            loss's logits formed this many tokens at a time.
        mu_dtype: None or "bfloat16": Adam's first moment stored in that
            dtype (`BigVisionAdam(mu_dtype=)`).

    Returns:
        A `Plan` of bytes per device.

    Parameter bytes are exact (the layouts of `layout_map`; quantised
    kernels as Keras stores them). Saved activations are counted per block
    from the tensors JAX keeps for this implementation's backward pass
    (`jax._src.ad_checkpoint.saved_residuals`, within 15% in the tests);
    transients are an estimate.
    """
    config = resolve_config(config)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}; got {mode!r}.")
    projections.check_quantization(quantization)
    if quantization and mode == "full":
        raise InputError(
            "Quantised weights do not train: use mode='lora' on a quantised base, "
            "or quantization=None for full fine-tuning."
        )
    policy = remat_policy(remat)
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
        quantized = quantization and _is_quantized(path, quantize_vision)
        size = _quantized_bytes(path, shape, quantization, weight_bytes) if quantized else None
        parameters += (size if quantized else element_count(shape) * weight_bytes) // split
    gradients = optimizer_state = 0
    # Adam's moments in the weights' dtype, the first in `mu_dtype` if given.
    moment_bytes = weight_bytes + (_itemsize(mu_dtype) if mu_dtype else weight_bytes)
    if mode == "full":
        gradients = parameters
        optimizer_state = parameters // weight_bytes * moment_bytes
    elif mode == "lora":
        lora = _lora_parameters(config, lora_rank)  # float32, replicated
        gradients, parameters = lora * 4, parameters + lora * 4
        optimizer_state = lora * (4 + _itemsize(mu_dtype or "float32"))
    local_batch = -(-batch_size // data)
    kv_cache = saved = transient = 0
    if mode == "inference":
        activations = _prefill_bytes(config, local_batch, sequence_length, model, compute_bytes)
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
        if quantization:
            activations += _largest_kernel(config) * compute_bytes // model  # dequantised
    else:
        saved, transient = _training_activations(
            config,
            mode,
            local_batch,
            sequence_length,
            model,
            compute_bytes,
            policy,
            loss_chunk_size,
            lora_rank,
        )
        if quantization:
            transient += _largest_kernel(config) * compute_bytes // model
        activations = saved + transient
    return Plan(
        (data, model),
        int(parameters),
        int(gradients),
        int(optimizer_state),
        int(activations),
        int(kv_cache),
        int(saved),
        int(transient),
    )


_PROJECTION_KERNELS = (
    "attention/query/",
    "attention/key/",
    "attention/value/",
    "attention/output/",
)


def _is_quantized(path, quantize_vision):
    """Whether Keras' quantize turns this weight into integers."""
    layer_path, name = path.rsplit("/", 1)
    return name == "kernel" and projections.is_quantized(layer_path, quantize_vision)


_INT4_GROUP = 128


def _quantized_bytes(path, shape, mode, scale_bytes):
    """Bytes of a kernel in Keras' quantised form: int8 values and a scale
    (in the weights' dtype) per output; int4 two values per byte, a scale and
    an int8 zero point per output and group of 128 inputs, and a float32
    group index per input."""
    if "attention/output/" in path:
        inputs = element_count(shape[:-1])
    elif "attention/" in path and path.startswith("decoder_block"):
        inputs = shape[1]  # (N, D, H)
    else:
        inputs = shape[0]  # Dense (in, out); ViT query/key/value (W, N, H)
    outputs = element_count(shape) // inputs
    if mode == "int8":
        return element_count(shape) + scale_bytes * outputs
    groups = -(-inputs // _INT4_GROUP)  # Keras' int4 scales each 128 inputs apart.
    return -(-outputs // 2) * inputs + (scale_bytes + 1) * groups * outputs + 4 * inputs


def _largest_kernel(config):
    """Elements of the largest decoder kernel (an MLP one), which a quantised
    layer's backward pass dequantises whole."""
    return config["hidden_dim"] * config["intermediate_dim"]


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
    """Transients of one block's forward pass for `tokens` tokens."""
    sharded = _MLP * mlp + _HEADS * heads * head_dim + _SCORES * heads * keys * 4 / itemsize
    return tokens * (_RESIDUAL * width + sharded / model) * itemsize


def _prefill_bytes(config, batch, text, model, itemsize):
    patches = (config["image_size"] // config["patch_size"]) ** 2 * config.get("num_images", 1)
    seq = patches + text
    decoder = _block_bytes(
        batch * seq,
        config["hidden_dim"],
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
    # One block's transients at a time; logits of the last position.
    return max(decoder, vit) + batch * config["vocabulary_size"] * 4


def _decoder_saved_per_token(config, keys, c, policy, lora, model):
    """Bytes one decoder block keeps per token for the backward pass (JAX's
    saved residuals of this implementation, counted by tensor):
    policy None: the GeGLU's gate, up, tanh and products (8 F, compute
    dtype), the RMSNorms' float32 inputs and outputs (8 D float32 with LoRA,
    12 D when the norms' scales train, + 2 D), the attention's float32
    logits, soft cap, mask, probabilities (4 x 4 bytes + a bool + the
    compute-dtype copy per key and head), queries, keys and values (2 N H +
    2 K H) and RoPE's float32 sines and cosines (8 H bytes);
    "matmuls": only the projections' outputs (doubled with LoRA, whose
    adapter outputs are kept too) and the block input; "block": the block
    input alone."""
    d, f = config["hidden_dim"], config["intermediate_dim"]
    n, k, h = config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]
    if policy == "block":
        return d * c
    if policy == "matmuls":
        copies = 2 if lora else 1
        return (copies * (2 * f / model + 2 * d + (2 * k * h + n * h) / model) + d) * c
    norms = (32 if lora else 48) * d + 2 * d * c
    sharded = 8 * f * c + n * keys * (17 + c) + (2 * n * h + 2 * k * h) * c + 8 * h
    return norms + sharded / model


def _vit_saved_per_token(config, patches, c, policy, model):
    """As `_decoder_saved_per_token`, for a ViT block that trains: the MLP
    (6 F_v), the LayerNorms' float32 statistics (24 W + 2 W), the attention
    probabilities (4 + 2 c per key and head) and heads (3 W)."""
    w, f, heads = config["vit_hidden_dim"], config["vit_intermediate_dim"], config["vit_num_heads"]
    if policy == "block":
        return w * c
    if policy == "matmuls":
        return (f / model + 5 * w) * c
    return 24 * w + 2 * w * c + (6 * f * c + heads * patches * (4 + 2 * c) + 3 * w * c) / model


def _training_activations(config, mode, batch, text, model, c, policy, chunk, rank):
    """(saved, transient) bytes of a training step (see `plan`)."""
    patches = (config["image_size"] // config["patch_size"]) ** 2 * config.get("num_images", 1)
    seq = patches + text
    d, layers, vocabulary = config["hidden_dim"], config["num_layers"], config["vocabulary_size"]
    lora = mode == "lora"
    per_token = _decoder_saved_per_token(config, seq, c, policy, lora, model)
    saved = layers * batch * seq * per_token
    saved += batch * seq * 8 * d  # the final norm's float32 input and output
    if chunk:
        saved += batch * text * d * c  # each chunk's hidden states, its only input
        logits = 3 * min(chunk, batch * text) * vocabulary * 4 / model
    else:
        saved += batch * text * vocabulary * 4 / model  # float32 softmax of the logits
        logits = batch * text * vocabulary * 4 / model  # their gradient
    if mode == "full":  # The ViT trains: its blocks, input pixels and final norm.
        vit = _vit_saved_per_token(config, patches, c, policy, model)
        saved += config["vit_num_layers"] * batch * patches * vit
        saved += (
            batch * config["image_size"] ** 2 * 3 * 4
            + batch * patches * 8 * config["vit_hidden_dim"]
        )
    # The largest working set on top: a block rebuilt (or its backward) or
    # the logits' gradient.
    block = batch * seq * _decoder_saved_per_token(config, seq, c, None, lora, model)
    return saved, max(block, logits)


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
