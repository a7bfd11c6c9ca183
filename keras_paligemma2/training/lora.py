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
    if group == "attention":
        return [
            layer
            for block in backbone.decoder_blocks
            for layer in (
                block.attention.query,
                block.attention.key,
                block.attention.value,
                block.attention.output_projection,
            )
        ]
    if group == "mlp":
        return [
            layer
            for block in backbone.decoder_blocks
            for layer in (block.mlp.gate, block.mlp.up, block.mlp.down)
        ]
    vit_blocks = backbone.vision_encoder.blocks
    if group == "vit_attention":
        return [
            layer
            for block in vit_blocks
            for layer in (
                block.attention.query,
                block.attention.key,
                block.attention.value,
                block.attention.output_projection,
            )
        ]
    if group == "vit_mlp":
        return [layer for block in vit_blocks for layer in (block.mlp_in, block.mlp_out)]
    if group == "image_projection":
        return [backbone.image_projection]
    raise ValueError(f"Unknown LoRA target {group!r}; choose from {LORA_GROUPS}.")


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
        raise ValueError(f"Unknown LoRA targets {unknown}; choose from {LORA_GROUPS}.")
    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be at least 1; got {rank}.")
    layers = [layer for group in targets for layer in projection_layers(backbone, group)]
    already = [layer.path for layer in layers if layer.lora_enabled]
    if already:
        raise ValueError(
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
        raise ValueError("This model has no LoRA adapters; call enable_lora() first.")
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
        raise ValueError(
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
            raise ValueError(
                f"{layer.path} is {layer.quantization_mode}-quantised: its LoRA "
                "adapters cannot be folded into the integer kernel. Keep them "
                "(generation uses them), or merge into a float model and quantise after."
            )
    for layer in _lora_layers(backbone):
        merged = layer.kernel  # Keras' property: base + (A @ B) * alpha / rank
        layer._kernel.assign(keras.ops.cast(merged, layer._kernel.dtype))
        # Keras untracks a variable attribute when it is deleted.
        layer._tracker.unlock()
        del layer.lora_kernel_a
        del layer.lora_kernel_b
        layer._tracker.lock()
        layer.lora_enabled = False
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
        raise ValueError(f"Unknown recipe {recipe!r}; choose from {RECIPES}.")
    if lora_variables(backbone):
        raise ValueError(
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
