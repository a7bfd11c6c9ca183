"""keras-hub `PaliGemmaBackbone` presets (local directories or `kaggle://` handles).

keras-hub loads its own preset (its `from_preset` reads the weights file);
this table then moves each variable into ours. keras-hub keeps the ViT
projections flat (W, W) where ours split heads (W, N, H), and calls the
GeGLU halves `ffw_gating` (through GELU) and `ffw_gating_2`.

Config fixes on the way in: keras-hub's PaliGemma 2 28B presets scale queries
by 1/sqrt(head_dim) = 1/sqrt(128) (`query_head_dim_normalize=True`), while
the weights were trained with 1/sqrt(144); a 28B-shaped preset gets 144.
Its soft-caps and sliding window are kept (keras-hub applies the final
soft-cap to every logit); override them in `from_preset` if needed.
"""

import collections

import numpy as np

from keras_paligemma2.checkpoints import presets
from keras_paligemma2.checkpoints.assignment import Rule
from keras_paligemma2.utils.keras_internals import release_value
from keras_paligemma2.utils.tensor_files import CheckpointError
from keras_paligemma2.utils.tensor_files import LazyTensor

VIT = "image_encoder/"

# (ours inside `vision_encoder/block_{i}/`, keras-hub's inside
# `image_encoder/encoder_block_{i}/`, kind): kind "in"/"in_bias"/"out"
# reshapes the flat attention projections.
VIT_BLOCK = (
    ("attention_norm/gamma", "layer_norm_1/gamma", None),
    ("attention_norm/beta", "layer_norm_1/beta", None),
    ("attention/query/kernel", "multi_head_attention/query_proj/kernel", "in"),
    ("attention/query/bias", "multi_head_attention/query_proj/bias", "in_bias"),
    ("attention/key/kernel", "multi_head_attention/key_proj/kernel", "in"),
    ("attention/key/bias", "multi_head_attention/key_proj/bias", "in_bias"),
    ("attention/value/kernel", "multi_head_attention/value_proj/kernel", "in"),
    ("attention/value/bias", "multi_head_attention/value_proj/bias", "in_bias"),
    ("attention/output/kernel", "multi_head_attention/out_proj/kernel", "out"),
    ("attention/output/bias", "multi_head_attention/out_proj/bias", None),
    ("mlp_norm/gamma", "layer_norm_2/gamma", None),
    ("mlp_norm/beta", "layer_norm_2/beta", None),
    ("mlp_in/kernel", "mlp_dense_1/kernel", None),
    ("mlp_in/bias", "mlp_dense_1/bias", None),
    ("mlp_out/kernel", "mlp_dense_2/kernel", None),
    ("mlp_out/bias", "mlp_dense_2/bias", None),
)

# (ours, keras-hub's), both inside `decoder_block_{i}/`.
DECODER_BLOCK = (
    ("pre_attention_norm/scale", "pre_attention_norm/scale"),
    ("attention/query/kernel", "attention/query/kernel"),
    ("attention/key/kernel", "attention/key/kernel"),
    ("attention/value/kernel", "attention/value/kernel"),
    ("attention/output/kernel", "attention/attention_output/kernel"),
    ("post_attention_norm/scale", "post_attention_norm/scale"),
    ("pre_ffw_norm/scale", "pre_ffw_norm/scale"),
    ("mlp/gate/kernel", "ffw_gating/kernel"),
    ("mlp/up/kernel", "ffw_gating_2/kernel"),
    ("mlp/down/kernel", "ffw_linear/kernel"),
    ("post_ffw_norm/scale", "post_ffw_norm/scale"),
)


def is_keras_hub_paligemma(backbone):
    """Whether `backbone` is a keras-hub `PaliGemmaBackbone` (by class name).

    Args:
        backbone: any object, typically a keras-hub backbone.
    """
    return type(backbone).__name__ == "PaliGemmaBackbone"


