"""What trains: LoRA adapters and freezing recipes, by layer group.

Groups of projection layers (Keras `EinsumDense`/`Dense`, so Keras' own
`enable_lora` applies, on float or int8-quantised kernels alike):

- "attention": decoder query, key, value and output projections;
- "mlp": decoder gate, up and down projections;
- "vit_attention", "vit_mlp": the same in the SigLIP encoder;
- "image_projection": the linear map from ViT width to decoder width.

LoRA adapters are saved and loaded by variable path (e.g.
`decoder_block_3/attention/query/lora_kernel_a`), so a file fits any model
built with the same architecture, whatever the order layers were made in.
"""

import keras

from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.keras_internals import base_kernel
from keras_paligemma2.utils.keras_internals import remove_lora_adapters
from keras_paligemma2.utils.tensor_files import read_state
from keras_paligemma2.utils.tensor_files import write_state

LORA_GROUPS = ("attention", "mlp", "vit_attention", "vit_mlp", "image_projection")
DEFAULT_LORA_TARGETS = ("attention", "mlp")
# Freezing recipes. "attention_only": only the decoder's attention weights
# train (big_vision's fine-tuning colab); "decoder_only": the image encoder
# and projection stay frozen; "all": everything trains.
RECIPES = ("attention_only", "decoder_only", "all")


def projection_layers(backbone, group):
    """The projection layers of one group, in a fixed order.

    Args:
        backbone: a `PaliGemma2Backbone`.
        group: str, one of `LORA_GROUPS` (else a ValueError).
    """
    blocks = {
        "attention": (backbone.decoder_blocks, "attention"),
        "mlp": (backbone.decoder_blocks, "mlp"),
        "vit_attention": (backbone.vision_encoder.blocks, "attention"),
        "vit_mlp": (backbone.vision_encoder.blocks, "vit_mlp"),
    }
    if group in blocks:
        chosen, kind = blocks[group]
        return [layer for block in chosen for layer in projection_layers_of_block(block, kind)]
    if group == "image_projection":
        return [backbone.image_projection]
    raise InputError(f"Unknown LoRA target {group!r}; choose from {LORA_GROUPS}.")


def named_projections(backbone):
    """{name: layer} of every projection layer, the name being the path its
    variables have (`decoder_block_3/attention/query` for
    `decoder_block_3/attention/query/kernel`), known before the layers are
    built: how the backbone's config names adapted and quantised layers.

    Args:
        backbone: a `PaliGemma2Backbone` (built or not).
    """
    named = {}
    for block in backbone.decoder_blocks:
        for layer in projection_layers_of_block(block, "attention"):
            named[f"{block.name}/attention/{layer.name}"] = layer
        for layer in projection_layers_of_block(block, "mlp"):
            named[f"{block.name}/mlp/{layer.name}"] = layer
    for block in backbone.vision_encoder.blocks:
        prefix = f"{backbone.vision_encoder.name}/{block.name}"
        for layer in projection_layers_of_block(block, "attention"):
            named[f"{prefix}/attention/{layer.name}"] = layer
        for layer in projection_layers_of_block(block, "vit_mlp"):
            named[f"{prefix}/{layer.name}"] = layer
    named[backbone.image_projection.name] = backbone.image_projection
    return named


def projection_layers_of_block(block, kind):
    """The projections of one decoder or ViT block: kind "attention" (query,
    key, value, output), "mlp" (decoder gate, up, down) or "vit_mlp".

    Args:
        block: a `DecoderBlock` or a ViT block.
        kind: str, see above.
    """
    if kind == "attention":
        a = block.attention
        return [a.query, a.key, a.value, a.output_projection]
    if kind == "mlp":
        return [block.mlp.gate, block.mlp.up, block.mlp.down]
    return [block.mlp_in, block.mlp_out]


def enable_lora(backbone, rank, alpha=None, targets=DEFAULT_LORA_TARGETS):
    """Freezes every weight and adds trainable rank-`rank` adapters to the
    projections of `targets`; the update is scaled by `alpha / rank`
    (alpha defaults to rank).

    Args:
        backbone: a `PaliGemma2Backbone`, without adapters on those layers yet.
        rank: int >= 1, the adapters' rank.
        alpha: float or None; None means `rank` (a scale of 1).
        targets: str or sequence of `LORA_GROUPS` names (default "attention"
            and "mlp").
    """
    if isinstance(targets, str):
        targets = (targets,)
    unknown = [t for t in targets if t not in LORA_GROUPS]
    if unknown or not targets:
        raise InputError(f"Unknown LoRA targets {unknown}; choose from {LORA_GROUPS}.")
    if int(rank) < 1:
        raise InputError(f"LoRA rank must be at least 1; got {rank}.")
    layers = [layer for group in targets for layer in projection_layers(backbone, group)]
    _add_adapters(backbone, layers, rank, alpha)


