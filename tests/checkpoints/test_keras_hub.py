"""keras-hub PaliGemma presets convert into ours; our own presets round-trip."""

import json

import keras_hub
import numpy as np
import pytest
from helpers import KERAS_HUB_TINY
from helpers import assert_close
from helpers import randomize

from keras_paligemma2 import CheckpointError
from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.checkpoints import keras_hub_preset

rng = None  # Reseeded from each test's id (conftest).


def _inputs():
    return {
        "images": rng.uniform(-1, 1, (2, 28, 28, 3)).astype("float32"),
        "token_ids": rng.integers(1, 64, (2, 6)).astype("int32"),
        "padding_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], "int32"),
        "response_mask": np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], "int32"),
    }


@pytest.fixture
def saved_keras_hub_preset(tmp_path):
    source = keras_hub.models.PaliGemmaBackbone(**KERAS_HUB_TINY)
    randomize(source, rng)
    path = tmp_path / "keras_hub_preset"
    source.save_to_preset(str(path))
    return source, path


def test_keras_hub_preset_gives_the_same_hidden_states(saved_keras_hub_preset):
    source, path = saved_keras_hub_preset
    ours = PaliGemma2Backbone.from_preset(path)
    inputs = _inputs()
    want = np.asarray(source(inputs))
    got = np.asarray(ours(inputs))
    real = np.concatenate([np.ones((2, 4)), inputs["padding_mask"]], 1).astype(bool)
    # keras-hub's program and ours, float32, 2-layer ViT + 2-layer Gemma:
    # sums in other orders (measured 6 ulps of the largest hidden state).
    assert_close(got[real], want[real], ulps=48)
    config = ours.get_config()
    assert config["intermediate_dim"] == 48
    assert config["final_logit_soft_cap"] == 30.0  # keras-hub's semantics kept.
    lm = PaliGemma2CausalLM.from_preset(path)
    assert lm.preprocessor is None


def test_28b_query_scale_is_fixed_on_the_way_in():
    config = dict(KERAS_HUB_TINY)
    config.update(
        num_layers=46,
        hidden_dim=4608,
        num_query_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        intermediate_dim=2 * 36864,
        query_head_dim_normalize=True,
    )
    ours = keras_hub_preset.infer_config(config, "pali_gemma2_pt_28b_224")
    assert ours["query_pre_attn_scalar"] == 144  # keras-hub would use 128.


def test_paligemma_1_preset_is_refused():
    config = {**KERAS_HUB_TINY, "use_post_ffw_norm": False}
    with pytest.raises(CheckpointError, match="PaliGemma 1"):
        keras_hub_preset.infer_config(config, "pali_gemma_3b_224")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_to_preset_round_trip_is_bit_exact(tiny_config, tmp_path, dtype):
    backbone = PaliGemma2Backbone(**tiny_config, dtype=dtype)
    randomize(backbone, rng, 1.0)
    backbone.save_to_preset(str(tmp_path / "ours"))
    assert (
        json.loads((tmp_path / "ours" / "config.json").read_text())["class_name"]
        == "PaliGemma2Backbone"
    )
    restored = PaliGemma2Backbone.from_preset(tmp_path / "ours")
    assert restored.get_config() == backbone.get_config()
    for a, b in zip(backbone.weights, restored.weights):
        assert a.path == b.path and str(a.dtype) == str(b.dtype) == dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    lm = PaliGemma2CausalLM(backbone)
    lm.save_to_preset(str(tmp_path / "task"))
    restored_lm = PaliGemma2CausalLM.from_preset(tmp_path / "task")
    assert isinstance(restored_lm, PaliGemma2CausalLM)


def test_task_preset_keeps_bfloat16(tiny_config, tmp_path):
    lm = PaliGemma2CausalLM(PaliGemma2Backbone(**tiny_config, dtype="bfloat16"))
    lm.save_to_preset(str(tmp_path / "task"))
    restored = PaliGemma2CausalLM.from_preset(tmp_path / "task")
    assert str(restored.backbone.token_embedding.embeddings.dtype) == "bfloat16"
    as_float32 = PaliGemma2CausalLM.from_preset(tmp_path / "task", dtype="float32")
    assert str(as_float32.backbone.token_embedding.embeddings.dtype) == "float32"


