"""big_vision PaliGemma checkpoints (`paligemma2-*.b16.npz` and float32 `.npz`).

Flat keys joined by `/` (usually under `params/`), layers stacked along a
leading axis. Layouts equal ours except where noted in the table, so most
rules only pick one layer. Default semantics for these files are
big_vision's: no sliding window, no final soft-cap on scoring logits.
"""

import re
import warnings
import zipfile

import ml_dtypes
import numpy as np

from keras_paligemma2.checkpoints import presets
from keras_paligemma2.checkpoints.assignment import Rule
from keras_paligemma2.checkpoints.assignment import float_values
from keras_paligemma2.checkpoints.assignment import layer_slice
from keras_paligemma2.utils.files import atomic_file
from keras_paligemma2.utils.tensor_files import CheckpointError

VIT = "img/Transformer/encoderblock/"
LLM = "llm/layers/"

# (our path inside `vision_encoder/block_{i}/`, big_vision key under VIT)
VIT_BLOCK = (
    ("attention_norm/gamma", "LayerNorm_0/scale"),
    ("attention_norm/beta", "LayerNorm_0/bias"),
    ("attention/query/kernel", "MultiHeadDotProductAttention_0/query/kernel"),
    ("attention/query/bias", "MultiHeadDotProductAttention_0/query/bias"),
    ("attention/key/kernel", "MultiHeadDotProductAttention_0/key/kernel"),
    ("attention/key/bias", "MultiHeadDotProductAttention_0/key/bias"),
    ("attention/value/kernel", "MultiHeadDotProductAttention_0/value/kernel"),
    ("attention/value/bias", "MultiHeadDotProductAttention_0/value/bias"),
    ("attention/output/kernel", "MultiHeadDotProductAttention_0/out/kernel"),
    ("attention/output/bias", "MultiHeadDotProductAttention_0/out/bias"),
    ("mlp_norm/gamma", "LayerNorm_1/scale"),
    ("mlp_norm/beta", "LayerNorm_1/bias"),
    ("mlp_in/kernel", "MlpBlock_0/Dense_0/kernel"),
    ("mlp_in/bias", "MlpBlock_0/Dense_0/bias"),
    ("mlp_out/kernel", "MlpBlock_0/Dense_1/kernel"),
    ("mlp_out/bias", "MlpBlock_0/Dense_1/bias"),
)

# (our path inside `decoder_block_{i}/`, big_vision key under LLM, index
# into the packed tensor or None). kv_einsum packs [0]=key, [1]=value;
# gating_einsum packs [0]=gate (through GELU), [1]=up.
DECODER_BLOCK = (
    ("pre_attention_norm/scale", "pre_attention_norm/scale", None),
    ("attention/query/kernel", "attn/q_einsum/w", None),
    ("attention/key/kernel", "attn/kv_einsum/w", 0),
    ("attention/value/kernel", "attn/kv_einsum/w", 1),
    ("attention/output/kernel", "attn/attn_vec_einsum/w", None),
    ("post_attention_norm/scale", "post_attention_norm/scale", None),
    ("pre_ffw_norm/scale", "pre_ffw_norm/scale", None),
    ("mlp/gate/kernel", "mlp/gating_einsum", 0),
    ("mlp/up/kernel", "mlp/gating_einsum", 1),
    ("mlp/down/kernel", "mlp/linear", None),
    ("post_ffw_norm/scale", "post_ffw_norm/scale", None),
)


# (our path, big_vision key) of the tensors outside the stacked blocks.
TOP_LEVEL = (
    ("vision_encoder/patch_embedding/kernel", "img/embedding/kernel"),
    ("vision_encoder/patch_embedding/bias", "img/embedding/bias"),
    ("vision_encoder/position_embedding", "img/pos_embedding"),
    ("vision_encoder/encoder_norm/gamma", "img/Transformer/encoder_norm/scale"),
    ("vision_encoder/encoder_norm/beta", "img/Transformer/encoder_norm/bias"),
    ("image_projection/kernel", "img/head/kernel"),
    ("image_projection/bias", "img/head/bias"),
    ("token_embedding/embeddings", "llm/embedder/input_embedding"),
    ("final_norm/scale", "llm/final_norm/scale"),
)


