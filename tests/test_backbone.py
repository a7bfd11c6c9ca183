"""PaliGemma2Backbone and PaliGemma2CausalLM: wiring, serialisation, sizes, errors."""

import jax
import keras
import numpy as np
import pytest
from helpers import assert_close
from helpers import backbone_inputs
from helpers import randomize

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.checkpoints import presets

rng = None  # Reseeded from each test's id (conftest).


def _inputs(batch=2, length=7, image_size=28):
    return backbone_inputs(rng, batch, length, image_size)


@pytest.fixture
def tiny_lm(tiny_config):
    backbone = PaliGemma2Backbone(**tiny_config, final_logit_soft_cap=30.0)
    randomize(backbone, rng)
    return PaliGemma2CausalLM(backbone)


def test_shapes(tiny_lm):
    inputs = _inputs()
    hidden = tiny_lm.backbone(inputs)
    assert hidden.shape == (2, 4 + 7, 32)
    assert tiny_lm.backbone.num_image_tokens == 4
    assert tiny_lm(inputs).shape == (2, 7, 64)


def test_logits_are_text_positions_of_tied_projection(tiny_lm):
    inputs = _inputs()
    hidden = np.asarray(tiny_lm.backbone(inputs))[:, 4:]
    table = np.asarray(tiny_lm.backbone.token_embedding.embeddings)
    want = 30.0 * np.tanh(hidden @ table.T / 30.0)
    # numpy's float32 32-term dot products and tanh against XLA's, in another
    # order: a few ulps of the largest logit (measured 3).
    assert_close(tiny_lm(inputs), want, ulps=32)


def test_right_padding_does_not_change_real_positions(tiny_lm):
    inputs = _inputs(batch=1, length=6)
    padded = {k: np.pad(v, ((0, 0), (0, 3))) if k != "images" else v for k, v in inputs.items()}
    padded["token_ids"][:, 6:] = 5  # Garbage behind the padding mask.
    # The same program at another length: masked keys add exact zeros, but
    # XLA may split the longer sums otherwise. Measured 2 ulps.
    assert_close(np.asarray(tiny_lm(padded))[:, :6], tiny_lm(inputs), ulps=16)


def test_prefix_attends_bidirectionally(tiny_lm):
    # Changing the last prefix token changes the first prefix token's output
    # (bidirectional), but changing a response token never changes earlier ones.
    inputs = _inputs(batch=1, length=6)
    base = np.asarray(tiny_lm(inputs))
    changed_prefix = {**inputs, "token_ids": inputs["token_ids"].copy()}
    changed_prefix["token_ids"][0, 2] = (inputs["token_ids"][0, 2] + 1) % 64
    assert np.abs(np.asarray(tiny_lm(changed_prefix))[0, 0] - base[0, 0]).max() > 1e-4
    changed_response = {**inputs, "token_ids": inputs["token_ids"].copy()}
    changed_response["token_ids"][0, 5] = (inputs["token_ids"][0, 5] + 1) % 64
    # Same program, same shapes, the changed token masked out of these rows:
    # bit-equal (measured 0); 4 ulps for a different fusion.
    assert_close(np.asarray(tiny_lm(changed_response))[0, :5], base[0, :5], ulps=4)


def test_config_round_trip(tiny_lm):
    inputs = _inputs()
    config = tiny_lm.backbone.get_config()
    clone = PaliGemma2Backbone.from_config(config)
    clone.set_weights(tiny_lm.backbone.get_weights())
    # Same weights, same program: bit-equal (measured 0); 4 ulps for a
    # different fusion.
    assert_close(clone(inputs), tiny_lm.backbone(inputs), ulps=4)
    assert clone.get_config() == config


def test_keras_file_round_trip(tiny_lm, tmp_path):
    inputs = _inputs()
    path = str(tmp_path / "lm.keras")
    tiny_lm.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, PaliGemma2CausalLM)
    assert isinstance(restored.backbone, PaliGemma2Backbone)
    # Same weights, same program: bit-equal (measured 0); 2 ulps for a
    # different fusion (the old 1e-6 was 3.8 ulps of these logits).
    assert_close(restored(inputs), tiny_lm(inputs), ulps=2)
    backbone_path = str(tmp_path / "backbone.keras")
    tiny_lm.backbone.save(backbone_path)
    restored = keras.saving.load_model(backbone_path)
    assert isinstance(restored, PaliGemma2Backbone)