def enable_lora_by_layer_name(backbone, rank, layer_names, alpha=None):
    """keras-hub's `Backbone.enable_lora(rank, target_layer_names)`: freezes
    every weight and adapts each projection layer whose name is one of
    `layer_names`, wherever it is (decoder and ViT alike); as there, the
    adapted layers' biases stay trainable.

    Args:
        backbone: a `PaliGemma2Backbone`, without adapters on those layers yet.
        rank: int >= 1, the adapters' rank.
        layer_names: iterable of str, layer names ("query", "value", "key",
            "output", "gate", "up", "down", "mlp_in", "mlp_out",
            "image_projection"); keras-hub's names for other models
            ("query_dense", "query_proj", ...) match nothing and are ignored
            as there, but at least one layer must match.
        alpha: float or None; None means `rank` (a scale of 1, Keras' default).
    """
    names = set(layer_names)
    layers = [
        layer
        for group in LORA_GROUPS
        for layer in projection_layers(backbone, group)
        if layer.name in names
    ]
    if not layers:
        raise InputError(
            f"No projection layer is named any of {sorted(names)}; this backbone's are "
            "query, key, value, output, gate, up, down, mlp_in, mlp_out, image_projection."
        )
    if int(rank) < 1:
        raise InputError(f"LoRA rank must be at least 1; got {rank}.")
    _add_adapters(backbone, layers, rank, alpha)
    # keras-hub leaves the adapted layers trainable, so their biases (the
    # ViT's query / value biases) train too; Keras freezes only the kernel.
    for layer in layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.trainable = True


def _add_adapters(backbone, layers, rank, alpha):
    already = [layer.path for layer in layers if layer.lora_enabled]
    if already:
        raise InputError(
            f"LoRA is already enabled on {already[:3]}{'...' if len(already) > 3 else ''}; "
            "call merge_lora() first to start new adapters."
        )
    _freeze_every_variable(backbone)
    for layer in layers:
        layer.enable_lora(int(rank), lora_alpha=alpha)  # new adapters are trainable


def _freeze_every_variable(backbone):
    # Layer flags stay on, so `trainable_weights` of the backbone and its
    # layers list exactly the variables marked trainable afterwards.
    backbone.trainable = True
    for variable in backbone.weights:
        variable.trainable = False


def training_setup(backbone):
    """What `enable_lora`, `quantize` and the freezing recipes changed, as
    plain data: {"lora_adapters": {projection name: [rank, alpha]} or None,
    "quantized_layers": {projection name: mode} or None,
    "trainable_variables": [variable path, ...] or None (None: unchanged,
    i.e. no adapters, nothing quantised, every weight trains)}.

    Args:
        backbone: a `PaliGemma2Backbone`.
    """
    projections = named_projections(backbone)
    adapters = {
        name: [int(layer.lora_rank), float(layer.lora_alpha)]
        for name, layer in projections.items()
        if getattr(layer, "lora_enabled", False)
    }
    quantized = {
        name: layer.quantization_mode
        for name, layer in projections.items()
        if layer.quantization_mode is not None
    }
    trainable = [v.path for v in backbone.weights if v.trainable]
    return {
        "lora_adapters": adapters or None,
        "quantized_layers": quantized or None,
        "trainable_variables": None if len(trainable) == len(backbone.weights) else trainable,
    }


