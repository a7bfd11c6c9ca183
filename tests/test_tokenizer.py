"""PaliGemma2Tokenizer: location/segmentation tokens are single ids."""

import io

import numpy as np
import pytest
import sentencepiece

from keras_paligemma2 import PaliGemma2Tokenizer
from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece

TEXTS = [
    "caption en",
    "red circle and blue square",
    "detect circle ; square",
    "answer en how many?",
] * 5


@pytest.fixture(scope="module")
def proto():
    return train_tiny_sentencepiece(TEXTS)


def test_special_tokens_are_single_consecutive_ids(proto):
    tokenizer = PaliGemma2Tokenizer(proto)
    ids = np.asarray(tokenizer("<loc0000><loc1023><seg000><seg127>")).tolist()
    start, seg = tokenizer.location_token_start, tokenizer.segmentation_token_start
    assert ids == [start, start + 1023, seg, seg + 127]
    assert tokenizer.id_to_token(start + 512) == "<loc0512>"
    assert list(tokenizer.location_token_ids([0, 7])) == [start, start + 7]
    assert list(tokenizer.segmentation_token_ids([3])) == [seg + 3]
    assert len(tokenizer.separator_ids) == 1
    assert (tokenizer.pad_token_id, tokenizer.end_token_id, tokenizer.start_token_id) == (0, 1, 2)


def test_round_trip_text(proto):
    tokenizer = PaliGemma2Tokenizer(proto)
    text = "detect circle ; square\n<loc0100><loc0200><loc0300><loc0400> circle"
    assert tokenizer.detokenize(tokenizer(text)) == text
    # Text never seen in training still encodes (byte fallback).
    assert tokenizer.detokenize(tokenizer("zebra Ω")) == "zebra Ω"


def test_vocabulary_without_location_tokens_is_refused():
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_writer=model,
        vocab_size=40,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="lacks <loc0000>..<loc1023>"):
        PaliGemma2Tokenizer(model.getvalue())
