"""Registered presets: the released PaliGemma 2 architectures, as data.

Each preset's `config` is the `PaliGemma2Backbone` config with big_vision's
semantics (no final logit soft-cap on scoring logits, no sliding window),
since the released weights were trained with big_vision.
"""

import difflib

# Gemma 2 decoders (big_vision `models/ppp/gemma.py`, `get_config`). 28B
# scales queries by 1/sqrt(hidden_dim / num_query_heads) = 1/sqrt(144)
# (`query_pre_attn_norm="rsqrt_emb_per_head"`), the others by 1/sqrt(head_dim).
DECODERS = {
    "3b": dict(
        num_layers=26,
        hidden_dim=2304,
        num_query_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        intermediate_dim=9216,
        query_pre_attn_scalar=256,
    ),
    "10b": dict(
        num_layers=42,
        hidden_dim=3584,
        num_query_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        intermediate_dim=14336,
        query_pre_attn_scalar=256,
    ),
    "28b": dict(
        num_layers=46,
        hidden_dim=4608,
        num_query_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        intermediate_dim=36864,
        query_pre_attn_scalar=144,
    ),
}

# SigLIP So400m/14 (big_vision `models/vit.py`, variant "So400m/14").
SIGLIP_SO400M = dict(
    patch_size=14,
    vit_hidden_dim=1152,
    vit_num_layers=27,
    vit_num_heads=16,
    vit_intermediate_dim=4304,
)

COMMON = dict(
    vocabulary_size=257_152,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=None,
    sliding_window_size=None,
    layer_norm_epsilon=1e-6,
    vit_layer_norm_epsilon=1e-6,
    rope_max_wavelength=10_000,
)

RESOLUTIONS = (224, 448, 896)

PRESETS = {
    f"pg2_{size}_{resolution}": {
        "description": (
            f"PaliGemma 2 {size.upper()} pretrained at {resolution}x"
            f"{resolution} px ({(resolution // 14) ** 2} image tokens)."
        ),
        "config": {
            "image_size": resolution,
            **SIGLIP_SO400M,
            **DECODERS[size],
            **COMMON,
        },
    }
    for size in DECODERS
    for resolution in RESOLUTIONS
}


def list_presets():
    """Names of the registered presets."""
    return sorted(PRESETS)


def preset_config(name):
    """The backbone config of a registered preset, or a ValueError."""
    if name not in PRESETS:
        raise ValueError(unknown_preset_message(name))
    return dict(PRESETS[name]["config"])


def unknown_preset_message(name):
    close = difflib.get_close_matches(name, list_presets(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"Unknown preset {name!r}: not a registered name, and no such file or "
        f"directory.{hint} Registered presets: {', '.join(list_presets())}. "
        "A local big_vision `.npz` file, an HF transformers directory "
        "(config.json + *.safetensors) or a directory written by "
        "`save_to_preset` also work."
    )


def known_decoder(config):
    """The name of the released decoder size whose shapes `config` has, or None."""
    shape_keys = (
        "num_layers",
        "hidden_dim",
        "num_query_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_dim",
    )
    for size, decoder in DECODERS.items():
        if all(config.get(k) == decoder[k] for k in shape_keys):
            return size
    return None