def infer_config(keras_hub_config, source_name):
    """Our backbone config from a keras-hub `PaliGemmaBackbone` config.

    Args:
        keras_hub_config: dict, keras-hub's `get_config()` as saved in the
            preset's `config.json` (its `"config"` entry).
        source_name: str, the preset, for error messages.

    Returns:
        A dict of `PaliGemma2Backbone` constructor arguments; a
        `CheckpointError` for a PaliGemma 1 preset.
    """
    c = keras_hub_config
    if not (c.get("use_post_ffw_norm") and c.get("use_post_attention_norm")):
        raise CheckpointError(
            f"{source_name!r} is a PaliGemma 1 (Gemma 1 decoder, no post "
            "norms) preset; only PaliGemma 2 is supported."
        )
    if c.get("intermediate_dim", 0) % 2:
        raise CheckpointError(f"{source_name!r}: odd keras-hub intermediate_dim.")
    config = dict(
        image_size=c["image_size"],
        patch_size=c["vit_patch_size"],
        vit_hidden_dim=c["vit_hidden_dim"],
        vit_num_layers=c["vit_num_layers"],
        vit_num_heads=c["vit_num_heads"],
        vit_intermediate_dim=c.get("vit_intermediate_dim") or 4 * c["vit_hidden_dim"],
        vocabulary_size=c["vocabulary_size"],
        num_layers=c["num_layers"],
        hidden_dim=c["hidden_dim"],
        num_query_heads=c["num_query_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        # keras-hub counts both GeGLU halves; ours is the width of each.
        intermediate_dim=c["intermediate_dim"] // 2,
        attention_logit_soft_cap=c.get("attention_logit_soft_cap"),
        final_logit_soft_cap=c.get("final_logit_soft_cap"),
        sliding_window_size=(
            c.get("sliding_window_size", 4096) if c.get("use_sliding_window_attention") else None
        ),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
    )
    if c.get("query_head_dim_normalize", True):
        config["query_pre_attn_scalar"] = c["head_dim"]
    else:
        config["query_pre_attn_scalar"] = c["hidden_dim"] // c["num_query_heads"]
    size = presets.known_decoder(config)
    if size is not None:  # The released sizes: big_vision's scale, always.
        config["query_pre_attn_scalar"] = presets.DECODERS[size]["query_pre_attn_scalar"]
    return config


def read_tensors(keras_hub_backbone, table=None):
    """keras-hub's variables by path, as `LazyTensor`s.

    With the rule `table` that will read them, each variable's value is
    dropped after the last rule using it has read it (the keras-hub model is
    a temporary: this keeps one model's worth of memory, not two).

    Args:
        keras_hub_backbone: a keras-hub `PaliGemmaBackbone` with its weights loaded.
        table: list of `Rule`s or None; None keeps every value (nothing released).
    """
    uses = collections.Counter(rule.source for rule in table or ())

    def read(variable):
        value = np.asarray(variable)
        if table is not None:
            uses[variable.path] -= 1
            if uses[variable.path] <= 0:
                release_value(variable)
        return value

    return {
        v.path: LazyTensor(v.shape, v.dtype, lambda v=v: read(v))
        for v in keras_hub_backbone.weights
    }


def rules(config):
    """The full table from keras-hub variable paths to ours.

    Args:
        config: dict, the backbone config (`PaliGemma2Backbone.get_config()`).

    Returns:
        A list of `Rule`s, one per variable of the backbone.
    """
    width = config["vit_hidden_dim"]
    heads = config["vit_num_heads"]
    head_dim = width // heads
    reshapes = {
        None: lambda x: x,
        "in": lambda x: x.reshape(width, heads, head_dim),
        "in_bias": lambda x: x.reshape(heads, head_dim),
        "out": lambda x: x.reshape(heads, head_dim, width),
    }
    embeddings = VIT + "encoder_embeddings/"
    table = [
        Rule("vision_encoder/patch_embedding/kernel", embeddings + "embedding_conv/kernel"),
        Rule("vision_encoder/patch_embedding/bias", embeddings + "embedding_conv/bias"),
        Rule("vision_encoder/position_embedding", embeddings + "position_embedding/embeddings"),
        Rule("vision_encoder/encoder_norm/gamma", VIT + "encoder_layer_norm/gamma"),
        Rule("vision_encoder/encoder_norm/beta", VIT + "encoder_layer_norm/beta"),
        Rule("image_projection/kernel", "image_classifier/kernel"),
        Rule("image_projection/bias", "image_classifier/bias"),
        Rule("token_embedding/embeddings", "token_embedding/embeddings"),
        Rule("final_norm/scale", "final_normalization/scale"),
    ]
    for i in range(config["vit_num_layers"]):
        for ours, theirs, kind in VIT_BLOCK:
            table.append(
                Rule(
                    f"vision_encoder/block_{i}/{ours}",
                    f"{VIT}encoder_block_{i}/{theirs}",
                    reshapes[kind],
                )
            )
    for i in range(config["num_layers"]):
        for ours, theirs in DECODER_BLOCK:
            table.append(Rule(f"decoder_block_{i}/{ours}", f"decoder_block_{i}/{theirs}"))
    return table
