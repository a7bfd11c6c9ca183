"""HF transformers PaliGemma checkpoints: `config.json` + `*.safetensors`.

Linear weights are stored (out, in) with heads flattened into one axis; the
table below names each tensor and the reshape into our layout. Key spellings
differ between transformers versions (`vision_tower.vision_model.*`,
`vision_tower.*`, `model.vision_tower.*`; `language_model.model.*`,
`model.language_model.*`): all are accepted, by mapping them onto the
canonical prefixes `vision.`, `text.` and `projector.` first.

Semantics follow HF's: the final logit soft-cap applies to every logit, and
`sliding_window` (Gemma 2's local layers) is kept.

`write_checkpoint` is the way back: the same table (`tensor_table`) read the
other way, with the Hub's key names, written one tensor at a time.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from keras_paligemma2.checkpoints.assignment import Rule
from keras_paligemma2.checkpoints.assignment import float_values
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.files import DEFAULT_MAX_SHARD_SIZE_GB
from keras_paligemma2.utils.files import atomic_directory
from keras_paligemma2.utils.tensor_files import CheckpointError
from keras_paligemma2.utils.tensor_files import LazyTensor
from keras_paligemma2.utils.tensor_files import read_safetensors_lazily
from keras_paligemma2.utils.tensor_files import write_safetensors

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
    if layer_types is not None and set(layer_types) == {"full_attention"}:
        config["sliding_window_size"] = None  # no local layers (an export of such a model)
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


class _Layout:
    """How one tensor's HF layout maps onto ours and back."""

    def __init__(self, to_ours=None, to_hf=None):
        self.to_ours = to_ours or (lambda x: x)
        self.to_hf = to_hf or (lambda x: x)


