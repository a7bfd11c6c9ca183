"""`PaliGemma2CausalLMPreprocessor`: the one place that knows the prompt format.

big_vision's transfer configs (`configs/proj/paligemma/transfers/common.py`)
tokenize the prompt with `<bos>`, the separator "\\n" on its own, and the
response with `<eos>`, then concatenate:

    <bos> prompt "\\n" response <eos> <pad>...

`mask_ar` (our `response_mask`) and the loss mask are 1 on the response and
`<eos>` only. Tokenizing the three parts separately matters: SentencePiece
may merge "\\n" with the prompt's last characters when given one string.
"""

import warnings

import keras
import keras_hub
import numpy as np

from keras_paligemma2.preprocessing.image_converter import PaliGemma2ImageConverter
from keras_paligemma2.preprocessing.tokenizer import PaliGemma2Tokenizer
from keras_paligemma2.utils.errors import InputError

TRUNCATION = (None, "response")


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class PaliGemma2CausalLMPreprocessor(keras_hub.models.CausalLMPreprocessor):
    """Raw images and text to `PaliGemma2Backbone` inputs, labels and weights.

    Args:
        tokenizer: a `PaliGemma2Tokenizer`.
        image_converter: a `PaliGemma2ImageConverter`.
        sequence_length: int, text tokens per example (image tokens come on
            top). Training sequences are one longer before the shift into
            inputs and labels.
        truncate: None (default): a prompt + response that does not fit is an
            error. "response": the response is cut to fit (with a warning
            counting the examples cut); a prompt that alone does not fit is
            always an error: the prompt is never cut.
        add_start_token: bool, prepend `<bos>` to every prompt (default True, as big_vision).
        add_end_token: bool, append `<eos>` to every response (default True, as big_vision).
        **kwargs: passed to `keras_hub.models.CausalLMPreprocessor` (name, dtype, ...).

    Call with `{"images": ..., "prompts": [...], "responses": [...]}` (a
    single image and string work too). Returns `(x, y, sample_weight)`:
    `x` the backbone inputs (`token_ids`, `padding_mask`, `response_mask`,
    `images`), `y` the next-token labels, `sample_weight` 1 where the label is
    a response token or `<eos>`.

    Example:
    ```python
    import numpy as np
    from keras_paligemma2 import (
        PaliGemma2CausalLMPreprocessor, PaliGemma2ImageConverter, PaliGemma2Tokenizer)
    from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece

    preprocessor = PaliGemma2CausalLMPreprocessor(
        PaliGemma2Tokenizer(train_tiny_sentencepiece(["caption en", "a cat"])),
        PaliGemma2ImageConverter(224),
        sequence_length=16,
    )
    x, y, weights = preprocessor({
        "images": np.zeros((224, 224, 3), "uint8"),
        "prompts": "caption en",
        "responses": "a cat",
    })
    ```
    """

    tokenizer_cls = PaliGemma2Tokenizer
    image_converter_cls = PaliGemma2ImageConverter

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        sequence_length=256,
        truncate=None,
        add_start_token=True,
        add_end_token=True,
        **kwargs,
    ):
        super().__init__(
            tokenizer=tokenizer,
            sequence_length=sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )
        if truncate not in TRUNCATION:
            raise InputError(f"truncate must be one of {TRUNCATION}; got {truncate!r}.")
        self.image_converter = image_converter
        self.truncate = truncate

    def build(self, input_shape=None):
        self.built = True

    # --- Token layout -----------------------------------------------------

    def _ids(self, text):
        return [int(i) for i in np.asarray(self.tokenizer.tokenize(text))]

    def prompt_ids(self, prompt):
        """`<bos> prompt "\\n"` as big_vision tokenizes it.

        A prompt written with its separator already (`"caption en\\n"`, as
        keras-hub's and transformers' docs write them) gets no second one: one
        trailing `"\\n"` is taken as the separator.

        Args:
            prompt: str, non-blank (a task prefix such as "caption en"), with or without one
                trailing "\\n"; `<bos>` only with `add_start_token`.

        Returns:
            list of int token ids.
        """
        if not isinstance(prompt, str):
            raise InputError(f"Prompts must be strings; got {type(prompt).__name__}.")
        prompt = prompt.removesuffix("\n")
        if not prompt.strip():
            raise InputError(
                "Empty prompt: PaliGemma needs a task prefix such as "
                "'caption en', 'answer en <question>', 'detect cat' or 'ocr'."
            )
        start = [self.tokenizer.start_token_id] if self.add_start_token else []
        return start + self._ids(prompt) + list(self.tokenizer.separator_ids)

    def response_ids(self, response):
        """`response <eos>`.

        Args:
            response: str, may be empty; `<eos>` only with `add_end_token`.

        Returns:
            list of int token ids.
        """
        if not isinstance(response, str):
            raise InputError(f"Responses must be strings; got {type(response).__name__}.")
        end = [self.tokenizer.end_token_id] if self.add_end_token else []
        return self._ids(response) + end

    def pack(self, prompts, responses=None, sequence_length=None, next_token=False):
        """Token ids, padding mask and response mask, (B, sequence_length) each.

        Args:
            prompts: str, or a list / NumPy array of str or bytes (B of them).
            responses: None (default, prompts only), or as `prompts`, one per prompt.
            sequence_length: int or None; None (default) uses `self.sequence_length`.
            next_token: bool; True packs one token more than `sequence_length` (training rows,
                shifted into inputs and labels afterwards).

        Returns:
            (token_ids, padding_mask, response_mask), int32 NumPy (B, sequence_length) each
            (one longer with `next_token`),
            left-aligned and padded with the pad id; response_mask is 1 on response + `<eos>`.
        """
        sequence_length = sequence_length or self.sequence_length
        length = sequence_length + int(next_token)
        # What a row holds, as errors say it: training rows are one longer.
        holds = f"{length} tokens" + (
            f" (sequence_length={sequence_length}, plus one for the shift into labels)"
            if next_token
            else f" (sequence_length={sequence_length})"
        )
        prompts = _as_list(prompts, "prompts")
        if responses is not None:
            responses = _as_list(responses, "responses")
            if len(responses) != len(prompts):
                raise InputError(
                    f"{len(prompts)} prompts but {len(responses)} responses; "
                    "give one response per prompt."
                )
        pad = self.tokenizer.pad_token_id
        token_ids = np.full((len(prompts), length), pad, np.int32)
        padding_mask = np.zeros((len(prompts), length), np.int32)
        response_mask = np.zeros((len(prompts), length), np.int32)
        cut = 0
        for row, prompt in enumerate(prompts):
            prefix = self.prompt_ids(prompt)
            if len(prefix) > length:
                raise InputError(
                    f"Prompt {row} is {len(prefix)} tokens with <bos> and the "
                    f"separator; a row holds {holds}. Raise sequence_length or "
                    "shorten the prompt; prompts are never cut."
                )
            suffix = [] if responses is None else self.response_ids(responses[row])
            room = length - len(prefix)
            if len(suffix) > room:
                if self.truncate != "response":
                    raise InputError(
                        f"Example {row} is {len(prefix) + len(suffix)} tokens "
                        f"(prompt {len(prefix)} with <bos> and the separator, "
                        f"response {len(suffix)} with <eos>); a row holds {holds}. "
                        "Raise sequence_length, or pass truncate='response' to cut "
                        "responses."
                    )
                suffix = suffix[:room]
                cut += 1
            ids = prefix + suffix
            token_ids[row, : len(ids)] = ids
            padding_mask[row, : len(ids)] = 1
            response_mask[row, len(prefix) : len(ids)] = 1
        if cut:
            warnings.warn(
                f"{cut} of {len(prompts)} responses were cut to fit rows of "
                f"{holds} (truncate='response').",
                stacklevel=3,
            )
        return token_ids, padding_mask, response_mask

    # --- Calls ------------------------------------------------------------

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        """Training examples: `{"images", "prompts", "responses"}` to `(x, y, sample_weight)`.

        Args:
            x: dict with `images` (one image or one per prompt; a list of images per example
                for multi-image models), `prompts` and `responses` (str or lists of str).
            y: must be None: labels are made from `x["responses"]`.
            sample_weight: must be None: weights are made from the response mask.
            sequence_length: int or None, text tokens per example; None (default) uses
                `self.sequence_length`.

        Returns:
            `(x, y, sample_weight)`: x the dict of backbone inputs (`token_ids`, `padding_mask`,
            `response_mask` int32 (B, T), `images` float32 (B, S, S, 3), or (B, n, S, S, 3) with n
            images per example), y int32 (B, T) labels, sample_weight float32 (B, T).
        """
        if y is not None or sample_weight is not None:
            raise InputError(
                "Pass responses inside x as x['responses']; labels and weights are made from them."
            )
        x = _check_keys(x, required=("images", "prompts", "responses"))
        token_ids, padding_mask, response_mask = self.pack(
            x["prompts"], x["responses"], sequence_length=sequence_length, next_token=True
        )
        inputs, labels, weights = shift_for_next_token(
            {
                "images": self._images(x["images"], len(token_ids)),
                "token_ids": token_ids,
                "padding_mask": padding_mask,
                "response_mask": response_mask,
            }
        )
        return keras.utils.pack_x_y_sample_weight(inputs, labels, weights)

    def generate_preprocess(self, x, sequence_length=None):
        """Prompts (no responses) to backbone inputs for generation.

        Args:
            x: dict with `images` and `prompts` (as in `call`).
            sequence_length: int or None; None (default) uses `self.sequence_length`.

        Returns:
            dict of `images` float32 (B, S, S, 3) (or (B, n, S, S, 3)) and `token_ids`,
            `padding_mask`, `response_mask` (all zeros) int32 (B, T), prompts left-aligned.
        """
        x = _check_keys(x, required=("images", "prompts"))
        token_ids, padding_mask, response_mask = self.pack(
            x["prompts"], None, sequence_length=sequence_length
        )
        return {
            "images": self._images(x["images"], len(token_ids)),
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "response_mask": response_mask,
        }

    def _images(self, images, batch):
        if self.image_converter is None:
            raise InputError("This preprocessor has no image_converter.")
        convert = getattr(self.image_converter, "convert", self.image_converter)
        if _several_per_example(images):
            # (B, n) images: convert each example's images, keep their order.
            converted = np.stack([convert(list(row)) for row in images])
        else:
            converted = convert(images)
        if converted.ndim == 3:
            converted = converted[None]
        if len(converted) != batch:
            raise InputError(
                f"{len(converted)} images but {batch} prompts; give one image per prompt."
            )
        return converted

    def get_config(self):
        config = super().get_config()
        config.update(truncate=self.truncate)
        return config