def rules(config):
    """The full table from big_vision keys to our variable paths.

    Args:
        config: dict, the backbone config (`PaliGemma2Backbone.get_config()`).

    Returns:
        A list of `Rule`s, one per variable of the backbone.
    """
    table = [
        # big_vision keeps a leading batch axis of 1 on the position
        # embedding: (1, P, W).
        Rule(
            ours, theirs, (lambda x: x[0]) if ours.endswith("position_embedding") else (lambda x: x)
        )
        for ours, theirs in TOP_LEVEL
    ]
    for i in range(config["vit_num_layers"]):
        for ours, theirs in VIT_BLOCK:
            table.append(Rule(f"vision_encoder/block_{i}/{ours}", VIT + theirs, layer_slice(i)))
    for i in range(config["num_layers"]):
        for ours, theirs, packed in DECODER_BLOCK:
            convert = layer_slice(i)
            if packed is not None:
                convert = lambda x, i=i, p=packed: x[i, p]
            table.append(Rule(f"decoder_block_{i}/{ours}", LLM + theirs, convert))
    return table


def big_vision_name(variable_path):
    """The big_vision parameter name (no `params/`, layer axis dropped) of
    one of our variable paths, or None (LoRA adapters, quantisation scales:
    nothing big_vision has). Used where big_vision selects parameters by
    name, e.g. its weight-decay mask.

    Args:
        variable_path: str, a Keras variable path, e.g.
            `decoder_block_3/attention/query/kernel` (a prefix before it is allowed).
    """
    for ours, theirs in TOP_LEVEL:
        if variable_path == ours or variable_path.endswith("/" + ours):
            return theirs
    block = re.search(r"(?:^|/)vision_encoder/block_\d+/(.+)$", variable_path)
    if block and block.group(1) in dict(VIT_BLOCK):
        return VIT + dict(VIT_BLOCK)[block.group(1)]
    block = re.search(r"(?:^|/)decoder_block_\d+/(.+)$", variable_path)
    decoder = {ours: theirs for ours, theirs, _ in DECODER_BLOCK}
    if block and block.group(1) in decoder:
        return LLM + decoder[block.group(1)]
    return None


def strip_prefix(tensors):
    """Drops the `params/` prefix the released files carry.

    Args:
        tensors: mapping from big_vision keys to `LazyTensor`s (or arrays).

    Returns:
        A new dict, keys without `params/` (unchanged if none has it).
    """
    if any(k.startswith("params/") for k in tensors):
        return {
            k[len("params/") :] if k.startswith("params/") else k: v for k, v in tensors.items()
        }
    return dict(tensors)


def infer_config(tensors, source_name):
    """Backbone config from tensor shapes, with big_vision's semantics.

    Shapes tell everything but the query scale and the soft-caps: those come
    from the matching released size when the shapes are one of 3B/10B/28B
    (28B scales queries by 1/sqrt(144)), else from Gemma 2's defaults
    (query_pre_attn_scalar = head_dim, attention soft-cap 50).

    Args:
        tensors: mapping from big_vision keys (`params/` stripped) to
            `LazyTensor`s; only shapes are read.
        source_name: str, the checkpoint's path, for error messages.

    Returns:
        A dict of `PaliGemma2Backbone` constructor arguments; a
        `CheckpointError` if the file is not a PaliGemma 2 checkpoint.
    """
    needed = {
        "img/embedding/kernel": 4,
        "img/pos_embedding": 3,
        VIT + "MultiHeadDotProductAttention_0/query/kernel": 4,
        VIT + "MlpBlock_0/Dense_0/kernel": 3,
        "llm/embedder/input_embedding": 2,
        LLM + "attn/q_einsum/w": 4,
        LLM + "attn/kv_einsum/w": 5,
        LLM + "mlp/gating_einsum": 4,
    }
    missing = [k for k in needed if k not in tensors]
    wrong_rank = [
        f"{k} {tuple(tensors[k].shape)}"
        for k, rank in needed.items()
        if k in tensors and len(tensors[k].shape) != rank
    ]
    if missing or wrong_rank:
        if LLM + "attn/qkv_einsum/w" in tensors:
            missing.append(
                "(this file packs q/k/v in `qkv_einsum`, a Gemma 1 layout "
                "with as many kv heads as query heads: not a PaliGemma 2 "
                "checkpoint)"
            )
        raise CheckpointError(
            f"{source_name!r} is not a PaliGemma 2 big_vision checkpoint: "
            f"missing {missing or 'nothing'}; unexpected ranks "
            f"{wrong_rank or 'none'}."
        )
    patch, _, _, vit_width = tensors["img/embedding/kernel"].shape
    num_patches = tensors["img/pos_embedding"].shape[1]
    side = int(round(np.sqrt(num_patches)))
    if side * side != num_patches:
        raise CheckpointError(
            f"{source_name!r}: img/pos_embedding has {num_patches} positions, "
            "not a square grid of patches."
        )
    vit_layers, _, vit_heads, _ = tensors[VIT + "MultiHeadDotProductAttention_0/query/kernel"].shape
    vit_mlp = tensors[VIT + "MlpBlock_0/Dense_0/kernel"].shape[-1]
    vocabulary, hidden = tensors["llm/embedder/input_embedding"].shape
    layers, heads, _, head_dim = tensors[LLM + "attn/q_einsum/w"].shape
    kv_heads = tensors[LLM + "attn/kv_einsum/w"].shape[2]
    intermediate = tensors[LLM + "mlp/gating_einsum"].shape[-1]
    config = dict(
        image_size=side * patch,
        patch_size=patch,
        vit_hidden_dim=vit_width,
        vit_num_layers=vit_layers,
        vit_num_heads=vit_heads,
        vit_intermediate_dim=vit_mlp,
        vocabulary_size=vocabulary,
        num_layers=layers,
        hidden_dim=hidden,
        num_query_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_dim=intermediate,
        query_pre_attn_scalar=head_dim,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=None,
        sliding_window_size=None,
    )
    size = presets.known_decoder(config)
    if size is not None:
        config["query_pre_attn_scalar"] = presets.DECODERS[size]["query_pre_attn_scalar"]
    return config