def apply_training_setup(backbone, setup):
    """Makes a backbone built without them have the adapters, quantisation
    and trainable flags of `setup` (what `training_setup` returned): how a
    saved config or a training checkpoint rebuilds what trains.

    Args:
        backbone: a built `PaliGemma2Backbone` with no adapters yet on the
            layers `setup` adapts.
        setup: dict with any of the keys `training_setup` returns.
    """
    projections = named_projections(backbone)
    for name, mode in (setup.get("quantized_layers") or {}).items():
        layer = _named(projections, name, "quantized_layers")
        if layer.quantization_mode != mode:
            layer.quantize(mode)
    for name, (rank, alpha) in (setup.get("lora_adapters") or {}).items():
        layer = _named(projections, name, "lora_adapters")
        layer.enable_lora(int(rank), lora_alpha=alpha)
    trainable = setup.get("trainable_variables")
    if trainable is not None:
        training = set(trainable)
        paths = {v.path for v in backbone.weights}
        unknown = sorted(training - paths)
        if unknown:
            raise InputError(
                f"trainable_variables names {len(unknown)} variable(s) this backbone "
                f"does not have, e.g. {unknown[:3]}."
            )
        for variable in backbone.weights:
            variable.trainable = variable.path in training


def _named(projections, name, argument):
    if name not in projections:
        raise InputError(
            f"{argument} names {name!r}, which is not a projection layer of this backbone "
            f"(they are named like {next(iter(projections))!r})."
        )
    return projections[name]


def lora_variables(backbone):
    """The LoRA adapter variables (`lora_kernel_a` / `_b`) of `backbone`.

    Args:
        backbone: a `PaliGemma2Backbone`.
    """
    return [v for v in backbone.variables if "lora_kernel" in v.path]


def save_lora_weights(backbone, path):
    """Writes the adapters (by variable path) to a `.safetensors` file.

    Args:
        backbone: a `PaliGemma2Backbone` with LoRA enabled (else a ValueError).
        path: str or path-like, the file to write (atomically).
    """
    variables = lora_variables(backbone)
    if not variables:
        raise InputError("This model has no LoRA adapters; call enable_lora() first.")
    write_state(path, variables)


def load_lora_weights(backbone, path):
    """Loads adapters saved by `save_lora_weights` into a model on which
    `enable_lora` was called with the same rank and targets.

    Args:
        backbone: a `PaliGemma2Backbone` with LoRA enabled (else a ValueError).
        path: str or path-like, a file written by `save_lora_weights`.
    """
    variables = lora_variables(backbone)
    if not variables:
        raise InputError(
            "This model has no LoRA adapters to load into: call enable_lora() "
            "with the rank and targets the adapters were trained with first."
        )
    read_state(path, variables)


def merge_lora(backbone):
    """Folds every adapter into its base kernel and removes the adapters;
    every weight is trainable again afterwards.

    Float kernels only: an int8-quantised base keeps its adapters (merging
    them would need requantising); generate with the adapters in place.

    Args:
        backbone: a `PaliGemma2Backbone`; a no-op (but for making it
            trainable) without adapters.
    """
    for layer in _lora_layers(backbone):
        if layer.quantization_mode is not None:
            raise InputError(
                f"{layer.path} is {layer.quantization_mode}-quantised: its LoRA "
                "adapters cannot be folded into the integer kernel. Keep them "
                "(generation uses them), or merge into a float model and quantise after."
            )
    for layer in _lora_layers(backbone):
        merged = layer.kernel  # Keras' property: base + (A @ B) * alpha / rank
        base = base_kernel(layer)
        base.assign(keras.ops.cast(merged, base.dtype))
        remove_lora_adapters(layer)
    backbone.trainable = True  # as if LoRA had never been enabled


def _lora_layers(backbone):
    return [
        layer
        for group in LORA_GROUPS
        for layer in projection_layers(backbone, group)
        if getattr(layer, "lora_enabled", False)
    ]


def set_trainable(backbone, recipe):
    """Applies a freezing recipe: "attention_only", "decoder_only" or "all".

    Args:
        backbone: a `PaliGemma2Backbone` without LoRA adapters (else a ValueError).
        recipe: str, one of `RECIPES` (else a ValueError).
    """
    if recipe not in RECIPES:
        raise InputError(f"Unknown recipe {recipe!r}; choose from {RECIPES}.")
    if lora_variables(backbone):
        raise InputError(
            "This model has LoRA adapters: freezing recipes are for training "
            "base weights. Call merge_lora() first."
        )
    backbone.trainable = True
    if recipe == "decoder_only":
        for variable in backbone.vision_encoder.weights + backbone.image_projection.weights:
            variable.trainable = False
    elif recipe == "attention_only":
        _freeze_every_variable(backbone)
        for block in backbone.decoder_blocks:
            for variable in block.attention.weights:
                variable.trainable = True