def tensor_table(config):
    """Every tensor as (our variable path, canonical HF name, `_Layout`).

    HF stores linear weights (out, in) with heads flattened into one axis;
    the layouts reshape them into ours (`to_ours`) and back (`to_hf`).

    Args:
        config: dict, the backbone config (`PaliGemma2Backbone.get_config()`).
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
    same = _Layout()
    transpose = _Layout(lambda x: x.T, lambda x: x.T)
    patches = _Layout(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
    # (Nh*Hh, W) <-> (W, Nh, Hh); bias (Nh*Hh,) <-> (Nh, Hh); out (W, Nh*Hh) <-> (Nh, Hh, W)
    vit_in = _Layout(
        lambda x: x.T.reshape(vit_width, vit_heads, vit_head_dim),
        lambda x: x.reshape(vit_width, vit_heads * vit_head_dim).T,
    )
    vit_in_bias = _Layout(lambda x: x.reshape(vit_heads, vit_head_dim), lambda x: x.reshape(-1))
    vit_out = _Layout(
        lambda x: x.T.reshape(vit_heads, vit_head_dim, vit_width),
        lambda x: x.reshape(vit_heads * vit_head_dim, vit_width).T,
    )

    def heads_in(num):  # (num*H, D) <-> (num, D, H)
        return _Layout(
            lambda x: x.reshape(num, h, d).transpose(0, 2, 1),
            lambda x: x.transpose(0, 2, 1).reshape(num * h, d),
        )

    # (D, N*H) <-> (N, H, D)
    heads_out = _Layout(lambda x: x.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T)
    # The Hub's rows past the vocabulary (`<image>`, padding) are dropped, and written as zeros.
    embedding = _Layout(lambda x: x[:vocabulary], lambda x: _pad_rows(x, padded_vocabulary(config)))

    emb = "vision.embeddings."
    table = [
        ("vision_encoder/patch_embedding/kernel", emb + "patch_embedding.weight", patches),
        ("vision_encoder/patch_embedding/bias", emb + "patch_embedding.bias", same),
        ("vision_encoder/position_embedding", emb + "position_embedding.weight", same),
        ("vision_encoder/encoder_norm/gamma", "vision.post_layernorm.weight", same),
        ("vision_encoder/encoder_norm/beta", "vision.post_layernorm.bias", same),
        ("image_projection/kernel", "projector.linear.weight", transpose),
        ("image_projection/bias", "projector.linear.bias", same),
        ("token_embedding/embeddings", "text.embed_tokens.weight", embedding),
        ("final_norm/scale", "text.norm.weight", same),
    ]
    for i in range(config["vit_num_layers"]):
        ours, theirs = f"vision_encoder/block_{i}/", f"vision.encoder.layers.{i}."
        table += [
            (ours + "attention_norm/gamma", theirs + "layer_norm1.weight", same),
            (ours + "attention_norm/beta", theirs + "layer_norm1.bias", same),
            (ours + "mlp_norm/gamma", theirs + "layer_norm2.weight", same),
            (ours + "mlp_norm/beta", theirs + "layer_norm2.bias", same),
            (ours + "attention/output/kernel", theirs + "self_attn.out_proj.weight", vit_out),
            (ours + "attention/output/bias", theirs + "self_attn.out_proj.bias", same),
            (ours + "mlp_in/kernel", theirs + "mlp.fc1.weight", transpose),
            (ours + "mlp_in/bias", theirs + "mlp.fc1.bias", same),
            (ours + "mlp_out/kernel", theirs + "mlp.fc2.weight", transpose),
            (ours + "mlp_out/bias", theirs + "mlp.fc2.bias", same),
        ]
        for projection, name in (("query", "q"), ("key", "k"), ("value", "v")):
            table += [
                (
                    ours + f"attention/{projection}/kernel",
                    theirs + f"self_attn.{name}_proj.weight",
                    vit_in,
                ),
                (
                    ours + f"attention/{projection}/bias",
                    theirs + f"self_attn.{name}_proj.bias",
                    vit_in_bias,
                ),
            ]
    for i in range(config["num_layers"]):
        ours, theirs = f"decoder_block_{i}/", f"text.layers.{i}."
        table += [
            (ours + "pre_attention_norm/scale", theirs + "input_layernorm.weight", same),
            (ours + "attention/query/kernel", theirs + "self_attn.q_proj.weight", heads_in(n)),
            (ours + "attention/key/kernel", theirs + "self_attn.k_proj.weight", heads_in(k)),
            (ours + "attention/value/kernel", theirs + "self_attn.v_proj.weight", heads_in(k)),
            (ours + "attention/output/kernel", theirs + "self_attn.o_proj.weight", heads_out),
            (ours + "post_attention_norm/scale", theirs + "post_attention_layernorm.weight", same),
            (ours + "pre_ffw_norm/scale", theirs + "pre_feedforward_layernorm.weight", same),
            (ours + "mlp/gate/kernel", theirs + "mlp.gate_proj.weight", transpose),
            (ours + "mlp/up/kernel", theirs + "mlp.up_proj.weight", transpose),
            (ours + "mlp/down/kernel", theirs + "mlp.down_proj.weight", transpose),
            (ours + "post_ffw_norm/scale", theirs + "post_feedforward_layernorm.weight", same),
        ]
    return table


def rules(config):
    """The full table from canonical HF names to our variable paths.

    Args:
        config: dict, the backbone config (`PaliGemma2Backbone.get_config()`).

    Returns:
        A list of `Rule`s, one per variable of the backbone.
    """
    return [Rule(ours, theirs, layout.to_ours) for ours, theirs, layout in tensor_table(config)]


def padded_vocabulary(config):
    """The embedding rows an exported checkpoint has: the vocabulary, then `<image>`, rounded
    up to a multiple of 64 as the Hub's files (257,152 -> 257,216).

    Args:
        config: dict, the backbone config (its `vocabulary_size`).
    """
    return -(-(config["vocabulary_size"] + 1) // 64) * 64


def _pad_rows(x, rows):
    pad = jnp.pad if isinstance(x, jax.core.Tracer) else np.pad  # traced: shapes only
    return pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


# The Hub's spelling of the canonical prefixes (what vLLM, TGI and every transformers
# version read; transformers 5 maps them onto its own on loading).
HUB_PREFIXES = {
    "vision.": "vision_tower.vision_model.",
    "text.": "language_model.model.",
    "projector.": "multi_modal_projector.",
}


def hub_name(canonical):
    """The Hub's key for a canonical name (`text.norm.weight` -> `language_model.model.norm.weight`).

    Args:
        canonical: str, a name as `canonical_name` returns it.
    """
    for prefix, hub in HUB_PREFIXES.items():
        if canonical.startswith(prefix):
            return hub + canonical[len(prefix) :]
    return canonical


def hf_config(config, dtype):
    """transformers' `config.json` for a `PaliGemmaForConditionalGeneration` with the
    semantics of our backbone `config` (every field written, none left to defaults).

    Args:
        config: dict, the backbone config.
        dtype: str, the weights' dtype name ("float32", "bfloat16").

    Raises:
        InputError: for what HF's model cannot express (a final soft-cap on decode steps
            only, several images, a sliding window but not Gemma 2's alternating layers).
    """
    cap, scope = config["final_logit_soft_cap"], config.get("final_logit_soft_cap_scope", "all")
    if cap and scope != "all":
        raise InputError(
            f"This model soft-caps only decode steps' logits (scope {scope!r}, big_vision's "
            "Gemma 2); transformers caps every logit. Export with final_logit_soft_cap_scope="
            '"all" (or the cap off) set on the model, if that is what you want served.'
        )
    if config.get("num_images", 1) != 1:
        raise InputError(
            "transformers' PaliGemma takes one image per example; this model takes "
            f"{config['num_images']}."
        )
    layers = config["num_layers"]
    window = config["sliding_window_size"]
    layer_types = (
        ["full_attention"] * layers
        if window is None
        else ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    )
    image_tokens = (config["image_size"] // config["patch_size"]) ** 2
    vocabulary = config["vocabulary_size"]
    text = {
        "model_type": "gemma2",
        "vocab_size": padded_vocabulary(config),
        "hidden_size": config["hidden_dim"],
        "intermediate_size": config["intermediate_dim"],
        "num_hidden_layers": layers,
        "num_attention_heads": config["num_query_heads"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rms_norm_eps": config["layer_norm_epsilon"],
        "rope_parameters": {"rope_type": "default", "rope_theta": config["rope_max_wavelength"]},
        "query_pre_attn_scalar": config["query_pre_attn_scalar"],
        "attn_logit_softcapping": config["attention_logit_soft_cap"],
        "final_logit_softcapping": cap,
        "sliding_window": window,
        "layer_types": layer_types,
        "use_bidirectional_attention": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "num_image_tokens": image_tokens,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "dtype": dtype,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": config["vit_hidden_dim"],
        "intermediate_size": config["vit_intermediate_dim"],
        "num_hidden_layers": config["vit_num_layers"],
        "num_attention_heads": config["vit_num_heads"],
        "num_channels": 3,
        "image_size": config["image_size"],
        "patch_size": config["patch_size"],
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": config["vit_layer_norm_epsilon"],
        "attention_dropout": 0.0,
        "projection_dim": config["hidden_dim"],
        "num_image_tokens": image_tokens,
        "vision_use_head": False,
        "dtype": dtype,
    }
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "hidden_size": config["vit_hidden_dim"],
        "projection_dim": config["hidden_dim"],
        "image_token_index": vocabulary,
        "vocab_size": padded_vocabulary(config),
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }


def write_checkpoint(backbone, directory, tokenizer=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE_GB):
    """Writes `backbone` as a transformers `PaliGemmaForConditionalGeneration` directory:
    `config.json` (`hf_config`), `generation_config.json`, the weights as `.safetensors`
    with the Hub's key names and the embedding padded as the Hub's (one tensor in memory
    at a time; shards of at most `max_shard_size` GB with `model.safetensors.index.json`,
    as `save_pretrained`), and with a tokenizer its `tokenizer.model`, the token files and
    `preprocessor_config.json` for `PaliGemmaProcessor`. Written into a fresh directory
    renamed into place when complete. LoRA adapters are folded in; the model is unchanged.

    Args:
        backbone: a float `PaliGemma2Backbone`.
        directory: str or path-like, the directory to write (replaced if it exists).
        tokenizer: None, or the model's `PaliGemma2Tokenizer`.
        max_shard_size: float, the most GB per `.safetensors` file.
    """
    config = backbone.get_config()
    value = float_values(backbone, "transformers")
    variables = {v.path: v for v in backbone.weights}
    dtype = np.dtype(variables["final_norm/scale"].dtype)
    model_config = hf_config(config, dtype.name)
    tensors = {}
    for ours, theirs, layout in tensor_table(config):
        variable = variables[ours]
        shape = jax.eval_shape(
            layout.to_hf, jax.ShapeDtypeStruct(variable.shape, variable.dtype)
        ).shape
        tensors[hub_name(theirs)] = LazyTensor(
            shape,
            np.dtype(variable.dtype),
            lambda ours=ours, layout=layout: np.ascontiguousarray(layout.to_hf(value(ours))),
        )
    shards, size, limit = [{}], 0, max_shard_size * 1e9
    for name, tensor in tensors.items():
        nbytes = int(np.prod(tensor.shape, dtype=np.int64)) * tensor.dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    with atomic_directory(directory) as staging:
        _write_json(os.path.join(staging, "config.json"), model_config)
        _write_json(
            os.path.join(staging, "generation_config.json"),
            {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
        )
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [
                f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
            ]
        )
        for name, shard in zip(names, shards):
            write_safetensors(os.path.join(staging, name), shard, metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(
                int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize for t in tensors.values()
            )
            weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
            _write_json(
                os.path.join(staging, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        if tokenizer is not None:
            _write_tokenizer(staging, tokenizer, config)


def _write_tokenizer(directory, tokenizer, config):
    """`tokenizer.model` (the SentencePiece model itself) and the files with which
    transformers' `PaliGemmaProcessor` builds the Hub's tokenizer and image processor:
    `<image>` an added special token right after the vocabulary."""
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(tokenizer.proto)
    image_token = config["vocabulary_size"]
    special = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    _write_json(
        os.path.join(directory, "tokenizer_config.json"),
        {
            "tokenizer_class": "GemmaTokenizer",
            "processor_class": "PaliGemmaProcessor",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": 1_000_000_000_000_000_019_884_624_838_656,
            "added_tokens_decoder": {
                str(image_token): {
                    "content": "<image>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
            },
            "additional_special_tokens": ["<image>"],
            "clean_up_tokenization_spaces": False,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
        },
    )
    _write_json(
        os.path.join(directory, "special_tokens_map.json"),
        {**special, "additional_special_tokens": ["<image>"]},
    )
    size = config["image_size"]
    _write_json(
        os.path.join(directory, "preprocessor_config.json"),
        {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "PaliGemmaProcessor",
            "image_seq_length": (size // config["patch_size"]) ** 2,
            "size": {"height": size, "width": size},
            "do_resize": True,
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )


def _write_json(path, content):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")
