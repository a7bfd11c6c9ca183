"""Load the reference checkpoints shipped with the tests and compare logits.

    python examples/check_parity.py

Loads the tiny big_vision (float32 and bfloat16) and HF transformers
checkpoints in `tests/fixtures/` and prints how far our logits are from the
logits each reference implementation computed for them.
"""

import pathlib

import numpy as np

from keras_paligemma2 import PaliGemma2CausalLM

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def big_vision():
    reference = np.load(FIXTURES / "bv_tiny" / "reference_outputs.npz")
    text = reference["text"]
    inputs = {
        "images": reference["images"],
        "token_ids": text,
        "padding_mask": np.ones_like(text),
        "response_mask": reference["mask_ar"],
    }
    for name, key in (("tiny_f32.npz", "text_logits"), ("tiny.b16.npz", "text_logits_b16_params")):
        lm = PaliGemma2CausalLM.from_preset(FIXTURES / "bv_tiny" / name)
        logits = np.asarray(lm(inputs))
        print(
            f"big_vision {name:14s} max |ours - big_vision| = {np.abs(logits - reference[key]).max():.2e}"
        )


def hf():
    reference = np.load(FIXTURES / "hf_tiny" / "reference_outputs.npz")
    lm = PaliGemma2CausalLM.from_preset(FIXTURES / "hf_tiny")
    num_image_tokens = lm.backbone.num_image_tokens
    vocabulary = lm.backbone.vocabulary_size
    for length in ("short", "long"):
        ids = reference[f"{length}_input_ids"][:, num_image_tokens:]
        inputs = {
            "images": reference["pixel_values"].transpose(0, 2, 3, 1),
            "token_ids": ids,
            "padding_mask": np.ones_like(ids),
            "response_mask": reference[f"{length}_token_type_ids"][:, num_image_tokens:],
        }
        logits = np.asarray(lm(inputs))
        want = reference[f"{length}_logits"][:, num_image_tokens:, :vocabulary]
        print(f"HF transformers {length:9s} max |ours - HF| = {np.abs(logits - want).max():.2e}")


if __name__ == "__main__":
    big_vision()
    hf()
