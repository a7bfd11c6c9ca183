"""Registered presets: every released PaliGemma 2 checkpoint, as data.

Each preset has a `config` (the `PaliGemma2Backbone` config with big_vision's
semantics: no final logit soft-cap on scoring logits, no sliding window,
since the released weights were trained with big_vision) and its `sources`
on the Hugging Face Hub and Kaggle.
"""

import difflib
import json
import os

from keras_paligemma2.utils.errors import InputError

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

# PaliGemma's Gemma tokenizer: 257,152 ids (256,000 + 1,024 `<loc>` + 128
# `<seg>`); "\n", the prompt/reply separator, is id 108 in it.
GEMMA_VOCABULARY_SIZE = 257_152
GEMMA_SEPARATOR_ID = 108

COMMON = dict(
    vocabulary_size=GEMMA_VOCABULARY_SIZE,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=None,
    sliding_window_size=None,
    layer_norm_epsilon=1e-6,
    vit_layer_norm_epsilon=1e-6,
    rope_max_wavelength=10_000,
)

# keras-hub's Kaggle handles (its `pali_gemma_presets.py`, keras-hub 0.32).
KERAS_HUB_HANDLES = {
    "pt_3b_224": "pali_gemma2_pt_3b_224/2",
    "pt_3b_448": "pali_gemma2_pt_3b_448/2",
    "pt_3b_896": "pali_gemma2_pt_3b_896/2",
    "pt_10b_224": "pali_gemma2_pt_10b_224/3",
    "pt_10b_448": "pali_gemma2_pt_10b_448/3",
    "pt_10b_896": "pali_gemma2_pt_10b_896/3",
    "pt_28b_224": "pali_gemma2_pt_28b_224/4",
    "pt_28b_448": "pali_gemma2_pt_28b_448/3",
    "pt_28b_896": "pali_gemma2_pt_28b_896/3",
    "mix_3b_224": "pali_gemma2_mix_3b_224/2",
    "mix_3b_448": "pali_gemma2_mix_3b_448/2",
    "mix_10b_224": "pali_gemma2_mix_10b_224/3",
    "mix_10b_448": "pali_gemma2_mix_10b_448/3",
    "mix_28b_224": "pali_gemma2_28b_mix_224/3",
    "mix_28b_448": "pali_gemma2_28b_mix_448/3",
    "docci_3b_448": "pali_gemma_2_ft_docci_3b_448/2",
    "docci_10b_448": "pali_gemma2_ft_docci_10b_448/3",
}

# (kind, sizes, resolutions, what the checkpoints are)
FAMILIES = (
    ("pt", ("3b", "10b", "28b"), (224, 448, 896), "pretrained"),
    ("mix", ("3b", "10b", "28b"), (224, 448), "fine-tuned on a mixture of tasks"),
    ("docci", ("3b", "10b"), (448,), "fine-tuned on DOCCI for detailed captions"),
)


def _sources(kind, size, resolution):
    """Where the released files live (Hugging Face Hub and Kaggle).

    `big_vision`: the JAX checkpoint the weights were trained with, one
    `.b16.npz` file; `transformers`: the HF repository (config.json,
    safetensors, tokenizer.model), also the tokenizer's source; `keras_hub`:
    keras-hub's Kaggle preset.
    """
    hub_kind = "ft-docci" if kind == "docci" else kind
    stem = f"paligemma2-{size}-{hub_kind}-{resolution}"
    key = f"{kind}_{size}_{resolution}"
    return {
        "big_vision": {"repo_id": f"google/{stem}-jax", "filename": f"{stem}.b16.npz"},
        "transformers": {"repo_id": f"google/{stem}"},
        "tokenizer": {"repo_id": f"google/{stem}", "filename": "tokenizer.model"},
        "keras_hub": f"kaggle://keras/paligemma2/keras/{KERAS_HUB_HANDLES[key]}",
    }