def _warn_of_lost_semantics(config):
    """A big_vision `.npz` holds weights only; what this model computes that big_vision's
    PaliGemma recipes (and our loading of such a file) do not is said, not dropped silently."""
    lost = []
    if config["final_logit_soft_cap"]:
        lost.append(
            f"the final logit soft-cap {config['final_logit_soft_cap']} (big_vision's recipes: none)"
        )
    if config["sliding_window_size"] is not None:
        lost.append(f"the sliding window {config['sliding_window_size']} (big_vision: none)")
    if config["attention_logit_soft_cap"] != 50.0:
        lost.append(f"the attention soft-cap {config['attention_logit_soft_cap']} (big_vision: 50)")
    if lost:
        warnings.warn(
            "A big_vision checkpoint carries no configuration, so this model's "
            + "; ".join(lost)
            + " is not in the file: big_vision, and from_preset on the file, compute without "
            "it. Export to transformers or a Keras preset to keep it.",
            stacklevel=3,
        )


def write_checkpoint(backbone, path):
    """Writes `backbone` as a big_vision checkpoint `.npz`: `params/` keys,
    layers stacked on a leading axis, key/value and gate/up packed as
    `paligemma.load` reads them (the inverse of `rules`), bfloat16 as
    2-byte void (as the released `.b16.npz` files). Each stacked tensor is
    written one layer slice at a time (the host holds one layer's tensor,
    not the model), to a temporary file renamed into place when complete.
    LoRA adapters are folded in as `merge_lora` folds them; the model is
    left unchanged.

    Args:
        backbone: a float `PaliGemma2Backbone` (a quantised one is refused:
            big_vision has no integer kernels).
        path: str or path-like, the `.npz` to write.
    """
    value = float_values(backbone, "big_vision")
    config = backbone.get_config()
    _warn_of_lost_semantics(config)
    # (big_vision key, number of layers or None for an unstacked tensor,
    # the tensor of layer i)
    members = [
        (
            theirs,
            None,
            lambda i, ours=ours: value(ours)[None] if "position" in ours else value(ours),
        )
        for ours, theirs in TOP_LEVEL
    ]
    for ours, theirs in VIT_BLOCK:
        members.append(
            (
                VIT + theirs,
                config["vit_num_layers"],
                lambda i, ours=ours: value(f"vision_encoder/block_{i}/{ours}"),
            )
        )
    packed = {}
    for ours, theirs, _ in DECODER_BLOCK:
        packed.setdefault(theirs, []).append(ours)
    for theirs, parts in packed.items():

        def layer(i, parts=parts):
            arrays = [value(f"decoder_block_{i}/{ours}") for ours in parts]
            return np.stack(arrays) if len(arrays) > 1 else arrays[0]

        members.append((LLM + theirs, config["num_layers"], layer))
    with atomic_file(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for key, layers, make in members:
            _write_member(archive, "params/" + key, layers, make)


def _write_member(archive, name, layers, make):
    """One `.npy` member: `make(0)` alone (`layers` None), or `make(i)` for
    each of `layers` layers stacked on a new leading axis, each written to
    the archive before the next is made."""
    first = make(0)
    shape = first.shape if layers is None else (layers, *first.shape)
    stored = np.dtype("V2") if first.dtype == ml_dtypes.bfloat16 else first.dtype
    header = {"descr": np.lib.format.dtype_to_descr(stored), "fortran_order": False, "shape": shape}
    with archive.open(name + ".npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(np.ascontiguousarray(first).view(stored).tobytes())
        del first
        for i in range(1, layers or 1):
            member.write(np.ascontiguousarray(make(i)).view(stored).tobytes())
