"""`PaliGemma2CausalLM`: the backbone plus tied logits for the text positions."""

import copy
import inspect
import sys
import warnings

import jax
import keras
import keras_hub
import numpy as np
from jax.experimental import multihost_utils
from keras import ops

from keras_paligemma2.checkpoints import hf
from keras_paligemma2.checkpoints import load_task
from keras_paligemma2.checkpoints.presets import GEMMA_SEPARATOR_ID
from keras_paligemma2.checkpoints.presets import GEMMA_VOCABULARY_SIZE
from keras_paligemma2.layers.vq_vae import MaskDecoder
from keras_paligemma2.models.backbone import PaliGemma2Backbone
from keras_paligemma2.models.backbone import validate_backbone_inputs
from keras_paligemma2.models.constraints import AllowedTokens
from keras_paligemma2.models.constraints import TaskFormat
from keras_paligemma2.models.generation import DecodeLoop
from keras_paligemma2.models.generation import Sampler
from keras_paligemma2.models.generation import keras_hub_sampling
from keras_paligemma2.models.task_outputs import parse_detections
from keras_paligemma2.models.task_outputs import paste_mask
from keras_paligemma2.preprocessing.image_converter import to_rgb_array
from keras_paligemma2.preprocessing.preprocessor import PaliGemma2CausalLMPreprocessor
from keras_paligemma2.preprocessing.preprocessor import shift_for_next_token
from keras_paligemma2.training import lora
from keras_paligemma2.training.callbacks import EpochOrder
from keras_paligemma2.training.callbacks import StopOnNonFiniteLoss
from keras_paligemma2.training.callbacks import TrainingCheckpoint
from keras_paligemma2.training.data import RawBatches
from keras_paligemma2.training.data import preprocessed_dataset
from keras_paligemma2.training.losses import ResponseAccuracy
from keras_paligemma2.training.losses import ResponseCrossEntropy
from keras_paligemma2.training.losses import chunked_token_cross_entropy
from keras_paligemma2.training.losses import reduce_over_responses
from keras_paligemma2.utils.errors import InputError
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
        # What generate samples with when not told (`compile(sampler=...)`).
        self.sampler = "greedy"

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
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=None,
        *,
        max_new_tokens=None,
        temperature=None,
        top_k=None,
        top_p=None,
        seed=None,
        beam_size=None,
        return_logits=False,
        add_separator=False,
        allowed_tokens=None,
        constrain=None,
    ):
        """Decoding after a bidirectional prefill of image + prompt.

        Text in (`{"images": ..., "prompts": ...}`, one image and one string
        or lists; needs a preprocessor): returns the reply without the
        prompt (a string, or a list of them), cut at the stop token; with
        `strip_prompt=False` keras-hub's text, prompt + "\n" + reply.

        Token ids in (`images`, `token_ids`, `padding_mask`: prompts
        left-aligned, `<bos> prompt "\n"`): returns keras-hub's layout,
        `{"token_ids", "padding_mask", "images"}` with each row's prompt
        followed by its completion at the input's width (the padding is the
        room to generate) and `padding_mask` True through the first stop
        token (0 after it); with `strip_prompt=True` the new tokens only,
        (B, N) from index 0.

        Sampling: the arguments below, else the sampler given to `compile`
        (keras-hub's names and `keras_hub.samplers` objects), else greedy.

        Args:
            inputs: see above.
            max_length: int or None; the most prompt + generated text tokens
                (keras-hub's meaning: for token ids, the output width).
            stop_token_ids: "auto" (`<eos>`), None, or a list of ids.
            strip_prompt: None (default: text gives the reply only, token
                ids keras-hub's prompt + completion layout), True (reply /
                new tokens only) or False (prompt + completion, keras-hub's).
            max_new_tokens: int or None, the most tokens to generate per
                example (default: 64 for text; for token ids the input's
                padding). Not with `max_length`.
            temperature: float or None. 0 decodes greedily; above 0 samples
                from the logits divided by it. None: the compiled sampler's,
                else greedy, or 1.0 when `top_k` / `top_p` is given
                (keras-hub's and big_vision's samplers).
            top_k: int or None; sample among the k most likely tokens.
            top_p: float or None; sample from the smallest set of most
                likely tokens whose probability reaches p (nucleus).
                `top_k` / `top_p` with `temperature=0` are an error.
            seed: int or None, for reproducible sampling; None: the compiled
                sampler's seed (keras-hub's seed=None draws a fresh one each
                call), else 0.
            beam_size: int; beam search with big_vision's semantics (summed
                log-probabilities, no length normalisation; the best sequence
                that ends with the first stop token) instead of sampling.
            return_logits: bool; token ids in only: also return `"logits"`
                (B, N, V) float32, the logits each step chose from (final
                soft-cap as configured; 0 after every row stopped).
            add_separator: bool; token ids in only: append the separator
                "\n" to prompts that do not end with it. Without it such
                prompts get a warning when the separator's id is known (a
                preprocessor's tokenizer, or id 108 of PaliGemma's
                257,152-token vocabulary).
            allowed_tokens: None, or the token ids every step may choose from (a list, or a
                bool mask over the vocabulary): the others' logits are set to -inf before
                sampling, as big_vision's `mask_logits` (which lists the tokens masked
                out). The stop tokens stay allowed.
            constrain: None, or "task": rows whose prompt is `detect a ; b` or `segment a`
                can only produce what `parse_detections` reads back whole (four `<loc>`
                with y_max > y_min and x_max > x_min, sixteen `<seg>` for `segment`, one
                of the prompt's classes, objects joined by " ; ", then `<eos>`), never
                cut by the token budget; other rows decode freely. Needs the tokenizer
                and `<eos>` among the stop tokens. Neither option works with beam search.

        Rows of a batch may have prompts of different lengths: each gives
        exactly what it gives alone. Prompt lengths are rounded up to a
        multiple of 16, so calls reuse one compiled function.
        """
        if not isinstance(inputs, dict):
            raise InputError(
                "generate takes a dict: {'images', 'prompts'} (text) or "
                f"{{'images', 'token_ids', 'padding_mask'}} (token ids); got {type(inputs).__name__}."
            )
        text = "prompts" in inputs
        if text and self.preprocessor is None:
            raise InputError(
                "This model has no preprocessor, so it cannot take text prompts; pass "
                "token ids ({'images', 'token_ids', 'padding_mask'}) or load a preset "
                "with a tokenizer."
            )
        if max_length is not None and max_new_tokens is not None:
            raise InputError("Give max_length or max_new_tokens, not both.")
        if return_logits and (text or beam_size is not None):
            raise InputError(
                "return_logits=True is for sampling or greedy decoding from "
                "token ids, not for text or beam search."
            )
        settings = self._sampling_settings(temperature, top_k, top_p, seed, beam_size)
        beam_size = settings.pop("beam_size", None)
        beam_style = settings.pop("beam_style", "big_vision")
        beam_temperature = settings.pop("temperature", None) if beam_size else None
        sampler = Sampler(**settings) if not beam_size else None

        single = False
        if text:
            single = isinstance(inputs.get("prompts"), str)
            features = self.preprocessor.generate_preprocess(inputs)
        else:
            features = dict(inputs)
            missing = [k for k in ("images", "token_ids", "padding_mask") if k not in features]
            if missing:
                raise InputError(f"Without prompts, generate takes token ids: missing {missing}.")
        images = np.asarray(features["images"], np.float32)
        token_ids = np.asarray(features["token_ids"])
        padding_mask = np.asarray(features["padding_mask"]).astype(bool)
        if images.ndim == 3 + (self.backbone.num_images > 1):
            images = images[None]
        validate_backbone_inputs(
            {**features, "images": images, "response_mask": padding_mask * 0},
            self.backbone.image_size,
            self.backbone.num_images,
        )
        if not text:
            token_ids, padding_mask = self._check_separator(token_ids, padding_mask, add_separator)
        lengths = padding_mask.sum(1)
        width = None  # the keras-hub layout's width (token ids in)
        if max_length is not None:
            # keras-hub's meaning: each row's prompt + completion is at most
            # max_length tokens, so a shorter prompt gets more new ones.
            max_new_tokens = int(max_length) - int(lengths.min())
            if max_new_tokens < 1:
                raise InputError(
                    f"max_length={max_length} leaves no room after the shortest "
                    f"prompt ({int(lengths.min())} tokens); raise it or use max_new_tokens."
                )
            width = int(max_length)
        elif max_new_tokens is None and not text:
            width = token_ids.shape[1]
            max_new_tokens = width - int(lengths.min())
            if max_new_tokens < 1:
                raise InputError(
                    f"token_ids has width {width} and every prompt fills it: no room to "
                    "generate. Pad token_ids to the width you want (keras-hub's layout) "
                    "or pass max_new_tokens."
                )
        elif max_new_tokens is None:
            max_new_tokens = 64
        if int(max_new_tokens) < 1:
            raise InputError(f"max_new_tokens must be at least 1; got {max_new_tokens}.")
        if width is None:
            width = int(lengths.max()) + int(max_new_tokens)
            budget = np.full(len(lengths), int(max_new_tokens))
        else:
            budget = width - lengths  # new tokens each row has room for
        if stop_token_ids == "auto":
            end = self.preprocessor.tokenizer.end_token_id if self.preprocessor else 1
            stop_token_ids = [end]
        stops = list(stop_token_ids or [])
        room = np.minimum(budget, int(max_new_tokens))
        constraint = self._constraint(
            allowed_tokens,
            constrain,
            stops,
            room,
            inputs if text else None,
            token_ids,
            padding_mask,
        )
        if constraint is not None and beam_size is not None:
            raise InputError(
                "allowed_tokens / constrain work with greedy decoding and sampling, not with "
                "beam search; drop beam_size or the constraint."
            )
        if beam_size is not None:
            if not stops:
                raise InputError("Beam search needs a stop token (the end of a finished sequence).")
            tokens = self._decode_loop.beam_search(
                images,
                token_ids,
                padding_mask,
                max_new_tokens,
                beam_size,
                stops[0],
                style=beam_style,
                temperature=beam_temperature or 1.0,
            )
        else:
            tokens, logits = self._decode_loop(
                images,
                token_ids,
                padding_mask,
                max_new_tokens,
                stops,
                sampler,
                step_logits=return_logits,
                constraint=constraint,
            )
        tokens = _to_host(tokens)
        mask = _until_stop(tokens, stops)
        mask[np.arange(tokens.shape[1])[None] >= budget[:, None]] = 0
        tokens = np.where(mask, tokens, 0)  # nothing past a row's stop or its room
        if not text:
            if strip_prompt:
                out = {"token_ids": tokens, "padding_mask": mask.astype(bool)}
            else:
                out = _prompt_and_completion(token_ids, padding_mask, tokens, mask, width)
            out["images"] = features["images"]
            if return_logits:
                out["logits"] = _to_host(logits)
            return out
        texts = []
        tokenizer = self.preprocessor.tokenizer
        for row, (completion, row_mask) in enumerate(zip(tokens, mask)):
            kept = [int(t) for t, m in zip(completion, row_mask) if m and int(t) not in stops]
            if strip_prompt is False:
                prompt = token_ids[row][padding_mask[row]].tolist()
                kept = [t for t in prompt if t != tokenizer.start_token_id] + kept
            texts.append(tokenizer.detokenize(kept) if kept else "")
        return texts[0] if single else texts

    def _constraint(self, allowed_tokens, constrain, stops, room, text_inputs, token_ids, mask):
        """The `constraints` object generate's arguments ask for, or None."""
        vocabulary_size = self.backbone.vocabulary_size
        if allowed_tokens is not None and constrain is not None:
            raise InputError("Give allowed_tokens or constrain, not both.")
        if allowed_tokens is not None:
            return AllowedTokens(allowed_tokens, vocabulary_size, stops)
        if constrain is None:
            return None
        if constrain != "task":
            raise InputError(f'constrain must be None or "task"; got {constrain!r}.')
        if self.preprocessor is None:
            raise InputError(
                'constrain="task" reads each prompt\'s classes, which needs the tokenizer; '
                "this model has no preprocessor."
            )
        tokenizer = self.preprocessor.tokenizer
        if tokenizer.end_token_id not in stops:
            raise InputError(
                f'constrain="task" ends replies with <eos> (id {tokenizer.end_token_id}), '
                f"which must be a stop token; stop_token_ids is {stops}."
            )
        if text_inputs is not None:
            prompts = text_inputs["prompts"]
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        else:
            special = {tokenizer.start_token_id, *tokenizer.separator_ids}
            prompts = [
                tokenizer.detokenize([int(t) for t in row[m] if int(t) not in special])
                for row, m in zip(token_ids, mask)
            ]
        return TaskFormat(tokenizer, prompts, room, vocabulary_size)

    def _sampling_settings(self, temperature, top_k, top_p, seed, beam_size):
        """generate's sampling arguments, else the compiled sampler's."""
        given = temperature is not None or top_k is not None or top_p is not None
        if given or beam_size is not None:
            if beam_size is not None and (temperature or top_k is not None or top_p is not None):
                raise InputError("beam_size searches; it takes no temperature, top_k or top_p.")
            if beam_size is not None:
                return {"beam_size": beam_size}
            return dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed or 0)
        settings = dict(keras_hub_sampling(self.sampler))
        if "beam_size" in settings:
            return settings
        if seed is None:
            seed = settings.get("seed")
        if seed is None and settings["temperature"] > 0:
            # keras-hub's seed=None: different samples on every call.
            seed = int(np.random.default_rng().integers(2**31))
        settings["seed"] = seed or 0
        return settings

    def _check_separator(self, token_ids, padding_mask, add_separator):
        """Warns about (or, with add_separator, fixes) prompts without "\n"."""
        if self.preprocessor is not None:
            separator = self.preprocessor.tokenizer.separator_ids[0]
        elif self.backbone.vocabulary_size == GEMMA_VOCABULARY_SIZE:
            separator = GEMMA_SEPARATOR_ID
        else:
            separator = None
        if add_separator and separator is None:
            raise InputError(
                "add_separator=True, but the separator's id is unknown: this model has no "
                'tokenizer. Append the id of "\\n" to each prompt yourself.'
            )
        if separator is None:
            return token_ids, padding_mask
        lengths = padding_mask.sum(1)
        last = token_ids[np.arange(len(token_ids)), np.maximum(lengths - 1, 0)]
        missing = np.flatnonzero(last != separator)
        if not missing.size:
            return token_ids, padding_mask
        if not add_separator:
            warnings.warn(
                f"{missing.size} of {len(token_ids)} prompt rows (e.g. {missing[:5].tolist()}) "
                f'do not end with the separator "\\n" '
                f"(id {separator}), which PaliGemma was trained to see between prompt and "
                "reply: their answers may degrade. Append it, or pass add_separator=True.",
                stacklevel=3,
            )
            return token_ids, padding_mask
        width = max(token_ids.shape[1], int(lengths.max()) + 1)
        ids = np.zeros((len(token_ids), width), token_ids.dtype)
        ids[:, : token_ids.shape[1]] = token_ids
        mask = np.zeros(ids.shape, bool)
        mask[:, : token_ids.shape[1]] = padding_mask
        for row in missing:
            ids[row, lengths[row]] = separator
            mask[row, lengths[row]] = True
        return ids, mask

    # --- Task prompts (big_vision's prefixes) ------------------------------

    def _ask_each(self, images, prompt, **kwargs):
        """(images as a list, one reply per image, whether a list was given)."""
        if self.preprocessor is None:
            raise InputError(
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

    def score(
        self,
        inputs,
        per_token=False,
        *,
        padding_mask=None,
        scoring_mode=None,
        layer_intercept_fn=None,
        target_ids=None,
        images=None,
        response_mask=None,
    ):
        """Log-probabilities of given responses (big_vision's scoring logits),
        or keras-hub's `CausalLM.score` on token ids.

        Ours: `inputs` is a dict. With a preprocessor: `{"images", "prompts",
        "responses"}`. Without: backbone inputs `images`, `token_ids`,
        `padding_mask` and `response_mask` (1 on response tokens and
        `<eos>`), as the preprocessor lays them out.

        keras-hub's: `inputs` is token ids (B, T) with `padding_mask`,
        `scoring_mode` and `target_ids` as there, plus the `images` PaliGemma
        needs; the text is causal after the image unless `response_mask`
        says which tokens form the bidirectional prompt (0) and which the
        causal response (1).

        Args:
            inputs: dict (ours, see above) or int array (B, T) of token ids
                (keras-hub's `token_ids`).
            per_token: bool (default False); ours: True returns the per-token
                log-probabilities instead of their sum.
            padding_mask: keras-hub's: bool/int (B, T), 1 on real tokens
                (default all).
            scoring_mode: keras-hub's: "logits" (default there; (B, T, V)
                logits) or "loss" ((B, T) cross-entropy against `target_ids`,
                0 on padding).
            layer_intercept_fn: keras-hub's; not supported (a ValueError
                if given): this task's blocks run inside compiled loops.
            target_ids: keras-hub's: int (B, T), the token each position
                should predict, for scoring_mode="loss".
            images: keras-hub form: float (B, S, S, 3) in [-1, 1] (required).
            response_mask: keras-hub form: int (B, T) or None (default:
                `padding_mask`, every text token causal).

        Returns:
            Ours: (B,) summed log-probability of each response including
            `<eos>`, or with `per_token=True` (B, T) per-token
            log-probabilities (0 where not a response token). keras-hub's:
            float32 (B, T, V) logits or (B, T) losses.
        """
        if not isinstance(inputs, dict) or scoring_mode is not None:
            return self._score_token_ids(
                inputs,
                padding_mask,
                scoring_mode,
                layer_intercept_fn,
                target_ids,
                images,
                response_mask,
            )
        if self.preprocessor is not None and "prompts" in inputs:
            x, labels, weights = self.preprocessor(inputs)
        else:
            missing = [
                k
                for k in ("images", "token_ids", "padding_mask", "response_mask")
                if k not in inputs
            ]
            if missing:
                raise InputError(f"score takes backbone inputs; missing {missing}.")
            x, labels, weights = shift_for_next_token(inputs)
        logits = np.asarray(self(x, training=False), np.float32)
        log_probs = logits - _logsumexp(logits)
        picked = np.take_along_axis(log_probs, np.asarray(labels)[..., None], axis=-1)[..., 0]
        picked = picked * weights
        return picked if per_token else picked.sum(axis=1)

    def _score_token_ids(
        self,
        token_ids,
        padding_mask,
        scoring_mode,
        layer_intercept_fn,
        target_ids,
        images,
        response_mask,
    ):
        """keras-hub's `CausalLM.score`, with the images PaliGemma needs."""
        scoring_mode = scoring_mode or "logits"
        if scoring_mode not in ("logits", "loss"):
            raise InputError(f'scoring_mode must be "logits" or "loss"; got {scoring_mode!r}.')
        if layer_intercept_fn is not None:
            raise InputError(
                "layer_intercept_fn is not supported: this task's blocks run inside "
                "compiled loops. Call the backbone's layers yourself to intercept them."
            )
        if images is None:
            raise InputError("PaliGemma scores tokens given their image: pass images=.")
        if scoring_mode == "loss" and target_ids is None:
            raise InputError('scoring_mode="loss" needs target_ids.')
        token_ids = np.asarray(token_ids)
        if padding_mask is None:
            padding_mask = np.ones(token_ids.shape, bool)
        padding_mask = np.asarray(padding_mask).astype("int32")
        if response_mask is None:
            response_mask = padding_mask
        x = {
            "images": images,
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "response_mask": np.asarray(response_mask).astype("int32"),
        }
        logits = np.asarray(self(x, training=False), np.float32)
        if scoring_mode == "logits":
            return logits
        log_probs = logits - _logsumexp(logits)
        picked = np.take_along_axis(log_probs, np.asarray(target_ids)[..., None], axis=-1)[..., 0]
        return -picked * padding_mask

    # --- Training ------------------------------------------------------------

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        label_smoothing=0.0,
        loss_normalization="per_example",
        remat=False,
        loss_chunk_size=None,
        **kwargs,
    ):
        """Configures training, and the sampler `generate` uses by default.

        Args:
            optimizer: "auto" (Adam, learning rate 2e-5, global gradient norm
                clipped at 1.0), or any Keras optimizer; for big_vision's
                recipe pass `keras_paligemma2.big_vision_optimizer(steps)`.
            loss: "auto": `ResponseCrossEntropy`, cross-entropy on response
                and `<eos>` tokens, as big_vision's training loss.
            weighted_metrics: "auto": `ResponseAccuracy`, next-token
                accuracy on the same tokens, normalised as the loss.
            sampler: keras-hub's: a name ("greedy", the default as keras-hub's
                PaliGemma; "top_k", "top_p", "random", "beam") or a
                `keras_hub.samplers` object (`TopKSampler(k=5,
                temperature=0.7)`, `TopPSampler`, `RandomSampler`,
                `BeamSampler`, `GreedySampler`), decoded by this task's
                KV-cache loop with keras-hub's semantics; `generate`'s own
                sampling arguments take precedence. Saved with the model.
            label_smoothing: float in [0, 1), big_vision's smoothing, for
                the "auto" loss.
            loss_normalization: "per_example" (default; big_vision: each
                example's mean over its own response tokens, then the batch
                mean) or "per_token" (one mean over the batch's response
                tokens), for the "auto" loss and metric.
            remat: False (default: activations kept), True or "block"
                (each decoder and ViT block keeps only its input and is
                recomputed in the backward pass: about a third more
                compute) or "matmuls" (blocks also keep their projections'
                outputs; the rest is recomputed).
            loss_chunk_size: None (default), or int: the training step
                computes the "auto" loss over this many tokens at a time,
                never forming the float32 (B, T, vocabulary) logits (1 MiB
                per token for PaliGemma's vocabulary), recomputing each
                chunk's logits in the backward pass. Same loss and
                gradients; `evaluate` and `score` still form the logits.
            **kwargs: passed to `keras.Model.compile` (e.g. `jit_compile`).

        For mixed precision build or load the model with
        `dtype="mixed_bfloat16"` (float32 weights, bfloat16 compute).
        """

        keras_hub_sampling(sampler)  # An unsupported sampler fails here, not in generate.
        given = dict(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            label_smoothing=label_smoothing,
            loss_normalization=loss_normalization,
            remat=remat,
            loss_chunk_size=loss_chunk_size,
        )
        if loss_chunk_size is not None:
            if loss != "auto":
                raise InputError(
                    "loss_chunk_size applies to the 'auto' loss (ResponseCrossEntropy); "
                    f"got loss={loss!r}."
                )
            if isinstance(loss_chunk_size, bool) or int(loss_chunk_size) < 1:
                raise InputError(
                    f"loss_chunk_size must be a positive number of tokens; got {loss_chunk_size!r}."
                )
            loss_chunk_size = int(loss_chunk_size)
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5, global_clipnorm=1.0)
        if loss == "auto":
            loss = ResponseCrossEntropy(label_smoothing, loss_normalization)
        elif label_smoothing or loss_normalization != "per_example":
            raise InputError(
                "label_smoothing and loss_normalization apply to the 'auto' loss only."
            )
        if weighted_metrics == "auto":
            weighted_metrics = [ResponseAccuracy(loss_normalization)]
        self.backbone.set_remat(remat)
        self.loss_chunk_size = loss_chunk_size
        self._chunked_loss = loss  # The "auto" loss, whose settings the chunked step reads.
        keras.Model.compile(
            self, optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs
        )
        self.sampler = sampler
        # What load_model gives back to compile: the arguments as given (so
        # "auto" stays "auto" beside label_smoothing), the optimizer as built.
        self._compile_arguments = {**kwargs, **given, "optimizer": optimizer}

    def get_compile_config(self):
        """The `compile` arguments, serialised (Keras saves them in `.keras`
        files; `compile_from_config` gives them back on load)."""
        if not self.compiled or not hasattr(self, "_compile_arguments"):
            return {}
        return keras.saving.serialize_keras_object(self._compile_arguments)

    def compile_from_config(self, config):
        """Compiles with what `get_compile_config` saved and builds the
        optimizer, so that its saved state loads.

        Args:
            config: dict, the output of `get_compile_config`.
        """
        arguments = keras.saving.deserialize_keras_object(config)
        self.compile(**arguments)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss_and_updates(
        self,
        trainable_variables,
        non_trainable_variables,
        metrics_variables,
        x,
        y,
        sample_weight,
        training=False,
        optimizer_variables=None,
    ):
        """Keras' stateless loss of one batch (what the JAX trainer
        differentiates); with `compile(loss_chunk_size=n)` in training, the
        loss is computed `n` tokens at a time from the backbone's hidden
        states, and the predictions handed to the metrics are token ids
        (B, T) instead of logits.

        Args:
            trainable_variables: list of arrays, the trainable variables' values.
            non_trainable_variables: list of arrays, the others' values.
            metrics_variables: list of arrays, the metrics' state.
            x: dict, the backbone inputs.
            y: int (B, T), the next-token labels.
            sample_weight: float (B, T), the response mask.
            training: bool, whether this is a training step.
            optimizer_variables: list of arrays, the optimizer's state (for
                its loss scaling).

        Returns:
            `(loss, (unscaled_loss, predictions, non_trainable_variables,
            metrics_variables))`, as Keras' JAX trainer.
        """
        chunk_size = getattr(self, "loss_chunk_size", None)
        if not (training and chunk_size):
            return super().compute_loss_and_updates(
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
                x,
                y,
                sample_weight,
                training=training,
                optimizer_variables=optimizer_variables,
            )
        loss_fn = self._chunked_loss
        mapping = list(zip(self.trainable_variables, trainable_variables)) + list(
            zip(self.non_trainable_variables, non_trainable_variables)
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            hidden = self.backbone(x, training=True)[:, self.backbone.num_image_tokens :, :]
            losses, predictions = chunked_token_cross_entropy(
                self.text_logits, hidden, y, chunk_size, loss_fn.label_smoothing
            )
            weights = ops.ones_like(losses) if sample_weight is None else sample_weight
            loss = reduce_over_responses(
                losses, ops.cast(weights, "float32"), loss_fn.normalization
            )
            for extra in self.losses:  # Losses added by layers, as Keras' compute_loss.
                loss = loss + extra
        non_trainable_variables = [
            scope.get_current_value(v) if scope.get_current_value(v) is not None else value
            for v, value in zip(self.non_trainable_variables, non_trainable_variables)
        ]
        unscaled_loss = loss
        if self.optimizer is not None:
            with keras.StatelessScope(
                state_mapping=list(zip(self.optimizer.variables, optimizer_variables))
            ):
                loss = self.optimizer.scale_loss(loss)
        return loss, (unscaled_loss, predictions, non_trainable_variables, metrics_variables)

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
        settings = dict(
            y=y,
            batch_size=batch_size,
            shuffle=keras_shuffle,
            validation_data=validation_data,
            callbacks=callbacks,
        )
        checkpoints = [c for c in callbacks if isinstance(c, TrainingCheckpoint)]
        distribution = keras.distribution.distribution()
        auto_shard = getattr(distribution, "auto_shard_dataset", None)
        if isinstance(x, RawBatches) and distribution is not None and jax.process_count() > 1:
            distribution.auto_shard_dataset = False  # RawBatches makes each process's share
        try:
            return self._fit_from_checkpoint(x, settings, checkpoints, kwargs)
        finally:
            if auto_shard is not None:
                distribution.auto_shard_dataset = auto_shard  # the user's setting again
            for checkpoint in checkpoints:
                checkpoint.wait()  # a save in flight completes, even when fit stops on an error

    def _fit_from_checkpoint(self, x, settings, checkpoints, kwargs):
        """`keras.Model.fit`, first over the rest of the epoch a checkpoint stopped in."""
        progress = checkpoints[0].progress() if checkpoints else None
        if progress is None or not progress["step"]:
            return keras.Model.fit(self, x=x, **settings, **kwargs)
        # A checkpoint from the middle of an epoch: that epoch's remaining batches
        # first, then the epochs after it.
        if not isinstance(x, RawBatches):
            raise InputError(
                f"The checkpoint in {checkpoints[0].directory} was saved in the middle of "
                f"epoch {progress['epoch'] + 1}, and only raw examples (a dict of images, "
                "prompts and responses) say where that epoch's next batch is. Resume with "
                "the raw examples, or from a checkpoint saved at an epoch end."
            )
        kwargs = dict(kwargs)
        epochs, start = kwargs.pop("epochs", 1), int(progress["step"])
        partial = dict(kwargs)
        if kwargs.get("steps_per_epoch"):
            partial["steps_per_epoch"] = kwargs["steps_per_epoch"] - start
        x.start = start
        for checkpoint in checkpoints:
            checkpoint.start = start
        try:
            history = keras.Model.fit(
                self, x=x, epochs=int(progress["epoch"]) + 1, **settings, **partial
            )
        finally:
            x.start = 0
            for checkpoint in checkpoints:
                checkpoint.start = 0
        if epochs <= int(progress["epoch"]) + 1 or self.stop_training:
            return history
        rest = keras.Model.fit(self, x=x, epochs=epochs, **settings, **kwargs)
        for key, values in history.history.items():
            rest.history[key] = values + rest.history.get(key, [])
        rest.epoch = history.epoch + rest.epoch
        return rest

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
                raise InputError(
                    "Raw examples (prompts and responses) need a preprocessor; this "
                    "model has none. Pass token ids, labels and sample weights instead."
                )
            if y is not None:
                raise InputError(
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

    def quantize(self, mode=None, config=None, filters=None, quantize_vision=True, **kwargs):
        """The backbone's `quantize` (every kernel the task has is the
        backbone's), with GPTQ calibrated on raw examples.

        For "gptq", `config.dataset` may hold batches as `fit` and
        `generate` take them: dicts of `images` and `prompts`, with
        `responses` (the training format; calibrates on the answers too)
        or without; the preprocessor makes the backbone inputs.

        Args:
            mode: str, "int8", "int4", "float8" or "gptq" (Keras' modes).
            config: a Keras `QuantizationConfig` or None; for "gptq" a
                `keras.quantizers.GPTQConfig(dataset=batches, tokenizer=None)`.
            filters: Keras' filters (see `PaliGemma2Backbone.quantize`).
            quantize_vision: bool (default True); False: the decoder's
                projections only.
            **kwargs: passed to the backbone's `quantize`.

        Example:
        ```python
        import keras
        from keras_paligemma2.apps import shapes

        lm = PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")
        examples = shapes.training_examples(128, seed=1)
        batches = [
            {key: examples[key][i : i + 32] for key in ("images", "prompts", "responses")}
            for i in range(0, 128, 32)
        ]
        lm.quantize(
            "gptq",
            config=keras.quantizers.GPTQConfig(dataset=batches, tokenizer=None, group_size=32),
        )
        ```
        """
        if (mode or getattr(config, "mode", None)) == "gptq" and config is not None:
            config = copy.copy(config)
            config.dataset = [self._calibration_inputs(batch) for batch in config.dataset or []]
        self.backbone.quantize(
            mode, config=config, filters=filters, quantize_vision=quantize_vision, **kwargs
        )
        self.train_function = self.test_function = self.predict_function = None

    def _calibration_inputs(self, batch):
        """Backbone inputs for one GPTQ calibration batch (raw or already
        backbone inputs)."""
        if not isinstance(batch, dict) or "token_ids" in batch:
            return batch
        if self.preprocessor is None:
            raise InputError(
                "Raw GPTQ calibration batches need the task's preprocessor; this task has "
                "none: give dicts of backbone inputs."
            )
        if "responses" in batch:
            return self.preprocessor(batch)[0]
        return self.preprocessor.generate_preprocess(batch)

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

    def save_to_big_vision(self, path):
        """The backbone's `save_to_big_vision`: a big_vision `.npz`, LoRA
        folded in (the tokenizer is big_vision's own, not written).

        Args:
            path: str or path-like, the `.npz` file to write.
        """
        self.backbone.save_to_big_vision(path)

    def save_to_transformers(self, directory, max_shard_size=DEFAULT_MAX_SHARD_SIZE_GB):
        """Writes a transformers `PaliGemmaForConditionalGeneration` directory that
        `from_pretrained` (and vLLM / TGI, which read the Hub's layout) load: config.json,
        `.safetensors` with the Hub's key names, and with a preprocessor the tokenizer and
        image processor files of `PaliGemmaProcessor`. One tensor at a time, atomically;
        LoRA adapters folded in, the model unchanged.

        Args:
            directory: str or path-like, the directory to write (replaced if it exists).
            max_shard_size: float, the most GB per `.safetensors` file (default 2).
        """
        tokenizer = None if self.preprocessor is None else self.preprocessor.tokenizer
        hf.write_checkpoint(self.backbone, directory, tokenizer, max_shard_size)

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
    def from_preset(
        cls,
        preset,
        load_weights=True,
        source=None,
        quantization=None,
        quantize_vision=False,
        **overrides,
    ):
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
            quantization: None, "int8" or "int4": the decoder's kernels
                quantised as they are read (`PaliGemma2Backbone.from_preset`);
                e.g. QLoRA: `from_preset(name, quantization="int4")`, then
                `enable_lora(8)`.
            quantize_vision: bool (default False); the ViT's kernels too.
            **overrides: backbone constructor arguments replacing the
                checkpoint's config, and `preprocessor` (a preprocessor, or
                None for a task on token ids) replacing the one the
                checkpoint brings, as keras-hub's `from_preset` takes it.
        """

        return load_task(
            cls,
            preset,
            load_weights=load_weights,
            source=source,
            quantization=quantization,
            quantize_vision=quantize_vision,
            **overrides,
        )


def _to_host(array):
    """A NumPy copy of `array`, gathered from every process when it spans several (a
    mesh over several hosts: each holds only its devices' rows)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


def _is_raw(x):
    return isinstance(x, dict) and "prompts" in x


def _is_tf_dataset(x):

    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.data.Dataset)


def _prompt_and_completion(token_ids, padding_mask, tokens, mask, width):
    """keras-hub's generate layout: each row's prompt, then its completion,
    cut at `width`; the mask is True on both (through the first stop token)."""
    batch = len(token_ids)
    out_ids = np.zeros((batch, width), np.int32)
    out_mask = np.zeros((batch, width), bool)
    for row in range(batch):
        n = int(padding_mask[row].sum())
        room = min(width - n, tokens.shape[1])
        out_ids[row, :n] = token_ids[row, :n]
        out_mask[row, :n] = True
        if room > 0:
            out_ids[row, n : n + room] = tokens[row, :room]
            out_mask[row, n : n + room] = mask[row, :room].astype(bool)
    return {"token_ids": out_ids, "padding_mask": out_mask}


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
