"""`PaliGemma2Tokenizer`: Gemma's SentencePiece vocabulary plus location and
segmentation tokens, each a single id.

The released vocabulary has 257,152 pieces: 256,000 Gemma pieces, then
`<loc0000>`..`<loc1023>` (ids 256,000..257,023) and `<seg000>`..`<seg127>`
(ids 257,024..257,151), stored in the SentencePiece model as user-defined
pieces, so SentencePiece never splits them (HF's fast tokenizer once did,
transformers #30824). This class checks that they are single pieces with
consecutive ids, and finds them by name rather than assuming their ids, so
that small test vocabularies work the same way.
"""

import io

import keras
import keras_hub
import numpy as np
import sentencepiece

from keras_paligemma2.utils.errors import InputError

NUM_LOCATION_TOKENS = 1024
NUM_SEGMENTATION_TOKENS = 128
LOCATION_TOKENS = tuple(f"<loc{i:04d}>" for i in range(NUM_LOCATION_TOKENS))
SEGMENTATION_TOKENS = tuple(f"<seg{i:03d}>" for i in range(NUM_SEGMENTATION_TOKENS))


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class PaliGemma2Tokenizer(keras_hub.tokenizers.SentencePieceTokenizer):
    """SentencePiece tokenizer with PaliGemma's special tokens.

    Args:
        proto: the SentencePiece model, as a file path or serialized bytes
            (the released `tokenizer.model`).
        **kwargs: passed to `keras_hub.tokenizers.SentencePieceTokenizer` (name, dtype, ...).

    Attributes:
        location_token_start: id of `<loc0000>`; `<locNNNN>` is start + NNNN.
        segmentation_token_start: id of `<seg000>`.
        separator_ids: the ids of "\\n", which separates prompt and response.

    Example:
    ```python
    from keras_paligemma2.preprocessing.tokenizer import PaliGemma2Tokenizer, train_tiny_sentencepiece

    tokenizer = PaliGemma2Tokenizer(train_tiny_sentencepiece(["a red circle"]))
    ids = tokenizer("detect circle")
    tokenizer.detokenize(ids)
    ```
    """

    def __init__(self, proto, **kwargs):
        self._add_special_token("<bos>", "start_token")
        self._add_special_token("<eos>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)

    def set_proto(self, proto):
        """Loads the SentencePiece model and finds the special tokens.

        Args:
            proto: a file path or serialized bytes of the model, or None (no model yet, as
                keras-hub's preset loading does; the attributes are then not set).

        Raises:
            ValueError: the location or segmentation tokens are not single pieces with
                consecutive ids, or "\\n" is not one piece.
        """
        super().set_proto(proto)
        if proto is None:
            return
        self.location_token_start = self._consecutive_ids(LOCATION_TOKENS)
        self.segmentation_token_start = self._consecutive_ids(SEGMENTATION_TOKENS)
        self.separator_ids = [int(i) for i in np.asarray(self.tokenize("\n"))]
        if len(self.separator_ids) != 1:
            raise InputError(
                'The SentencePiece model encodes the separator "\\n" as '
                f"{self.separator_ids}; PaliGemma needs it as one piece. Train "
                "with normalization_rule_name='identity' and "
                "remove_extra_whitespaces=False (train_tiny_sentencepiece does)."
            )

    def _consecutive_ids(self, tokens):
        # A missing piece maps to the unknown id, which breaks the run.
        ids = [self.token_to_id(token) for token in tokens]
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise InputError(
                f"The SentencePiece model lacks {tokens[0]}..{tokens[-1]} as "
                "single pieces with consecutive ids. Use the PaliGemma "
                "tokenizer (tokenizer.model of the Hub repositories) or "
                "train one with train_tiny_sentencepiece."
            )
        return ids[0]

    def location_token_ids(self, bins):
        """Ids of `<locNNNN>` for integer bins 0..1023.

        Args:
            bins: int or int array of any shape, values in 0..1023 (not checked).

        Returns:
            NumPy int array (or scalar) of the same shape.
        """
        return self.location_token_start + np.asarray(bins)

    def segmentation_token_ids(self, codes):
        """Ids of `<segNNN>` for codebook indices 0..127.

        Args:
            codes: int or int array of any shape, values in 0..127 (not checked).

        Returns:
            NumPy int array (or scalar) of the same shape.
        """
        return self.segmentation_token_start + np.asarray(codes)


def train_tiny_sentencepiece(texts, vocabulary_size=1600):
    """Trains a small SentencePiece model with PaliGemma's special pieces.

    For tests and small models: ids 0 pad, 1 eos, 2 bos, 3 unk as in the
    real vocabulary, then "\\n", the 1,024 location and 128 segmentation
    tokens as user-defined (never split) pieces, then pieces learned from
    `texts`, with byte fallback so any text encodes. Text is not normalised
    (as Gemma's), so "\\n" stays a piece.

    Args:
        texts: iterable of str, the training sentences.
        vocabulary_size: int, the target size (default 1600), special pieces included; a soft
            limit (`hard_vocab_limit=False`), so small corpora give fewer pieces.

    Returns:
        The serialized model (bytes), for `PaliGemma2Tokenizer(proto=...)`.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocabulary_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["\n", *LOCATION_TOKENS, *SEGMENTATION_TOKENS],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()
