"""PaliGemma2CausalLMPreprocessor: big_vision's token layout, masks and errors."""

import numpy as np
import pytest

from keras_paligemma2 import PaliGemma2CausalLMPreprocessor
from keras_paligemma2 import PaliGemma2ImageConverter
from keras_paligemma2 import PaliGemma2Tokenizer
from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece


@pytest.fixture(scope="module")
def tokenizer():
    return PaliGemma2Tokenizer(
        train_tiny_sentencepiece(["caption en", "a red cat", "answer en what"] * 5)
    )


@pytest.fixture
def preprocessor(tokenizer):
    return PaliGemma2CausalLMPreprocessor(
        tokenizer, PaliGemma2ImageConverter(28), sequence_length=12
    )


def _ids(tokenizer, text):
    return np.asarray(tokenizer(text)).tolist()


def test_layout_masks_and_labels(preprocessor, tokenizer):
    image = np.zeros((40, 30, 3), np.uint8)
    x, y, weights = preprocessor(
        {
            "images": [image, image],
            "prompts": ["caption en", "answer en what"],
            "responses": ["a red cat", ""],
        }
    )
    sep = tokenizer.separator_ids
    row0 = [2] + _ids(tokenizer, "caption en") + sep + _ids(tokenizer, "a red cat") + [1]
    full = np.zeros(13, int)
    full[: len(row0)] = row0
    np.testing.assert_array_equal(x["token_ids"][0], full[:-1])
    np.testing.assert_array_equal(y[0], full[1:])
    prefix_len = 1 + len(_ids(tokenizer, "caption en")) + len(sep)
    response = np.zeros(13)
    response[prefix_len : len(row0)] = 1  # Response tokens and <eos>.
    np.testing.assert_array_equal(x["response_mask"][0], response[:-1])
    np.testing.assert_array_equal(weights[0], response[1:])  # Loss on response + eos only.
    np.testing.assert_array_equal(x["padding_mask"][0], (full[:-1] != 0) | (np.arange(12) == 0))
    # An empty response still teaches <eos>.
    assert weights[1].sum() == 1 and y[1][weights[1] == 1].tolist() == [1]
    assert x["images"].shape == (2, 28, 28, 3)


def test_generate_preprocess_has_no_response(preprocessor, tokenizer):
    x = preprocessor.generate_preprocess(
        {"images": np.zeros((28, 28, 3), np.uint8), "prompts": "caption en"}
    )
    n = 1 + len(_ids(tokenizer, "caption en")) + 1
    assert x["padding_mask"][0].sum() == n and x["response_mask"].sum() == 0


def test_over_long_inputs(preprocessor):
    image = np.zeros((28, 28, 3), np.uint8)
    with pytest.raises(ValueError, match="prompts are never cut"):
        preprocessor({"images": image, "prompts": "caption en " * 10, "responses": "a"})
    with pytest.raises(ValueError, match="truncate='response'"):
        preprocessor({"images": image, "prompts": "caption en", "responses": "a red cat " * 5})
    preprocessor.truncate = "response"
    with pytest.warns(UserWarning, match="1 of 1 responses were cut"):
        x, y, weights = preprocessor(
            {"images": image, "prompts": "caption en", "responses": "a red cat " * 5}
        )
    assert x["padding_mask"].all()


@pytest.mark.parametrize(
    "x,message",
    [
        ({"images": np.zeros((28, 28, 3)), "prompts": " ", "responses": "a"}, "Empty prompt"),
        (
            {"images": [np.zeros((28, 28, 3))] * 2, "prompts": "caption en", "responses": "a"},
            "2 images but 1 prompts",
        ),
        (
            {"images": np.zeros((28, 28, 3)), "prompts": ["a", "b"], "responses": ["a"]},
            "2 prompts but 1 responses",
        ),
        (
            {"images": np.zeros((28, 28, 3)), "prompts": "caption en"},
            "Missing keys \\['responses'\\]",
        ),
        (
            {"images": np.zeros((28, 28, 3)), "prompts": 3, "responses": "a"},
            "must be strings|not iterable",
        ),
    ],
)
def test_bad_inputs(preprocessor, x, message):
    with pytest.raises((ValueError, TypeError), match=message):
        preprocessor(x)


def test_unknown_truncation(tokenizer):
    with pytest.raises(ValueError, match="truncate must be one of"):
        PaliGemma2CausalLMPreprocessor(tokenizer, truncate="prompt")


def test_a_prompt_written_with_its_separator_gets_no_second_one(preprocessor, tokenizer):
    # keras-hub's and transformers' docs write prompts as "caption en\n".
    assert preprocessor.prompt_ids("caption en\n") == preprocessor.prompt_ids("caption en")
    image = np.zeros((28, 28, 3), np.uint8)
    examples = {"images": [image], "responses": ["a red cat"]}
    with_separator = preprocessor({**examples, "prompts": ["caption en\n"]})[0]
    without = preprocessor({**examples, "prompts": ["caption en"]})[0]
    for key in ("token_ids", "padding_mask", "response_mask"):
        np.testing.assert_array_equal(with_separator[key], without[key])
    # Only one trailing separator is the separator; a blank prompt stays an error.
    assert preprocessor.prompt_ids("caption en\n\n") != preprocessor.prompt_ids("caption en")
    with pytest.raises(ValueError, match="Empty prompt"):
        preprocessor.prompt_ids("\n")


def test_length_errors_name_the_users_sequence_length(preprocessor):
    image = np.zeros((28, 28, 3), np.uint8)
    long = {"images": [image], "prompts": ["caption en"], "responses": ["a red cat " * 6]}
    # Training rows hold sequence_length + 1 tokens (shifted into labels).
    with pytest.raises(ValueError, match=r"a row holds 13 tokens \(sequence_length=12, plus one"):
        preprocessor(long)
    with pytest.raises(ValueError, match=r"a row holds 12 tokens \(sequence_length=12\)"):
        preprocessor.generate_preprocess({"images": [image], "prompts": ["answer en what " * 6]})
