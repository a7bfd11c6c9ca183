"""`PaliGemma2CausalLM`: the backbone plus tied logits for the text positions."""

import inspect
import sys

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_paligemma2.checkpoints import load_task
from keras_paligemma2.layers.vq_vae import MaskDecoder
from keras_paligemma2.models.backbone import PaliGemma2Backbone
from keras_paligemma2.models.backbone import validate_backbone_inputs
from keras_paligemma2.models.generation import DecodeLoop
from keras_paligemma2.models.generation import Sampler
from keras_paligemma2.models.task_outputs import parse_detections
from keras_paligemma2.models.task_outputs import paste_mask
from keras_paligemma2.preprocessing.image_converter import to_rgb_array
from keras_paligemma2.preprocessing.preprocessor import PaliGemma2CausalLMPreprocessor
from keras_paligemma2.preprocessing.preprocessor import shift_for_next_token
from keras_paligemma2.training import lora
from keras_paligemma2.training.callbacks import EpochOrder
from keras_paligemma2.training.callbacks import StopOnNonFiniteLoss
from keras_paligemma2.training.data import RawBatches
from keras_paligemma2.training.data import preprocessed_dataset
from keras_paligemma2.training.losses import ResponseAccuracy
from keras_paligemma2.training.losses import ResponseCrossEntropy
from keras_paligemma2.utils.files import DEFAULT_MAX_SHARD_SIZE_GB
from keras_paligemma2.utils.files import atomic_directory


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class PaliGemma2CausalLM(keras_hub.models.CausalLM):
    """PaliGemma 2 language-model head over the backbone.

    Called on the backbone's inputs it returns logits (B, T, vocabulary_size)
    for the text positions only: the image positions are never projected
    onto the vocabulary (keras-hub's PaliGemma spends most of its forward
    FLOPs there). The final logit soft-cap is applied when the backbone's
    `final_logit_soft_cap` is set: to every logit (scope "all", HF and
    keras-hub) or only to decode steps after the first generated token
    (scope "decode_steps", big_vision's Gemma 2 code). big_vision checkpoints
    load with it off, as big_vision's PaliGemma recipes set it to 0.

    Args:
        backbone: a `PaliGemma2Backbone`.
        preprocessor: None, or a preprocessor that turns raw images and text
            into backbone inputs. A task loaded from a checkpoint without a
            tokenizer has none and is called on backbone inputs directly.
        **kwargs: passed to `keras_hub.models.CausalLM` (`name`, `trainable`).

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
        # The KV-cache loop and its compiled functions, one per task.
        self._decode_loop = DecodeLoop(self)

    def text_logits(self, text_hidden, decode_step=False, soft_cap=True):
        """Tied-embedding logits in float32, soft-capped when configured.

        Args:
            text_hidden: float tensor (B, T, D), final-norm hidden states of
                the text positions.
            decode_step: bool (default False); True for the logits of a decode
                step after the first generated token, the only ones big_vision
                caps (scope "decode_steps").
            soft_cap: bool (default True); False skips the cap where only the
                argmax is used (greedy decoding): tanh is increasing, so the
                argmax is the same.

        Returns:
            Logits (B, T, V), float32.
        """
        logits = self.backbone.token_embedding(text_hidden, reverse=True)
        cap = self.backbone.final_logit_soft_cap
        if soft_cap and cap and (decode_step or self.backbone.final_logit_soft_cap_scope == "all"):
            logits = ops.tanh(logits / cap) * cap
        return logits

    def generate(
        self,
        inputs,
        max_new_tokens=64,
        max_length=None,
        stop_token_ids="auto",
        temperature=None,
        top_k=None,
        top_p=None,
        seed=0,
        beam_size=None,
        return_logits=False,
    ):
        """Decoding after a bidirectional prefill of image + prompt.

        With a preprocessor: `inputs` is `{"images": ..., "prompts": ...}`
        (one image and one string, or lists); returns the generated text
        without the prompt (a string, or a list of them), cut at the stop
        token. Without one: `inputs` holds `images`, `token_ids` and
        `padding_mask` (left-aligned prompts, `<bos> prompt "\n"`); returns
        `{"token_ids": (B, N) new tokens, "padding_mask": (B, N)}` with the
        stop token kept and padding after it.

        Args:
            inputs: see above.
            max_new_tokens: int, the most tokens to generate per example.
            max_length: int or None; if given, the most prompt + generated
                text tokens (keras-hub's meaning), replacing max_new_tokens.
            stop_token_ids: "auto" (`<eos>`), None, or a list of ids.
            temperature: float or None. 0 decodes greedily; above 0 samples
                from the logits divided by it. None (default): greedy, or
                1.0 when `top_k` / `top_p` is given (keras-hub's and
                big_vision's samplers).
            top_k: int or None; sample among the k most likely tokens.
            top_p: float or None; sample from the smallest set of most
                likely tokens whose probability reaches p (nucleus).
                `top_k` / `top_p` with `temperature=0` are an error.
            seed: int, for reproducible sampling.
            beam_size: int; beam search with big_vision's semantics (summed
                log-probabilities, no length normalisation; the best sequence
                that ends with the first stop token) instead of sampling.
            return_logits: bool; token ids in (no preprocessor) only: also
                return `"logits"` (B, N, V) float32, the logits each step
                chose from (final soft-cap as configured; 0 after every row
                stopped).

        Rows of a batch may have prompts of different lengths: each gives
        exactly what it gives alone. Prompt lengths are rounded up to a
        multiple of 16, so calls reuse one compiled function.
        """

        sampler = Sampler(temperature, top_k, top_p, seed)

        single = False
        if self.preprocessor is not None:
            single = isinstance(inputs.get("prompts"), str)
            features = self.preprocessor.generate_preprocess(inputs)
        else:
            features = dict(inputs)
            missing = [k for k in ("images", "token_ids", "padding_mask") if k not in features]
            if missing:
                raise ValueError(
                    f"Without a preprocessor, generate takes token ids: missing "
                    f"{missing}. Load a preset with a tokenizer to pass text."
                )
        images = np.asarray(features["images"], np.float32)
        token_ids = np.asarray(features["token_ids"])
        padding_mask = np.asarray(features["padding_mask"])
        if images.ndim == 3 + (self.backbone.num_images > 1):
            images = images[None]
        validate_backbone_inputs(
            {**features, "images": images, "response_mask": padding_mask * 0},
            self.backbone.image_size,
            self.backbone.num_images,
        )
        if max_length is not None:
            max_new_tokens = int(max_length) - int(padding_mask.sum(1).max())
            if max_new_tokens < 1:
                raise ValueError(
                    f"max_length={max_length} leaves no room after the longest "
                    "prompt; raise it or use max_new_tokens."
                )
        if stop_token_ids == "auto":
            end = self.preprocessor.tokenizer.end_token_id if self.preprocessor else 1
            stop_token_ids = [end]
        if return_logits and (self.preprocessor is not None or beam_size is not None):
            raise ValueError(
                "return_logits=True is for sampling or greedy decoding from "
                "token ids (a task without preprocessor), not for text or beam search."
            )
        if beam_size is not None:
            if temperature or top_k is not None or top_p is not None:
                raise ValueError("beam_size searches; it takes no temperature, top_k or top_p.")
            if not stop_token_ids:
                raise ValueError("Beam search needs a stop token (the end of a finished sequence).")
            tokens = self._decode_loop.beam_search(
                images, token_ids, padding_mask, max_new_tokens, beam_size, stop_token_ids[0]
            )
        else:
            tokens, logits = self._decode_loop(
                images,
                token_ids,
                padding_mask,
                max_new_tokens,
                stop_token_ids or [],
                sampler,
                step_logits=return_logits,
            )
        tokens = np.asarray(tokens)
        mask = _until_stop(tokens, stop_token_ids or [])
        if self.preprocessor is None:
            out = {"token_ids": tokens, "padding_mask": mask}
            if return_logits:
                out["logits"] = np.asarray(logits)
            return out
        texts = []
        for row, row_mask in zip(tokens, mask):
            kept = [
                int(t) for t, m in zip(row, row_mask) if m and int(t) not in (stop_token_ids or [])
            ]
            texts.append(self.preprocessor.tokenizer.detokenize(kept) if kept else "")
        return texts[0] if single else texts

    # --- Task prompts (big_vision's prefixes) ------------------------------

    def _ask_each(self, images, prompt, **kwargs):
        """(images as a list, one reply per image, whether a list was given)."""
        if self.preprocessor is None:
            raise ValueError(
                "This model has no tokenizer/preprocessor, so it cannot take "
                "text prompts. Load a preset that has one (registered names, HF "
                "directories with tokenizer.model, saved presets)."
            )
        many = isinstance(images, (list, tuple))
        batch = list(images) if many else [images]
        texts = self.generate({"images": batch, "prompts": [prompt] * len(batch)}, **kwargs)
        return batch, texts, many

    def _ask(self, images, prompt, **kwargs):
        _, texts, many = self._ask_each(images, prompt, **kwargs)
        return texts if many else texts[0]

    def caption(self, images, language="en", **kwargs):
        """`caption {language}`: a short caption of each image.

        Args:
            images: one image (a path, encoded bytes, a PIL image or an array
                (H, W, 3), uint8 or float) or a list of them; a list gives a list
                of replies.
            language: str, the caption language code (default "en").
            **kwargs: passed to `generate` (`max_new_tokens`, sampling, ...).

        Returns:
            The caption (str), or a list of them for a list of images.
        """
        return self._ask(images, f"caption {language}", **kwargs)

    def answer(self, images, question, language="en", **kwargs):
        """`answer {language} {question}`: the answer about each image.

        Args:
            images: one image (a path, encoded bytes, a PIL image or an array
                (H, W, 3), uint8 or float) or a list of them; a list gives a list
                of replies.
            question: str, the question (the same for every image).
            language: str, the language code of question and answer (default "en").
            **kwargs: passed to `generate` (`max_new_tokens`, sampling, ...).

        Returns:
            The answer (str), or a list of them for a list of images.
        """
        return self._ask(images, f"answer {language} {question}", **kwargs)

    def ocr(self, images, **kwargs):
        """`ocr`: the text in each image.

        Args:
            images: one image (a path, encoded bytes, a PIL image or an array
                (H, W, 3), uint8 or float) or a list of them; a list gives a list
                of replies.
            **kwargs: passed to `generate` (`max_new_tokens`, sampling, ...).

        Returns:
            The text (str), or a list of them for a list of images.
        """
        return self._ask(images, "ocr", **kwargs)

    def detect(self, images, labels, **kwargs):
        """`detect a ; b`: objects with pixel boxes in each image's own size.

        Args:
            images: one image (a path, encoded bytes, a PIL image or an array
                (H, W, 3), uint8 or float) or a list of them; a list gives a list
                of replies.
            labels: str or list of str, the object classes to find.
            **kwargs: passed to `generate` (`max_new_tokens`, sampling, ...).

        Returns:
            A list of `{"box": (y_min, x_min, y_max, x_max), "label"}` per
            image (a list of lists for a list of images).
        """

        labels = [labels] if isinstance(labels, str) else list(labels)
        batch, texts, many = self._ask_each(images, "detect " + " ; ".join(labels), **kwargs)
        found = [
            parse_detections(text, to_rgb_array(image).shape[:2])
            for image, text in zip(batch, texts)
        ]
        return found if many else found[0]

    def segment(self, images, label, mask_decoder, **kwargs):
        """`segment {label}`: objects with pixel boxes and boolean masks.

        Args:
            images: one image (a path, encoded bytes, a PIL image or an array
                (H, W, 3), uint8 or float) or a list of them; a list gives a list
                of replies.
            label: str, the object class to segment.
            mask_decoder: a `MaskDecoder`, or the path of big_vision's
                `vae-oid.npz`.
            **kwargs: passed to `generate` (`max_new_tokens` defaults to 64).

        Returns:
            A list of objects per image (a list of lists for a list of images):
            those of the reply with segmentation tokens, each `{"box", "label"}`
            as `detect` gives plus `"codes"` (16 ints) and `"mask"`, a bool
            (H, W) array in the image's own size.
        """

        if not isinstance(mask_decoder, MaskDecoder):
            mask_decoder = MaskDecoder.from_checkpoint(mask_decoder)
        kwargs.setdefault("max_new_tokens", 64)
        batch, texts, many = self._ask_each(images, f"segment {label}", **kwargs)
        results = []
        for image, text in zip(batch, texts):
            size = to_rgb_array(image).shape[:2]
            objects = [o for o in parse_detections(text, size) if "codes" in o]
            if objects:
                logits = np.asarray(mask_decoder(np.array([o["codes"] for o in objects])))
                for obj, mask_logits in zip(objects, logits):
                    obj["mask"] = paste_mask(mask_logits, obj["box"], size)
            results.append(objects)
        return results if many else results[0]

    def score(self, inputs, per_token=False):
        """Log-probabilities of given responses (big_vision's scoring logits).

        With a preprocessor: `{"images", "prompts", "responses"}`. Without:
        backbone inputs plus nothing else: `images`, `token_ids`,
        `padding_mask` and `response_mask` (1 on response tokens and
        `<eos>`), as the preprocessor lays them out.

        Args:
            inputs: dict, raw `{"images", "prompts", "responses"}` (with a
                preprocessor) or backbone inputs, each (B, T) but `images`
                (B, S, S, 3) (without one).
            per_token: bool (default False); True returns the per-token
                log-probabilities instead of their sum.

        Returns:
            (B,) summed log-probability of each response including `<eos>`,
            or with `per_token=True` (B, T) per-token log-probabilities
            (0 where not a response token).
        """
        if self.preprocessor is not None:
            x, labels, weights = self.preprocessor(inputs)
        else:
            missing = [
                k
                for k in ("images", "token_ids", "padding_mask", "response_mask")
                if k not in inputs
            ]
            if missing:
                raise ValueError(f"score takes backbone inputs; missing {missing}.")
            x, labels, weights = shift_for_next_token(inputs)
        logits = np.asarray(self(x, training=False), np.float32)
        log_probs = logits - _logsumexp(logits)
        picked = np.take_along_axis(log_probs, np.asarray(labels)[..., None], axis=-1)[..., 0]
        picked = picked * weights
        return picked if per_token else picked.sum(axis=1)

    # --- Training ------------------------------------------------------------

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        label_smoothing=0.0,
        loss_normalization="per_example",
        remat=False,
        **kwargs,
    ):
        """Configures training.

        Args:
            optimizer: "auto" (Adam, learning rate 2e-5, global gradient norm
                clipped at 1.0), or any Keras optimizer; for big_vision's
                recipe pass `keras_paligemma2.big_vision_optimizer(steps)`.
            loss: "auto": `ResponseCrossEntropy`, cross-entropy on response
                and `<eos>` tokens, as big_vision's training loss.
            weighted_metrics: "auto": `ResponseAccuracy`, next-token
                accuracy on the same tokens, normalised as the loss.
            label_smoothing: float in [0, 1), big_vision's smoothing, for
                the "auto" loss.
            loss_normalization: "per_example" (default; big_vision: each
                example's mean over its own response tokens, then the batch
                mean) or "per_token" (one mean over the batch's response
                tokens), for the "auto" loss and metric.
            remat: recompute each decoder and ViT block's activations in the
                backward pass instead of keeping them (less memory, about a
                third more compute).
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`).

        For mixed precision build or load the model with
        `dtype="mixed_bfloat16"` (float32 weights, bfloat16 compute).
        """

        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5, global_clipnorm=1.0)
        if loss == "auto":
            loss = ResponseCrossEntropy(label_smoothing, loss_normalization)
        elif label_smoothing or loss_normalization != "per_example":
            raise ValueError(
                "label_smoothing and loss_normalization apply to the 'auto' loss only."
            )
        if weighted_metrics == "auto":
            weighted_metrics = [ResponseAccuracy(loss_normalization)]
        self.backbone.set_remat(remat)
        keras.Model.compile(
            self, optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs
        )

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        shuffle=True,
        seed=0,
        validation_data=None,
        callbacks=None,
        **kwargs,
    ):
        """`keras.Model.fit` that also takes raw examples.

        `x` may be raw examples: a dict `{"images", "prompts", "responses"}`
        (arrays or lists, one entry per example; batched by `batch_size`,
        shuffled per epoch from `seed`), a `tf.data.Dataset` yielding batches
        of such dicts, or a generator of them; or, as in Keras, backbone
        inputs with labels and sample weights (what the preprocessor makes).
        `validation_data` takes the same forms. A loss that stops being
        finite stops training with an error naming the step.

        Args:
            x: raw examples (dict of `images`, `prompts`, `responses`), a
                `tf.data.Dataset` or generator of such batches, or backbone
                inputs as `keras.Model.fit` takes them.
            y: labels (B, T) for backbone inputs; None with raw examples.
            batch_size: int or None; for a raw dict, examples per batch
                (default 32); otherwise as in Keras.
            shuffle: bool (default True); raw dicts are shuffled per epoch
                from `seed`, plain arrays by Keras, datasets and generators
                never.
            seed: int (default 0), the shuffle seed of raw examples.
            validation_data: None, or data in any form `x` takes (not shuffled).
            callbacks: list of `keras.callbacks.Callback` or None; a
                `StopOnNonFiniteLoss` is added unless one is given.
            **kwargs: passed to `keras.Model.fit` (`epochs`, `steps_per_epoch`, ...).

        Returns:
            The `keras.callbacks.History` of the run.
        """

        callbacks = list(callbacks or [])
        # Only plain arrays are reordered by Keras; RawBatches shuffles from
        # its seed, datasets and generators come in the order they are made.
        keras_shuffle = shuffle and not (_is_raw(x) or _is_tf_dataset(x) or inspect.isgenerator(x))
        x, batch_size, order = self._training_data(x, y, batch_size, shuffle, seed)
        if order is not None:
            callbacks.append(order)
        if validation_data is not None:
            validation_data, _, _ = self._training_data(
                validation_data, None, batch_size, False, seed
            )
        if not any(isinstance(c, StopOnNonFiniteLoss) for c in callbacks):
            callbacks.append(StopOnNonFiniteLoss())
        return keras.Model.fit(
            self,
            x=x,
            y=y,
            batch_size=batch_size,
            shuffle=keras_shuffle,
            validation_data=validation_data,
            callbacks=callbacks,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        """`keras.Model.evaluate`, taking raw examples as `fit` does.

        Args:
            x: raw examples, a dataset or generator of them, or backbone
                inputs, as `fit` takes them (never shuffled).
            y: labels (B, T) for backbone inputs; None with raw examples.
            batch_size: int or None; for a raw dict, examples per batch
                (default 32); otherwise as in Keras.
            **kwargs: passed to `keras.Model.evaluate` (`steps`, `return_dict`, ...).
        """
        x, batch_size, _ = self._training_data(x, y, batch_size, False, 0)
        return keras.Model.evaluate(self, x=x, y=y, batch_size=batch_size, **kwargs)

    def _training_data(self, x, y, batch_size, shuffle, seed):
        """(data for keras, batch_size for keras, an EpochOrder callback or None)."""

        if _is_raw(x):
            if self.preprocessor is None:
                raise ValueError(
                    "Raw examples (prompts and responses) need a preprocessor; this "
                    "model has none. Pass token ids, labels and sample weights instead."
                )
            if y is not None:
                raise ValueError(
                    "With raw examples the labels come from x['responses']; pass no y."
                )
            batches = RawBatches(self.preprocessor, x, batch_size or 32, shuffle, seed)
            return batches, None, EpochOrder(batches)
        if _is_tf_dataset(x) or inspect.isgenerator(x):
            image_rank = 4 + (self.backbone.num_images > 1)
            return preprocessed_dataset(x, self.preprocessor, image_rank), None, None
        return x, batch_size, None

    # --- What trains ----------------------------------------------------------

    def enable_lora(self, rank, alpha=None, targets=("attention", "mlp")):
        """Freezes the model and adds LoRA adapters (see `keras_paligemma2.lora`).

        Args:
            rank: int, the adapters' rank.
            alpha: float, the update is scaled by alpha / rank (default rank).
            targets: groups of projections to adapt: "attention", "mlp"
                (decoder, the default), "vit_attention", "vit_mlp",
                "image_projection".
        """

        lora.enable_lora(self.backbone, rank, alpha, targets)

    def merge_lora(self):
        """Folds the adapters into the base weights and removes them."""

        lora.merge_lora(self.backbone)

    def save_lora_weights(self, path):
        """Saves the LoRA adapters by variable path (`.safetensors`, atomic).

        Args:
            path: str or path-like, the `.safetensors` file to write.
        """

        lora.save_lora_weights(self.backbone, path)

    def load_lora_weights(self, path):
        """Loads adapters into a model with the same `enable_lora` call made.

        Args:
            path: str or path-like, a file written by `save_lora_weights`.
        """

        lora.load_lora_weights(self.backbone, path)

    def set_trainable(self, recipe):
        """Freezing recipe for full fine-tuning: "attention_only" (big_vision's
        colab), "decoder_only" (image encoder frozen) or "all".

        Args:
            recipe: str, one of "attention_only", "decoder_only", "all"
                (else a ValueError; also one while LoRA adapters are present).
        """

        lora.set_trainable(self.backbone, recipe)

    def __call__(self, inputs, *args, **kwargs):
        validate_backbone_inputs(inputs, self.backbone.image_size, self.backbone.num_images)
        return super().__call__(inputs, *args, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=DEFAULT_MAX_SHARD_SIZE_GB):
        """Writes the task (backbone, preprocessor, tokenizer assets) as a
        Keras preset, atomically, as `PaliGemma2Backbone.save_to_preset`.

        Args:
            preset_dir: str or path-like, the directory to write (replaced if
                it exists).
            max_shard_size: int or float, the most GB per weights file
                (default `DEFAULT_MAX_SHARD_SIZE_GB`).
        """
        with atomic_directory(preset_dir) as staging:
            keras_hub.models.CausalLM.save_to_preset(self, staging, max_shard_size=max_shard_size)

    @classmethod
    def from_preset(cls, preset, load_weights=True, source=None, **overrides):
        """Builds the task from a preset name, checkpoint file or directory.

        Accepts what `PaliGemma2Backbone.from_preset` accepts. Checkpoints
        that carry no tokenizer give a task without a preprocessor, called on
        backbone inputs (`images`, `token_ids`, `padding_mask`,
        `response_mask`).

        Args:
            preset: str or path-like, as `PaliGemma2Backbone.from_preset` takes.
            load_weights: bool (default True); False builds the architecture
                with freshly initialised weights (the tokenizer is still loaded).
            source: None (default "big_vision"), "big_vision", "transformers"
                or "keras_hub"; for registered names only.
            **overrides: backbone constructor arguments replacing the
                checkpoint's config; for a Keras preset of this package, also
                `preprocessor` (a preprocessor, or None) replacing the saved one.
        """

        return load_task(cls, preset, load_weights=load_weights, source=source, **overrides)


def _is_raw(x):
    return isinstance(x, dict) and "prompts" in x


def _is_tf_dataset(x):

    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.data.Dataset)


def _until_stop(tokens, stop_token_ids):
    """1 on each row's tokens up to and including its first stop token."""
    mask = np.ones(tokens.shape, np.int32)
    for row in range(tokens.shape[0]):
        stops = np.flatnonzero(np.isin(tokens[row], stop_token_ids))
        if stops.size:
            mask[row, stops[0] + 1 :] = 0
    return mask


def _logsumexp(logits):
    top = logits.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
