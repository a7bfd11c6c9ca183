"""`PaliGemma2Backbone`: SigLIP encoder, linear projector and Gemma 2 decoder."""

import functools
import os

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np
from keras import ops

from keras_paligemma2.checkpoints import big_vision
from keras_paligemma2.checkpoints import hf
from keras_paligemma2.checkpoints import load_backbone
from keras_paligemma2.checkpoints import presets
from keras_paligemma2.layers import projections
from keras_paligemma2.layers.attention import make_attention_mask
from keras_paligemma2.layers.gemma import DecoderBlock
from keras_paligemma2.layers.gemma import RMSNorm
from keras_paligemma2.layers.gemma import TokenEmbedding
from keras_paligemma2.layers.remat import remat_policy
from keras_paligemma2.layers.siglip import VisionEncoder
from keras_paligemma2.models import calibration
from keras_paligemma2.models.layouts import ShapeRuleLayoutMap
from keras_paligemma2.models.layouts import check_axes
from keras_paligemma2.models.layouts import layout_map_for
from keras_paligemma2.training import lora
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.files import DEFAULT_MAX_SHARD_SIZE_GB
from keras_paligemma2.utils.files import atomic_directory
from keras_paligemma2.utils.keras_internals import should_quantize


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class PaliGemma2Backbone(keras_hub.models.Backbone):
    """PaliGemma 2: image tokens and text tokens through a Gemma 2 decoder.

    The image is encoded by a SigLIP ViT into one token per patch, projected
    linearly to the decoder width and placed, unscaled, before the text
    embeddings (scaled by sqrt(hidden_dim)). Positions run 0.. over image +
    text. The attention mask is big_vision's prefix-LM mask: image tokens and
    text tokens with `response_mask` 0 (bos, prompt, separator) attend to each
    other fully; response tokens are causal; padding is never attended.

    Semantics that differ between references are explicit arguments:
    `final_logit_soft_cap` (HF transformers and keras-hub apply it to every
    logit; big_vision does not on training/scoring logits, so checkpoints from
    big_vision load with None) and `sliding_window_size` (HF applies Gemma 2's
    4096 window on even layers, keeping the image + prefix block fully
    visible; big_vision has no window, so None there).

    Args:
        image_size: int, side of the square input image in pixels.
        vocabulary_size: int V, rows of the token embedding (257,152 for the
            released checkpoints).
        num_layers: int, decoder blocks.
        hidden_dim: int, decoder width D.
        num_query_heads: int N, query heads per decoder block.
        num_key_value_heads: int K, key/value heads (grouped-query attention;
            N % K == 0, else a ValueError).
        head_dim: int H.
        intermediate_dim: int F, width of *each* of the gate and up
            projections (keras-hub's `intermediate_dim` is 2F).
        patch_size: int, ViT patch side (default 14); `image_size` must be a
            multiple of it.
        vit_hidden_dim: int, SigLIP width (default 1152).
        vit_num_layers: int, SigLIP depth (default 27).
        vit_num_heads: int, SigLIP attention heads (default 16).
        vit_intermediate_dim: int, SigLIP MLP size (default 4304).
        query_pre_attn_scalar: float; queries are scaled by its inverse square
            root. head_dim for 3B/10B, hidden_dim / num_query_heads (144) for
            28B. Defaults to head_dim.
        attention_logit_soft_cap: float or None (default 50, Gemma 2's); None
            leaves attention logits uncapped.
        final_logit_soft_cap: float or None (default None: no cap); applied
            by the task to logits.
        final_logit_soft_cap_scope: which logits the final soft-cap applies
            to: "all" (default; HF transformers, keras-hub: every logit, training and
            scoring too) or "decode_steps" (big_vision's Gemma 2 code: only
            the logits of decode steps after the first generated token;
            never training, scoring or prefill logits).
        sliding_window_size: int or None (default); window of the local (even)
            layers; None gives every layer global attention.
        layer_norm_epsilon: float, RMSNorm epsilon of the decoder (1e-6).
        vit_layer_norm_epsilon: float, LayerNorm epsilon of the ViT (1e-6).
        rope_max_wavelength: float, RoPE base (10,000).
        num_images: int, images per example (1); with more, `images` is
            (B, num_images, S, S, 3) and their tokens come in order.
        dtype: Keras dtype policy (or its name) for variables and computation;
            None uses Keras' global policy.
        lora_adapters: None, or {projection name: [rank, alpha]}: the layers
            built with LoRA adapters (names as `lora.named_projections`, e.g.
            "decoder_block_3/attention/query"). Written by `get_config` for
            a model on which `enable_lora` was called, so that saves keep the
            adapters unmerged.
        trainable_variables: None (every weight trains), or the list of the
            variable paths that train (the others are frozen), as
            `enable_lora` / `set_trainable` left them.
        **kwargs: passed to `keras_hub.models.Backbone` (`name`, `trainable`).

    Inputs: dict with `images` (B, image_size, image_size, 3) in [-1, 1],
    `token_ids` (B, T) int, `padding_mask` (B, T) (1 on real tokens) and
    `response_mask` (B, T) (1 on response tokens).
    Output: hidden states (B, num_image_tokens + T, hidden_dim), after the
    final norm.

    Example:
    ```python
    import numpy as np
    from keras_paligemma2 import PaliGemma2Backbone

    backbone = PaliGemma2Backbone(
        image_size=28, patch_size=14, vit_hidden_dim=16, vit_num_layers=1,
        vit_num_heads=2, vit_intermediate_dim=32, vocabulary_size=100,
        num_layers=2, hidden_dim=32, num_query_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_dim=64,
    )
    hidden = backbone({
        "images": np.zeros((1, 28, 28, 3), "float32"),
        "token_ids": np.array([[2, 10, 11, 108, 20, 1]]),
        "padding_mask": np.ones((1, 6), "int32"),
        "response_mask": np.array([[0, 0, 0, 0, 1, 1]]),
    })
    hidden.shape  # (1, 4 + 6, 32)
    ```
    """

    def __init__(
        self,
        image_size,
        vocabulary_size,
        num_layers,
        hidden_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        intermediate_dim,
        patch_size=14,
        vit_hidden_dim=1152,
        vit_num_layers=27,
        vit_num_heads=16,
        vit_intermediate_dim=4304,
        query_pre_attn_scalar=None,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=None,
        final_logit_soft_cap_scope="all",
        sliding_window_size=None,
        layer_norm_epsilon=1e-6,
        vit_layer_norm_epsilon=1e-6,
        rope_max_wavelength=10_000,
        num_images=1,
        dtype=None,
        lora_adapters=None,
        trainable_variables=None,
        **kwargs,
    ):
        if num_query_heads % num_key_value_heads:
            raise InputError(
                f"num_query_heads ({num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})."
            )
        if final_logit_soft_cap_scope not in ("all", "decode_steps"):
            raise InputError(
                'final_logit_soft_cap_scope must be "all" (HF, keras-hub) or '
                f'"decode_steps" (big_vision); got {final_logit_soft_cap_scope!r}.'
            )
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = head_dim

        # === Layers ===
        self.vision_encoder = VisionEncoder(
            image_size=image_size,
            patch_size=patch_size,
            hidden_dim=vit_hidden_dim,
            num_layers=vit_num_layers,
            num_heads=vit_num_heads,
            intermediate_dim=vit_intermediate_dim,
            layer_norm_epsilon=vit_layer_norm_epsilon,
            dtype=dtype,
            name="vision_encoder",
        )
        self.image_projection = projections.Dense(hidden_dim, dtype=dtype, name="image_projection")
        self.token_embedding = TokenEmbedding(
            vocabulary_size, hidden_dim, dtype=dtype, name="token_embedding"
        )
        self.decoder_blocks = [
            DecoderBlock(
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                intermediate_dim=intermediate_dim,
                query_pre_attn_scalar=query_pre_attn_scalar,
                attention_logit_soft_cap=attention_logit_soft_cap,
                layer_norm_epsilon=layer_norm_epsilon,
                rope_max_wavelength=rope_max_wavelength,
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = RMSNorm(epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm")

        # === Functional model ===
        if num_images < 1:
            raise InputError(f"num_images must be at least 1; got {num_images}.")
        self.num_images = num_images
        self.num_image_tokens = num_images * self.vision_encoder.num_patches
        image_shape = (image_size, image_size, 3)
        images = keras.Input(
            shape=image_shape if num_images == 1 else (num_images,) + image_shape,
            name="images",
        )
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        response_mask = keras.Input(shape=(None,), dtype="int32", name="response_mask")
        self.sliding_window_size = sliding_window_size
        x, positions, masks, _ = self.decoder_inputs(
            self.embed_images(images), token_ids, padding_mask, response_mask
        )
        for block, mask in zip(self.decoder_blocks, masks):
            x = block(x, positions, mask)
        x = self.final_norm(x)
        super().__init__(
            inputs={
                "images": images,
                "token_ids": token_ids,
                "padding_mask": padding_mask,
                "response_mask": response_mask,
            },
            outputs=x,
            dtype=dtype,
            **kwargs,
        )

        lora.apply_training_setup(
            self, {"lora_adapters": lora_adapters, "trainable_variables": trainable_variables}
        )

        # === Config ===
        self.image_size = image_size
        self.patch_size = patch_size
        self.vit_hidden_dim = vit_hidden_dim
        self.vit_num_layers = vit_num_layers
        self.vit_num_heads = vit_num_heads
        self.vit_intermediate_dim = vit_intermediate_dim
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_soft_cap = attention_logit_soft_cap
        self.final_logit_soft_cap = final_logit_soft_cap
        self.final_logit_soft_cap_scope = final_logit_soft_cap_scope
        self.layer_norm_epsilon = layer_norm_epsilon
        self.vit_layer_norm_epsilon = vit_layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength

    def default_lora_layer_names(self):
        """keras-hub's LoRA targets: the query and value projections of the
        decoder and the ViT (the names keras-hub's PaliGemma lists that
        exist here)."""
        return ["query", "value"]

    def enable_lora(self, rank, target_layer_names=None):
        """keras-hub's `Backbone.enable_lora`: freezes every weight and adds
        rank-`rank` adapters (scale 1: alpha = rank) to the layers named
        `target_layer_names`, by default the decoder's and the ViT's query
        and value projections. The task's `enable_lora(rank, alpha,
        targets)` chooses by group instead (decoder attention and MLP by
        default); both make the same adapters, saved and loaded by path.

        Args:
            rank: int >= 1, the adapters' rank.
            target_layer_names: None (`default_lora_layer_names()`) or a list
                of layer names, e.g. ["query", "key", "value", "output"].
        """
        names = (
            self.default_lora_layer_names() if target_layer_names is None else target_layer_names
        )
        lora.enable_lora_by_layer_name(self, rank, names)

    def quantize(self, mode=None, config=None, filters=None, quantize_vision=True, **kwargs):
        """Keras' `Model.quantize`, with the decoder alone a keyword away.

        `quantize_vision=False` quantises the decoder's projections only (the
        ViT and the image projection stay float): what QLoRA usually wants,
        and what `from_preset(..., quantization=)` and the planner assume by
        default. Keras' string `filters` match layer *names*, which the ViT
        and the decoder share (`query`, ...), so they cannot say this.

        "gptq" runs Keras' GPTQ solver on image + text calibration batches
        (`calibration.gptq_calibrate`): `config` is a
        `keras.quantizers.GPTQConfig` whose `dataset` is a list of dicts of
        backbone inputs (`images`, `token_ids`, `padding_mask`,
        `response_mask`; `PaliGemma2CausalLM.quantize` makes them from
        prompts and responses); its `tokenizer` and `sequence_length` are
        not used, and at most `num_samples` examples are. Keras' AWQ is not
        offered: its 3-D kernel reading does not fit the decoder's
        projections.

        Args:
            mode: str, Keras' mode ("int8", "int4", "float8", "gptq"); may
                be None with a `config`.
            config: a Keras `QuantizationConfig` or None; required for "gptq".
            filters: Keras' filters (regex, list of them, or a callable on a
                layer); only with `quantize_vision=True`.
            quantize_vision: bool (default True: every projection, as Keras
                quantises them); False: the decoder's only.
            **kwargs: passed to Keras' `quantize`.

        Example:
        ```python
        backbone.quantize(
            "gptq",
            config=keras.quantizers.GPTQConfig(dataset=batches, tokenizer=None),
            quantize_vision=False,
        )
        ```
        """
        mode = mode or getattr(config, "mode", None)
        if filters is None:
            # The projections alone: Keras would also offer every norm,
            # embedding and convolution, each refusing with a warning.
            filters = functools.partial(
                projections.quantizes_layer, quantize_vision=quantize_vision
            )
        elif not quantize_vision:
            raise InputError(
                "Give either `filters` or `quantize_vision=False` (the "
                "decoder's projections), not both."
            )
        if mode == "awq":
            raise InputError(
                "quantize(\"awq\") is not offered: Keras' AWQ misreads the decoder's "
                '(heads, width, head_dim) kernels. Use "gptq" (calibrated) or "int4".'
            )
        if mode != "gptq":
            return super().quantize(mode, config=config, filters=filters, **kwargs)
        batches = _calibration_batches(config)
        for layer in self._flatten_layers():
            if not list(layer._flatten_layers(include_self=False)) and should_quantize(
                layer, filters
            ):
                layer.quantize("gptq", config=config)
        calibration.gptq_calibrate(self, batches, config)
        self.train_function = self.test_function = self.predict_function = None

    @classmethod
    def get_layout_map(
        cls,
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
        *,
        config=None,
        fsdp=False,
    ):
        """A `keras.distribution.LayoutMap` for the backbone's weights on
        `device_mesh`, valid for any mesh shape: a dimension is sharded only
        where the axis divides it (see `keras_paligemma2.models.layouts`).

        keras-hub's signature: without `config`, each weight's layout is
        decided when it is created, from its path and shape. With `config`
        every entry is listed up front (inspectable, no creation needed).

        Args:
            device_mesh: `keras.distribution.DeviceMesh` with both axes
                among its axis names (else a ValueError).
            model_parallel_dim_name: str, the tensor-parallel mesh axis
                (default "model", keras-hub's name).
            data_parallel_dim_name: str, the data-parallel mesh axis
                (default "batch").
            config: None, a dict of backbone constructor arguments, or a
                registered or shipped preset name (or a Keras preset
                directory).
            fsdp: bool; also shard large weights over the data axis, for
                training (default False).

        Returns:
            A `keras.distribution.LayoutMap` (`ShapeRuleLayoutMap` without a
            config, `PathLayoutMap`, looked up by exact path, with one).

        Example:
        ```python
        import keras
        from keras_paligemma2 import PaliGemma2Backbone

        mesh = keras.distribution.DeviceMesh((1, 8), ("batch", "model"))
        layouts = PaliGemma2Backbone.get_layout_map(mesh, model_parallel_dim_name="model")
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch"))
        ```
        """
        model_axis, data_axis = model_parallel_dim_name, data_parallel_dim_name
        if model_axis not in device_mesh.axis_names and (
            isinstance(model_axis, dict)
            or model_axis in presets.list_presets()
            or os.path.isdir(str(model_axis))
        ):
            raise InputError(
                f"get_layout_map's second argument is keras-hub's model_parallel_dim_name "
                f"(a mesh axis); pass the backbone config as config={model_axis!r}."
            )
        if config is None:
            return ShapeRuleLayoutMap(device_mesh, model_axis, data_axis, fsdp)
        if isinstance(config, str):
            config = presets.preset_config(config)
        check_axes(device_mesh, model_axis, data_axis)
        return layout_map_for(device_mesh, cls.weight_shapes(config), model_axis, data_axis, fsdp)

    @classmethod
    def weight_shapes(cls, config):
        """[(variable path, shape)] of every weight of a backbone with
        `config` (a dict), found under `jax.eval_shape`: nothing allocated.

        Args:
            config: dict of backbone constructor arguments (`cls(**config)`).
        """
        found = []

        def build():
            backbone = cls(**config)
            found.extend((v.path, tuple(v.shape)) for v in backbone.weights)

        jax.eval_shape(build)
        return found

    def set_remat(self, enabled=True):
        """Recompute each decoder and ViT block in the backward pass (less
        activation memory, more compute). Takes effect when the training
        step is next traced (`compile` resets it).

        Args:
            enabled: True or "block" (each block keeps only its input;
                about a third more compute), "matmuls" (each block also
                keeps its projections' outputs: attention scores, softmax,
                norms and activations are recomputed), or False (default
                for `compile`: activations are kept).
        """
        policy = remat_policy(enabled)
        for block in list(self.decoder_blocks) + list(self.vision_encoder.blocks):
            block.remat = policy

    @staticmethod
    def is_local_layer(index, sliding_window_size):
        """Gemma 2 alternates local and global layers, starting local.

        Args:
            index: int, the decoder block's 0-based index.
            sliding_window_size: int or None; None means no local layers.

        Returns:
            bool, whether block `index` uses the sliding-window mask.
        """
        return sliding_window_size is not None and index % 2 == 0

    def embed_images(self, images):
        """Image tokens (B, num_image_tokens, hidden_dim), projected, unscaled.

        Several images per example (B, n, S, S, 3) are encoded as one batch
        and their tokens concatenated in order, as big_vision does for
        multi-image and video-frame tasks.

        Args:
            images: float tensor (B, S, S, 3) in [-1, 1], or (B, num_images,
                S, S, 3) when the backbone takes several images per example.
        """
        if self.num_images == 1:
            return self.image_projection(self.vision_encoder(images))
        side = self.vision_encoder.image_size
        flat = ops.reshape(images, (-1, side, side, 3))
        tokens = self.image_projection(self.vision_encoder(flat))
        return ops.reshape(tokens, (-1, self.num_image_tokens, self.image_projection.units))

    def decoder_inputs(self, image_tokens, token_ids, padding_mask, response_mask):
        """What the first decoder block takes: image + text tokens, and
        each block's positions and attention mask.

        Args:
            image_tokens: (B, num_image_tokens, hidden_dim), `embed_images`'.
            token_ids: int (B, T) text tokens.
            padding_mask: int (B, T), 1 for real text tokens.
            response_mask: int (B, T), 1 for response (causal) tokens.

        Returns:
            `(x, positions, masks, valid)`: x (B, num_image_tokens + T,
            hidden_dim), positions int (B, num_image_tokens + T), one bool
            mask per decoder block (B, T', T'), valid int (B, T'), 1 for
            real tokens.
        """
        text_tokens = self.token_embedding(token_ids)
        x = ops.concatenate([ops.cast(image_tokens, text_tokens.dtype), text_tokens], axis=1)
        valid, blocks, positions = self._sequence_layout(padding_mask, response_mask)
        global_mask = make_attention_mask(valid, blocks)
        local_mask = global_mask
        if self.sliding_window_size is not None:
            local_mask = make_attention_mask(valid, blocks, sliding_window=self.sliding_window_size)
        masks = [
            local_mask if self.is_local_layer(i, self.sliding_window_size) else global_mask
            for i in range(len(self.decoder_blocks))
        ]
        return x, positions, masks, valid

    def _sequence_layout(self, padding_mask, response_mask):
        """Validity, prefix-LM block numbers and positions over image + text."""
        # Built from the masks' own shapes, so that it traces symbolically.
        text_valid = ops.cast(padding_mask, "int32")
        image_ones = ops.zeros_like(text_valid[:, :1]) + ops.ones(
            (1, self.num_image_tokens), "int32"
        )
        valid = ops.concatenate([image_ones, text_valid], axis=1)
        mask_ar = ops.concatenate([0 * image_ones, ops.cast(response_mask, "int32")], axis=1)
        blocks = ops.cumsum(mask_ar, axis=1)
        positions = ops.cumsum(ops.ones_like(valid), axis=1) - 1
        return valid, blocks, positions

    def __call__(self, inputs, *args, **kwargs):
        validate_backbone_inputs(inputs, self.image_size, self.num_images)
        return super().__call__(inputs, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size,
            patch_size=self.patch_size,
            vit_hidden_dim=self.vit_hidden_dim,
            vit_num_layers=self.vit_num_layers,
            vit_num_heads=self.vit_num_heads,
            vit_intermediate_dim=self.vit_intermediate_dim,
            vocabulary_size=self.vocabulary_size,
            num_layers=self.num_layers,
            hidden_dim=self.hidden_dim,
            num_query_heads=self.num_query_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_dim=self.intermediate_dim,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            attention_logit_soft_cap=self.attention_logit_soft_cap,
            final_logit_soft_cap=self.final_logit_soft_cap,
            final_logit_soft_cap_scope=self.final_logit_soft_cap_scope,
            sliding_window_size=self.sliding_window_size,
            layer_norm_epsilon=self.layer_norm_epsilon,
            vit_layer_norm_epsilon=self.vit_layer_norm_epsilon,
            rope_max_wavelength=self.rope_max_wavelength,
            num_images=self.num_images,
            **self._training_state(),
        )
        return config

    def _training_state(self):
        # Quantisation modes are kept by keras-hub's `Backbone.get_config`
        # (a `DTypePolicyMap` by layer path), so they are not repeated here.
        setup = lora.training_setup(self)
        del setup["quantized_layers"]
        return setup

    def save_to_big_vision(self, path):
        """Writes a big_vision checkpoint `.npz` (the layout `paligemma.load`
        reads; bfloat16 as the released `.b16.npz`), one layer slice at a
        time, atomically; LoRA adapters folded in, the model unchanged.

        Args:
            path: str or path-like, the `.npz` file to write.
        """
        big_vision.write_checkpoint(self, path)

    def save_to_transformers(self, directory, max_shard_size=DEFAULT_MAX_SHARD_SIZE_GB):
        """Writes a transformers `PaliGemmaForConditionalGeneration` directory (config.json
        with this model's semantics, `.safetensors` with the Hub's key names and padded
        embedding), one tensor at a time, atomically; LoRA adapters folded in, the model
        unchanged. No tokenizer: the task's `save_to_transformers` adds it.

        Args:
            directory: str or path-like, the directory to write (replaced if it exists).
            max_shard_size: float, the most GB per `.safetensors` file (default 2).
        """
        hf.write_checkpoint(self, directory, max_shard_size=max_shard_size)

    def save_to_preset(self, preset_dir, max_shard_size=DEFAULT_MAX_SHARD_SIZE_GB):
        """Writes a Keras preset directory that `from_preset` loads back exactly.

        Written to a temporary directory beside `preset_dir` and renamed into
        place when complete, so an interrupted save never leaves a broken
        preset nor loses an existing one. Weights above `max_shard_size` GB
        are split into shards.

        Args:
            preset_dir: str or path-like, the directory to write (replaced if
                it exists).
            max_shard_size: int or float, the most GB per weights file
                (default `DEFAULT_MAX_SHARD_SIZE_GB`).
        """
        with atomic_directory(preset_dir) as staging:
            keras_hub.models.Backbone.save_to_preset(self, staging, max_shard_size=max_shard_size)

    @classmethod
    def from_preset(
        cls,
        preset,
        load_weights=True,
        source=None,
        quantization=None,
        quantize_vision=False,
        **overrides,
    ):
        """Builds the backbone from a preset name, checkpoint file or directory.

        `preset` may be:
        - a registered name (`keras_paligemma2.list_presets()`), e.g.
          `"pg2_10b_224"`: the released weights are downloaded from
          `source`, `"big_vision"` (default: the `.b16.npz` the weights were
          trained with, from the Hugging Face Hub), `"transformers"` (the HF
          repository's safetensors) or `"keras_hub"` (keras-hub's Kaggle
          preset). With `load_weights=False`, only the architecture.
        - a big_vision checkpoint `path/to/file.npz` (float32 or `.b16`);
        - an HF transformers directory (`config.json` + `*.safetensors`);
        - a Keras preset directory written by `save_to_preset`, a keras-hub
          PaliGemma 2 preset directory, or a `kaggle://` handle of either.

        The weights are gated: accept the Gemma licence on the model page,
        then log in (`hf auth login` or HF_TOKEN; Kaggle credentials for
        `kaggle://`). Loading streams: each tensor is read from its memory
        map straight into its variable, in the variable's dtype.

        `overrides` replace config values (e.g. `dtype="bfloat16"`,
        `query_pre_attn_scalar=144`), for what tensor shapes cannot tell.

        Args:
            preset: str or path-like, a preset name, checkpoint file, directory
                or `kaggle://` handle, as above.
            load_weights: bool (default True); False builds the architecture
                with freshly initialised weights.
            source: None (default "big_vision"), "big_vision", "transformers"
                or "keras_hub"; for registered names only (else a ValueError).
            quantization: None (default), "int8" or "int4": Keras'
                quantised kernels for the decoder's projections, each kernel
                quantised as it is read, so the float model is never held
                (a 10B checkpoint quantises in less memory than its bfloat16
                size); the same values as `quantize(mode)` after loading.
                A Keras preset (`save_to_preset`) is loaded, then quantised.
            quantize_vision: bool (default False); with `quantization`, the
                ViT's and the image projection's kernels too.
            **overrides: backbone constructor arguments replacing the
                checkpoint's config (unknown names are a ValueError).
        """

        return load_backbone(
            cls,
            preset,
            load_weights=load_weights,
            source=source,
            quantization=quantization,
            quantize_vision=quantize_vision,
            **overrides,
        )


_BACKBONE_INPUTS = ("images", "token_ids", "padding_mask", "response_mask")


def _calibration_batches(config):
    """GPTQ's calibration batches: `config.dataset`, checked, cut to
    `config.num_samples` examples."""
    if not isinstance(config, keras.quantizers.GPTQConfig) or config.dataset is None:
        raise InputError(
            'quantize("gptq") needs config=keras.quantizers.GPTQConfig(dataset=batches, '
            "tokenizer=None), batches a list of dicts of backbone inputs (or call "
            "PaliGemma2CausalLM.quantize with raw images, prompts and responses)."
        )
    if config.group_size == -1:
        raise InputError(
            "GPTQConfig(group_size=-1) is not supported: Keras' GPTQ then gives a kernel "
            "with more than 128 inputs one scale per 128 columns, more than its layer "
            "holds. Give a group size, e.g. 128 (Keras' default)."
        )
    batches, left = [], config.num_samples
    for batch in config.dataset:
        if not isinstance(batch, dict) or set(calibration.BATCH_KEYS) - set(batch):
            raise InputError(
                f"Each GPTQ calibration batch must be a dict with {calibration.BATCH_KEYS}; "
                f"got {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
                + ". PaliGemma2CausalLM.quantize preprocesses raw examples."
            )
        count = min(left, len(batch["token_ids"]))
        batches.append({key: batch[key][:count] for key in calibration.BATCH_KEYS})
        left -= count
        if left == 0:
            break
    if not batches:
        raise InputError("The GPTQ calibration dataset is empty.")
    return batches


def validate_backbone_inputs(inputs, image_size, num_images=1):
    """Raises a ValueError naming what is wrong with a backbone input dict.

    Args:
        inputs: dict with exactly `images`, `token_ids`, `padding_mask` and
            `response_mask` (arrays or symbolic tensors, as the backbone takes).
        image_size: int S; `images` must be S x S.
        num_images: int, images per example (1: `images` is (B, S, S, 3); more:
            (B, num_images, S, S, 3)).
    """
    if not isinstance(inputs, dict):
        raise InputError(
            "PaliGemma2Backbone takes a dict with keys "
            f"{list(_BACKBONE_INPUTS)}; got {type(inputs).__name__}."
        )
    missing = [k for k in _BACKBONE_INPUTS if k not in inputs]
    unknown = [k for k in inputs if k not in _BACKBONE_INPUTS]
    if missing or unknown:
        raise InputError(
            f"Backbone inputs: missing keys {missing}, unexpected keys "
            f"{unknown}; expected exactly {list(_BACKBONE_INPUTS)}."
        )
    images = inputs["images"]
    shape = tuple(ops.shape(images))
    if num_images > 1:
        if len(shape) != 5 or shape[1] != num_images:
            raise InputError(
                f"This model takes {num_images} images per example: `images` "
                "must have shape (batch, num_images, height, width, 3); got "
                f"shape {shape}."
            )
        shape = (shape[0],) + shape[2:]
    if len(shape) != 4 or shape[-1] != 3:
        raise InputError(
            "`images` must have shape (batch, height, width, 3) with values in "
            f"[-1, 1]; got shape {shape}."
        )
    if shape[1:3] != (image_size, image_size):
        raise InputError(
            f"`images` must be {image_size}x{image_size} for this model; got "
            f"{shape[1]}x{shape[2]}. Resize them first (the preprocessor's "
            "image converter does this)."
        )
    token_shape = tuple(ops.shape(inputs["token_ids"]))
    if len(token_shape) != 2:
        raise InputError(f"`token_ids` must have shape (batch, length); got {token_shape}.")
    for key in ("padding_mask", "response_mask"):
        mask_shape = tuple(ops.shape(inputs[key]))
        if mask_shape != token_shape:
            raise InputError(
                f"`{key}` has shape {mask_shape} but `token_ids` has shape "
                f"{token_shape}; they must match."
            )
    if shape[0] is not None and token_shape[0] is not None and shape[0] != token_shape[0]:
        raise InputError(
            f"Batch sizes differ: {shape[0]} images but {token_shape[0]} token sequences."
        )
    _check_image_range(images)


def _check_image_range(images):
    """Concrete images (not traced) must be in [-1, 1], the converter's
    output: other ranges would give other logits, silently."""
    if isinstance(images, (keras.KerasTensor, jax.core.Tracer)):
        return
    if isinstance(images, jax.Array) and not images.is_fully_addressable:
        return  # Several hosts: each checks what it passed in.
    dtype = np.dtype(images.dtype) if hasattr(images, "dtype") else np.asarray(images).dtype
    if not np.issubdtype(dtype, np.floating):
        raise InputError(
            f"`images` are {dtype}; the backbone takes float images in [-1, 1]. "
            "Pass raw images through PaliGemma2ImageConverter (the preprocessor "
            "does), or convert [0, 255] levels with `x / 127.5 - 1`."
        )
    if not np.size(images):
        return
    with jax.ensure_compile_time_eval():  # Concrete values, even inside a trace.
        low, high = float(jnp.min(images)), float(jnp.max(images))
    # Antialiased float resizes overshoot [0, 255] by ~1e-4 of a level.
    if not (np.isfinite(low) and np.isfinite(high)) or low < -1.001 or high > 1.001:
        raise InputError(
            f"`images` must be in [-1, 1] (what PaliGemma2ImageConverter gives); "
            f"got values in [{low:.4g}, {high:.4g}]. Pass raw images through the "
            "converter (the preprocessor does), or convert [0, 255] levels with "
            "`x / 127.5 - 1`."
        )
