"""`PaliGemma2CausalLM`: the backbone plus tied logits for the text positions."""

import keras
import keras_hub
from keras import ops

from keras_paligemma2.backbone import PaliGemma2Backbone
from keras_paligemma2.backbone import validate_backbone_inputs
from keras_paligemma2.preprocessor import PaliGemma2CausalLMPreprocessor
from keras_paligemma2.saving import DEFAULT_MAX_SHARD_SIZE_GB
from keras_paligemma2.saving import atomic_directory


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class PaliGemma2CausalLM(keras_hub.models.CausalLM):
    """PaliGemma 2 language-model head over the backbone.

    Called on the backbone's inputs it returns logits (B, T, vocabulary_size)
    for the text positions only: the image positions are never projected
    onto the vocabulary (keras-hub's PaliGemma spends most of its forward
    FLOPs there). The final logit soft-cap is applied when the backbone's
    `final_logit_soft_cap` is set (HF semantics); big_vision checkpoints load
    with it off, as big_vision scores and trains without it.

    Args:
        backbone: a `PaliGemma2Backbone`.
        preprocessor: None, or a preprocessor that turns raw images and text
            into backbone inputs. A task loaded from a checkpoint without a
            tokenizer has none and is called on backbone inputs directly.

    Example:
    ```python
    import numpy as np
    from keras_paligemma2 import PaliGemma2Backbone, PaliGemma2CausalLM

    backbone = PaliGemma2Backbone(
        image_size=28, patch_size=14, vit_hidden_dim=16, vit_num_layers=1,
        vit_num_heads=2, vit_intermediate_dim=32, vocabulary_size=100,
        num_layers=2, hidden_dim=32, num_query_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_dim=64,
    )
    lm = PaliGemma2CausalLM(backbone)
    logits = lm({
        "images": np.zeros((1, 28, 28, 3), "float32"),
        "token_ids": np.array([[2, 10, 11, 108, 20, 1]]),
        "padding_mask": np.ones((1, 6), "int32"),
        "response_mask": np.array([[0, 0, 0, 0, 1, 1]]),
    })
    logits.shape  # (1, 6, 100)
    ```
    """

    backbone_cls = PaliGemma2Backbone
    preprocessor_cls = PaliGemma2CausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden = backbone(inputs)
        text_hidden = hidden[:, backbone.num_image_tokens :, :]
        logits = self.text_logits(text_hidden)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

    def text_logits(self, text_hidden):
        """Tied-embedding logits in float32, soft-capped when configured."""
        logits = self.backbone.token_embedding(text_hidden, reverse=True)
        cap = self.backbone.final_logit_soft_cap
        if cap:
            logits = ops.tanh(logits / cap) * cap
        return logits

    def __call__(self, inputs, *args, **kwargs):
        validate_backbone_inputs(inputs, self.backbone.image_size)
        return super().__call__(inputs, *args, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=DEFAULT_MAX_SHARD_SIZE_GB):
        """Writes the task (backbone, preprocessor, tokenizer assets) as a
        Keras preset, atomically, as `PaliGemma2Backbone.save_to_preset`."""
        with atomic_directory(preset_dir) as staging:
            keras_hub.models.CausalLM.save_to_preset(self, staging, max_shard_size=max_shard_size)

    @classmethod
    def from_preset(cls, preset, load_weights=True, source=None, **overrides):
        """Builds the task from a preset name, checkpoint file or directory.

        Accepts what `PaliGemma2Backbone.from_preset` accepts. Checkpoints
        that carry no tokenizer give a task without a preprocessor, called on
        backbone inputs (`images`, `token_ids`, `padding_mask`,
        `response_mask`).
        """
        from keras_paligemma2.checkpoints import load_task

        return load_task(
            cls, preset, load_weights=load_weights, source=source, **overrides
        )