def test_keras_hub_task_preset_brings_its_tokenizer_and_squashes_images(tmp_path):
    from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece

    tokenizer = keras_hub.models.PaliGemmaTokenizer(
        proto=train_tiny_sentencepiece(["caption en", "a cat"])
    )
    converter = keras_hub.layers.PaliGemmaImageConverter(
        image_size=(28, 28), scale=1 / 127.5, offset=-1
    )
    preprocessor = keras_hub.models.PaliGemmaCausalLMPreprocessor(tokenizer, converter)
    backbone = keras_hub.models.PaliGemmaBackbone(**KERAS_HUB_TINY)
    keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(
        str(tmp_path / "kh")
    )
    lm = PaliGemma2CausalLM.from_preset(tmp_path / "kh")
    assert lm.preprocessor is not None
    assert lm.preprocessor.image_converter.crop_to_aspect_ratio is False  # big_vision squashes.
    ids = lm.preprocessor.tokenizer("<loc0005>")
    assert len(ids) == 1


def test_our_task_preset_round_trips_its_preprocessor(tiny_config, tmp_path):
    from keras_paligemma2 import PaliGemma2CausalLMPreprocessor
    from keras_paligemma2 import PaliGemma2ImageConverter
    from keras_paligemma2 import PaliGemma2Tokenizer
    from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece

    preprocessor = PaliGemma2CausalLMPreprocessor(
        PaliGemma2Tokenizer(train_tiny_sentencepiece(["caption en", "a cat"])),
        PaliGemma2ImageConverter(28),
        sequence_length=20,
    )
    lm = PaliGemma2CausalLM(PaliGemma2Backbone(**tiny_config), preprocessor)
    lm.save_to_preset(str(tmp_path / "task"))
    assert (tmp_path / "task" / "assets" / "tokenizer").is_dir()
    restored = PaliGemma2CausalLM.from_preset(tmp_path / "task")
    assert restored.preprocessor.sequence_length == 20
    sample = {
        "images": np.zeros((28, 28, 3), "uint8"),
        "prompts": "caption en",
        "responses": "a cat",
    }
    got, want = restored.preprocessor(sample), preprocessor(sample)
    np.testing.assert_array_equal(got[0]["token_ids"], want[0]["token_ids"])


@pytest.fixture
def initialized(monkeypatch):
    """The paths of the variables given values by their initializers from now on."""
    from keras.src.backend.jax.core import JaxVariable

    paths = []
    original = JaxVariable._initialize_with_initializer

    def record(variable, initializer):
        paths.append(variable.path)
        return original(variable, initializer)

    monkeypatch.setattr(JaxVariable, "_initialize_with_initializer", record)
    return paths


def test_own_preset_loads_without_running_initializers(tiny_config, tmp_path, initialized):
    # keras-hub's loader draws random weights and then overwrites them, which
    # doubles the peak memory of a load; ours fills each variable once.
    backbone = PaliGemma2Backbone(**tiny_config)
    randomize(backbone, rng, 1.0)
    PaliGemma2CausalLM(backbone).save_to_preset(str(tmp_path / "task"))
    initialized.clear()
    restored = PaliGemma2CausalLM.from_preset(tmp_path / "task")
    weights = {v.path for v in restored.backbone.weights}
    assert weights and not weights & set(initialized)
    for a, b in zip(backbone.weights, restored.backbone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Without the weights, a random model as before.
    initialized.clear()
    PaliGemma2CausalLM.from_preset(tmp_path / "task", load_weights=False)
    assert len(initialized) >= len(weights)


def test_keras_hub_preset_converts_without_running_initializers(
    saved_keras_hub_preset, initialized
):
    source, path = saved_keras_hub_preset
    initialized.clear()
    ours = PaliGemma2Backbone.from_preset(path)
    assert initialized == []  # neither keras-hub's model nor ours drew random weights
    embedding = np.asarray(ours.token_embedding.embeddings)
    np.testing.assert_array_equal(embedding, np.asarray(source.token_embedding.embeddings))


def test_keras_hub_preset_without_weights_builds_only_ours(saved_keras_hub_preset, initialized):
    source, path = saved_keras_hub_preset
    initialized.clear()
    ours = PaliGemma2Backbone.from_preset(path, load_weights=False)
    # Only our own variables are initialized: keras-hub's model is not built to read the config.
    assert sorted(initialized) == sorted(v.path for v in ours.weights)
    assert ours.num_layers == source.num_layers and ours.vocabulary_size == source.vocabulary_size
