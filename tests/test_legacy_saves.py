"""Files written by an earlier version of the package (before its modules moved
into subpackages; tests/fixtures/gen/legacy_saves.py, commit in written_by.json)
still load and give the same numbers: serialisable names are registered by
name, not by module path."""

import json

import keras
import numpy as np
import pytest
from conftest import FIXTURES
from helpers import assert_close

import keras_paligemma2 as kp

LEGACY = FIXTURES / "legacy_saves"


@pytest.fixture(scope="module")
def expected():
    with np.load(LEGACY / "expected.npz") as data:
        return dict(data)


def _inputs(expected):
    return {k: expected[k] for k in ("images", "token_ids", "padding_mask", "response_mask")}


def test_saved_task_loads_with_its_preprocessor_and_logits(expected):
    lm = keras.saving.load_model(LEGACY / "task.keras")
    assert isinstance(lm, kp.PaliGemma2CausalLM)
    assert isinstance(lm.preprocessor, kp.PaliGemma2CausalLMPreprocessor)
    # The tiny task (2-layer ViT + 2-layer Gemma, float32) against logits an
    # earlier version wrote: the same program, bit-equal today (measured 0);
    # 64 ulps of the largest logit if a later XLA sums in another order.
    assert_close(lm(_inputs(expected)), expected["logits"], ulps=64)
    written = json.loads((LEGACY / "written_by.json").read_text())
    prompts = ["caption en", "answer en what colour"]
    got = lm.generate(
        {"images": expected["raw_images"], "prompts": prompts},
        max_new_tokens=4,
        stop_token_ids=None,
    )
    assert got == written["generate"]


def test_saved_backbone_and_preset_load(expected):
    backbone = keras.saving.load_model(LEGACY / "backbone.keras")
    assert isinstance(backbone, kp.PaliGemma2Backbone)
    lm = kp.PaliGemma2CausalLM.from_preset(str(LEGACY / "preset"))
    assert_close(lm(_inputs(expected)), expected["logits"], ulps=64)  # As above.
    hidden = np.asarray(backbone(_inputs(expected)))
    # Two loads of the same weights run by the same program: bit-equal
    # (measured 0); 8 ulps for a different fusion.
    assert_close(hidden, lm.backbone(_inputs(expected)), ulps=8)


def test_lora_adapters_saved_by_path_load(expected):
    lm = kp.PaliGemma2CausalLM.from_preset(str(LEGACY / "preset"))
    lm.enable_lora(rank=2)
    lm.load_lora_weights(LEGACY / "adapters.safetensors")
    # As the logits of the first test: 64 ulps (measured 0).
    assert_close(lm(_inputs(expected)), expected["lora_logits"], ulps=64)
