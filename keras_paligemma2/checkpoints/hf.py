"""HF transformers PaliGemma checkpoints: `config.json` + `*.safetensors`.

Linear weights are stored (out, in) with heads flattened into one axis; the
table below names each tensor and the reshape into our layout. Key spellings
differ between transformers versions (`vision_tower.vision_model.*`,
`vision_tower.*`, `model.vision_tower.*`; `language_model.model.*`,
`model.language_model.*`): all are accepted, by mapping them onto the
canonical prefixes `vision.`, `text.` and `projector.` first.

Semantics follow HF's: the final logit soft-cap applies to every logit, and
`sliding_window` (Gemma 2's local layers) is kept.
"""

import glob
import json
import os

from keras_paligemma2.checkpoints.assignment import Rule
from keras_paligemma2.utils.tensor_files import CheckpointError
from keras_paligemma2.utils.tensor_files import read_safetensors_lazily

# Longest spellings first: the first matching prefix wins.
PREFIXES = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.language_model.model.", "text."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
    ("language_model.", "text."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)

# Tied with the embedding, so never read.
TIED_OUTPUT = ("lm_head.weight", "text.lm_head.weight")


def canonical_name(name):
    """`name` with its vision/text/projector prefix replaced by the canonical one.

    Args:
        name: str, a tensor name as some transformers version saved it.
    """
    for prefix, canonical in PREFIXES:
        if name.startswith(prefix):
            return canonical + name[len(prefix) :]
    return name