PRESETS = {}
for _kind, _sizes, _resolutions, _what in FAMILIES:
    for _size in _sizes:
        for _resolution in _resolutions:
            _name = (
                f"pg2_{_size}_{_resolution}"
                if _kind == "pt"
                else f"pg2_{_kind}_{_size}_{_resolution}"
            )
            PRESETS[_name] = {
                "description": (
                    f"PaliGemma 2 {_size.upper()}, {_what}, {_resolution}x"
                    f"{_resolution} px ({(_resolution // 14) ** 2} image tokens)."
                ),
                "config": {
                    "image_size": _resolution,
                    **SIGLIP_SO400M,
                    **DECODERS[_size],
                    **COMMON,
                },
                "sources": _sources(_kind, _size, _resolution),
            }

SOURCES = ("big_vision", "transformers", "keras_hub")

# Presets that ship with the package (trained in this repository), by name:
# Keras preset directories in `keras_paligemma2/embedded_presets/`.
EMBEDDED = {
    "pg2_tiny_shapes": (
        "A 3 M-parameter PaliGemma 2 (SigLIP ViT + Gemma 2 decoder, soft-caps, "
        "<loc>/<seg> tokenizer) trained by examples/train_tiny_shapes.py on "
        "synthetic shapes: captions, detection, counting, colours. 112 px."
    ),
}


def embedded_preset_dir(name):
    """The directory of a shipped preset, or None if it is not installed.

    Args:
        name: str, a name in `EMBEDDED`.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidate = os.path.join(package, "embedded_presets", name)
    if os.path.isfile(os.path.join(candidate, "config.json")):
        return candidate
    return None


def list_presets():
    """Names of the registered presets (released checkpoints, then shipped ones)."""
    return sorted(PRESETS) + sorted(EMBEDDED)


def preset_config(name):
    """The backbone config of a registered or shipped preset name, or of a
    Keras preset directory; else a ValueError.

    Args:
        name: str, a name in `PRESETS` or `EMBEDDED`, or a directory with a
            Keras `config.json`.

    Returns:
        A new dict of backbone constructor arguments (without Keras' `name`,
        `trainable` and `dtype`).
    """

    if name in PRESETS:
        return dict(PRESETS[name]["config"])
    directory = embedded_preset_dir(name) if name in EMBEDDED else name
    config_file = os.path.join(str(directory or ""), "config.json")
    if not os.path.isfile(config_file):
        raise InputError(unknown_preset_message(name))
    with open(config_file) as f:
        config = json.load(f)["config"]
    # Keras' layer keys, not the architecture's.
    return {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}


def unknown_preset_message(name):
    """The error message for an unknown preset, with close names suggested.

    Args:
        name: str, the preset name or path that matched nothing.
    """
    close = difflib.get_close_matches(name, list_presets(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"Unknown preset {name!r}: not a registered name, and no such file or "
        f"directory.{hint} Registered presets: {', '.join(list_presets())}. "
        "A local big_vision `.npz` file, an HF transformers directory "
        "(config.json + *.safetensors) or a directory written by "
        "`save_to_preset` also work."
    )


# The config fields that tensor shapes fix.
DECODER_SHAPE_FIELDS = (
    "num_layers",
    "hidden_dim",
    "num_query_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_dim",
)
SHAPE_FIELDS = (
    "image_size",
    "patch_size",
    "vit_hidden_dim",
    "vit_num_layers",
    "vit_num_heads",
    "vit_intermediate_dim",
) + DECODER_SHAPE_FIELDS


def known_decoder(config):
    """The name of the released decoder size whose shapes `config` has, or None.

    Args:
        config: dict, a backbone config; only `DECODER_SHAPE_FIELDS` are read.

    Returns:
        "3b", "10b", "28b" or None.
    """
    for size, decoder in DECODERS.items():
        if all(config.get(k) == decoder[k] for k in DECODER_SHAPE_FIELDS):
            return size
    return None