def test_bfloat16_policy_runs(tiny_config):
    backbone = PaliGemma2Backbone(**tiny_config, dtype="bfloat16")
    lm = PaliGemma2CausalLM(backbone)
    logits = lm(_inputs())
    assert str(logits.dtype) == "float32"  # Logits always in float32.
    assert str(backbone.token_embedding.embeddings.dtype) == "bfloat16"
    assert np.isfinite(np.asarray(logits)).all()


def test_sliding_window_acts_only_on_local_layers_past_the_window(tiny_config):
    windowed = PaliGemma2Backbone(**tiny_config, sliding_window_size=6)
    randomize(windowed, rng)
    full = PaliGemma2Backbone(**tiny_config)
    full.set_weights(windowed.get_weights())
    short = _inputs(batch=1, length=2)  # 4 image + 2 text = 6 tokens.
    # Inside the window both masks are the same: the same sums, bit-equal
    # (measured 0); 4 ulps for a different fusion.
    assert_close(windowed(short), full(short), ulps=4)
    long = _inputs(batch=1, length=12)
    assert np.abs(np.asarray(windowed(long)) - np.asarray(full(long))).max() > 1e-4
    assert PaliGemma2Backbone.is_local_layer(0, 6) and not PaliGemma2Backbone.is_local_layer(1, 6)


@pytest.mark.parametrize(
    "name,count",
    [
        ("pg2_3b_224", 3_032_094_960),
        ("pg2_10b_224", 9_662_409_456),
        ("pg2_28b_224", 27_650_192_112),
        ("pg2_3b_448", 3_032_094_960 + 884_736),
        ("pg2_10b_448", 9_662_409_456 + 884_736),
        ("pg2_28b_448", 27_650_192_112 + 884_736),
        ("pg2_3b_896", 3_032_094_960 + 4_423_680),
        ("pg2_10b_896", 9_662_409_456 + 4_423_680),
        ("pg2_28b_896", 27_650_192_112 + 4_423_680),
    ],
)
def test_parameter_counts_without_allocating(name, count):
    counted = {}

    def build():
        backbone = PaliGemma2Backbone.from_preset(name, load_weights=False)
        counted["params"] = sum(int(np.prod(v.shape)) for v in backbone.weights)
        counted["config"] = backbone.get_config()

    jax.eval_shape(build)  # Variables are abstract: nothing is allocated.
    assert counted["params"] == count
    expected_scalar = 144 if "28b" in name else 256
    assert counted["config"]["query_pre_attn_scalar"] == expected_scalar


def test_all_nine_pretrained_architectures_registered():
    names = set(presets.list_presets())
    assert {f"pg2_{s}_{r}" for s in ("3b", "10b", "28b") for r in (224, 448, 896)} <= names


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x: x.update(images=x["images"][0]), "shape \\(batch, height, width, 3\\)"),
        (lambda x: x.update(images=np.zeros((2, 32, 32, 3), "float32")), "must be 28x28"),
        (lambda x: x.update(images=np.zeros((2, 28, 28, 1), "float32")), "height, width, 3"),
        (lambda x: x.update(padding_mask=x["padding_mask"][:, :5]), "`padding_mask` has shape"),
        (lambda x: x.update(response_mask=x["response_mask"][:1]), "`response_mask` has shape"),
        (lambda x: x.update(token_ids=x["token_ids"][0]), "`token_ids` must have shape"),
        (lambda x: x.update(images=x["images"][:1]), "Batch sizes differ"),
        (lambda x: x.pop("response_mask"), "missing keys \\['response_mask'\\]"),
        (lambda x: x.update(mask=1), "unexpected keys \\['mask'\\]"),
        # Raw [0, 255] levels or uint8 given to the backbone, which takes [-1, 1].
        (
            lambda x: x.update(images=np.full((2, 28, 28, 3), 200.0, "float32")),
            "must be in \\[-1, 1\\]",
        ),
        (lambda x: x.update(images=np.full((2, 28, 28, 3), 200, "uint8")), "are uint8"),
        (
            lambda x: x.update(images=np.full((2, 28, 28, 3), np.nan, "float32")),
            "must be in \\[-1, 1\\]",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_lm, change, message):
    inputs = _inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        tiny_lm(inputs)


def test_bad_head_grouping_is_rejected(tiny_config):
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        PaliGemma2Backbone(**{**tiny_config, "num_key_value_heads": 3})