def is_hf_directory(path):
    """Whether `path` holds a `config.json` with `model_type` "paligemma".

    Args:
        path: str or path-like, a directory.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "paligemma"


def read_tensors(directory):
    """Maps canonical names to `LazyTensor`s over every `*.safetensors` file.

    Args:
        directory: str or path-like, an HF checkpoint directory (a
            `CheckpointError` if it has no `*.safetensors`).
    """
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise CheckpointError(
            f"{directory!r} has a config.json but no *.safetensors weights. "
            "Download the whole repository (config.json and every "
            "model-*.safetensors shard)."
        )
    tensors = {}
    for path in files:
        for name, tensor in read_safetensors_lazily(path).items():
            tensors[canonical_name(name)] = tensor
    return tensors


# transformers' defaults for the fields PaliGemma 2 configs use:
# `Gemma2Config` (text), `SiglipVisionConfig` (vision), `PaliGemmaConfig`.
GEMMA2_CONFIG_DEFAULTS = dict(
    hidden_size=2304,
    num_attention_heads=8,
    num_hidden_layers=26,
    num_key_value_heads=4,
    head_dim=256,
    intermediate_size=9216,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    rms_norm_eps=1e-6,
    rope_theta=10_000.0,
    vocab_size=256_000,
)
SIGLIP_VISION_CONFIG_DEFAULTS = dict(
    image_size=224,
    patch_size=16,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    layer_norm_eps=1e-6,
)
PALIGEMMA_IMAGE_TOKEN_INDEX = 256_000


def infer_config(hf_config, source_name):
    """Our backbone config from HF's `config.json`, with HF's semantics.

    Args:
        hf_config: dict, the parsed `config.json` (`text_config`,
            `vision_config`, ...).
        source_name: str, the directory or repository, for error messages.

    Returns:
        A dict of `PaliGemma2Backbone` constructor arguments; a
        `CheckpointError` for missing fields or a non-Gemma 2 model.
    """
    try:
        # A field a config.json leaves out takes the value of transformers'
        # own config classes (tests/fixtures/hf_config_defaults, resolved by
        # transformers 5.24): files written as a diff against those defaults
        # omit exactly the fields equal to them.
        text = {**GEMMA2_CONFIG_DEFAULTS, **hf_config["text_config"]}
        vision = {**SIGLIP_VISION_CONFIG_DEFAULTS, **hf_config["vision_config"]}
        config = dict(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            vit_hidden_dim=vision["hidden_size"],
            vit_num_layers=vision["num_hidden_layers"],
            vit_num_heads=vision["num_attention_heads"],
            vit_intermediate_dim=vision["intermediate_size"],
            vit_layer_norm_epsilon=vision["layer_norm_eps"],
            num_layers=text["num_hidden_layers"],
            hidden_dim=text["hidden_size"],
            num_query_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"],
            head_dim=text["head_dim"],
            intermediate_dim=text["intermediate_size"],
            query_pre_attn_scalar=text["query_pre_attn_scalar"],
            attention_logit_soft_cap=text["attn_logit_softcapping"],
            final_logit_soft_cap=text["final_logit_softcapping"],
            sliding_window_size=text["sliding_window"],
            layer_norm_epsilon=text["rms_norm_eps"],
            rope_max_wavelength=_rope_base(text),
        )
    except KeyError as error:
        raise CheckpointError(
            f"{source_name!r}: config.json lacks {error}, which a PaliGemma 2 "
            "config has (text_config / vision_config with Gemma 2 and SigLIP "
            "fields)."
        ) from error
    if text.get("model_type", "gemma2") != "gemma2":
        raise CheckpointError(
            f"{source_name!r} holds a PaliGemma with a {text.get('model_type')!r} "
            "language model; only PaliGemma 2 (Gemma 2) is supported."
        )
    layer_types = text.get("layer_types")
    if config["sliding_window_size"] is not None and layer_types is not None:
        alternating = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(config["num_layers"])
        ]
        if list(layer_types) != alternating:
            raise CheckpointError(
                f"{source_name!r}: layer_types {layer_types} is not Gemma 2's "
                "alternating pattern (sliding on even layers), which is the "
                "only one supported."
            )
    # The Hub files pad the embedding past the vocabulary: the `<image>`
    # placeholder and unused rows. Logits cover the real vocabulary only.
    vocabulary = hf_config["text_config"].get(
        "vocab_size", hf_config.get("vocab_size", text["vocab_size"])
    )
    image_token = hf_config.get(
        "image_token_index", hf_config.get("image_token_id", PALIGEMMA_IMAGE_TOKEN_INDEX)
    )
    if image_token is not None and image_token < vocabulary:
        vocabulary = image_token
    config["vocabulary_size"] = vocabulary
    return config


def _rope_base(text):
    rope = text.get("rope_parameters") or {}
    return rope.get("rope_theta", text.get("rope_theta", 10_000.0))


def rules(config):
    """The full table from canonical HF names to our variable paths.

    Args:
        config: dict, the backbone config (`PaliGemma2Backbone.get_config()`).

    Returns:
        A list of `Rule`s, one per variable of the backbone.
    """
    vit_width = config["vit_hidden_dim"]
    vit_heads = config["vit_num_heads"]
    vit_head_dim = vit_width // vit_heads
    d, n, k, h = (
        config["hidden_dim"],
        config["num_query_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    vocabulary = config["vocabulary_size"]

    def transpose(x):
        return x.T

    def vit_in(x):  # (Nh*Hh, W) -> (W, Nh, Hh)
        return x.T.reshape(vit_width, vit_heads, vit_head_dim)

    def vit_in_bias(x):  # (Nh*Hh,) -> (Nh, Hh)
        return x.reshape(vit_heads, vit_head_dim)

    def vit_out(x):  # (W, Nh*Hh) -> (Nh, Hh, W)
        return x.T.reshape(vit_heads, vit_head_dim, vit_width)

    def heads_in(num):  # (num*H, D) -> (num, D, H)
        return lambda x: x.reshape(num, h, d).transpose(0, 2, 1)

    def heads_out(x):  # (D, N*H) -> (N, H, D)
        return x.T.reshape(n, h, d)

    emb = "vision.embeddings."
    table = [
        Rule(
            "vision_encoder/patch_embedding/kernel",
            emb + "patch_embedding.weight",
            lambda x: x.transpose(2, 3, 1, 0),
        ),
        Rule("vision_encoder/patch_embedding/bias", emb + "patch_embedding.bias"),
        Rule("vision_encoder/position_embedding", emb + "position_embedding.weight"),
        Rule("vision_encoder/encoder_norm/gamma", "vision.post_layernorm.weight"),
        Rule("vision_encoder/encoder_norm/beta", "vision.post_layernorm.bias"),
        Rule("image_projection/kernel", "projector.linear.weight", transpose),
        Rule("image_projection/bias", "projector.linear.bias"),
        Rule(
            "token_embedding/embeddings",
            "text.embed_tokens.weight",
            lambda x: x[:vocabulary],
        ),
        Rule("final_norm/scale", "text.norm.weight"),
    ]
    for i in range(config["vit_num_layers"]):
        ours, theirs = f"vision_encoder/block_{i}/", f"vision.encoder.layers.{i}."
        table += [
            Rule(ours + "attention_norm/gamma", theirs + "layer_norm1.weight"),
            Rule(ours + "attention_norm/beta", theirs + "layer_norm1.bias"),
            Rule(ours + "mlp_norm/gamma", theirs + "layer_norm2.weight"),
            Rule(ours + "mlp_norm/beta", theirs + "layer_norm2.bias"),
            Rule(ours + "attention/output/kernel", theirs + "self_attn.out_proj.weight", vit_out),
            Rule(ours + "attention/output/bias", theirs + "self_attn.out_proj.bias"),
            Rule(ours + "mlp_in/kernel", theirs + "mlp.fc1.weight", transpose),
            Rule(ours + "mlp_in/bias", theirs + "mlp.fc1.bias"),
            Rule(ours + "mlp_out/kernel", theirs + "mlp.fc2.weight", transpose),
            Rule(ours + "mlp_out/bias", theirs + "mlp.fc2.bias"),
        ]
        for projection, name in (("query", "q"), ("key", "k"), ("value", "v")):
            table += [
                Rule(
                    ours + f"attention/{projection}/kernel",
                    theirs + f"self_attn.{name}_proj.weight",
                    vit_in,
                ),
                Rule(
                    ours + f"attention/{projection}/bias",
                    theirs + f"self_attn.{name}_proj.bias",
                    vit_in_bias,
                ),
            ]
    for i in range(config["num_layers"]):
        ours, theirs = f"decoder_block_{i}/", f"text.layers.{i}."
        table += [
            Rule(ours + "pre_attention_norm/scale", theirs + "input_layernorm.weight"),
            Rule(ours + "attention/query/kernel", theirs + "self_attn.q_proj.weight", heads_in(n)),
            Rule(ours + "attention/key/kernel", theirs + "self_attn.k_proj.weight", heads_in(k)),
            Rule(ours + "attention/value/kernel", theirs + "self_attn.v_proj.weight", heads_in(k)),
            Rule(ours + "attention/output/kernel", theirs + "self_attn.o_proj.weight", heads_out),
            Rule(ours + "post_attention_norm/scale", theirs + "post_attention_layernorm.weight"),
            Rule(ours + "pre_ffw_norm/scale", theirs + "pre_feedforward_layernorm.weight"),
            Rule(ours + "mlp/gate/kernel", theirs + "mlp.gate_proj.weight", transpose),
            Rule(ours + "mlp/up/kernel", theirs + "mlp.up_proj.weight", transpose),
            Rule(ours + "mlp/down/kernel", theirs + "mlp.down_proj.weight", transpose),
            Rule(ours + "post_ffw_norm/scale", theirs + "post_feedforward_layernorm.weight"),
        ]
    return table