def shift_for_next_token(inputs):
    """Backbone inputs of length T + 1 to (inputs, labels, weights) of length T.

    The label at t is token t + 1; it counts when it is a response token or
    `<eos>` (big_vision's mask_loss, shifted with the labels).

    Args:
        inputs: dict with `token_ids`, `padding_mask` and `response_mask`, (B, T + 1) each;
            other keys (`images`) pass through unchanged.

    Returns:
        (inputs, labels, weights): the dict with those three cut to (B, T), int labels
        (B, T) and float32 weights (B, T).
    """
    token_ids = np.asarray(inputs["token_ids"])
    response_mask = np.asarray(inputs["response_mask"])
    shifted = {
        **inputs,
        "token_ids": token_ids[:, :-1],
        "padding_mask": np.asarray(inputs["padding_mask"])[:, :-1],
        "response_mask": response_mask[:, :-1],
    }
    return shifted, token_ids[:, 1:], response_mask[:, 1:].astype("float32")


def _several_per_example(images):
    if isinstance(images, np.ndarray):
        return images.ndim == 5
    if isinstance(images, (list, tuple)) and images:
        return isinstance(images[0], (list, tuple)) or (
            isinstance(images[0], np.ndarray) and images[0].ndim == 4
        )
    return False


def _as_list(texts, name):
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
    if not texts:
        raise InputError(f"`{name}` is empty.")
    return texts


def _check_keys(x, required):
    if not isinstance(x, dict):
        raise InputError(f"Pass a dict with keys {list(required)}; got {type(x).__name__}.")
    missing = [k for k in required if k not in x]
    if missing:
        raise InputError(f"Missing keys {missing}; expected {list(required)}.")
    return x
