"""`run_layer_test` (tests/helpers.py) on every layer of the package: config
round trip, serialisation, dtype policies, variable input lengths; and the
config round trips of the preprocessing layers and the task."""

import keras
import numpy as np
import pytest
from helpers import backbone_inputs
from helpers import run_layer_test
from helpers import tiny_lm
from helpers import uint8_images

from keras_paligemma2 import PaliGemma2ImageConverter
from keras_paligemma2.layers.gemma import DecoderAttention
from keras_paligemma2.layers.gemma import DecoderBlock
from keras_paligemma2.layers.gemma import GatedMLP
from keras_paligemma2.layers.gemma import RMSNorm
from keras_paligemma2.layers.gemma import TokenEmbedding
from keras_paligemma2.layers.siglip import VisionAttention
from keras_paligemma2.layers.siglip import VisionBlock
from keras_paligemma2.layers.siglip import VisionEncoder
from keras_paligemma2.layers.vq_vae import MaskDecoder

B, D, W = 2, 32, 16  # batch, decoder width, ViT width


def _tokens(width):
    return lambda rng, t: ((rng.normal(size=(B, t, width)).astype("float32"),), {})


def _decoder_inputs(rng, t):
    x = rng.normal(size=(B, t, D)).astype("float32")
    positions = np.broadcast_to(np.arange(t, dtype="int32"), (B, t))
    # A prefix of 3 tokens attended both ways, then causal.
    causal = np.tril(np.ones((t, t), bool))
    causal[:3, :3] = True
    return (x, positions, np.broadcast_to(causal, (B, t, t))), {}


GEMMA_HEADS = dict(num_query_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8)


def test_token_embedding_lookup():
    run_layer_test(
        TokenEmbedding,
        dict(vocabulary_size=50, hidden_dim=W),
        lambda rng, t: ((rng.integers(0, 50, (B, t)).astype("int32"),), {}),
        lambda t: (B, t, W),
    )


def test_token_embedding_logits_are_float32_under_every_policy():
    run_layer_test(
        TokenEmbedding,
        dict(vocabulary_size=50, hidden_dim=W),
        lambda rng, t: ((rng.normal(size=(B, t, W)).astype("float32"),), {"reverse": True}),
        lambda t: (B, t, 50),
        output_dtype="float32",
        # Inputs and table rounded to bfloat16, then sums of W products.
        tolerance=16.0,
    )


def test_rms_norm():
    run_layer_test(RMSNorm, dict(epsilon=1e-6), _tokens(D), lambda t: (B, t, D))


def test_gated_mlp():
    run_layer_test(GatedMLP, dict(intermediate_dim=48), _tokens(D), lambda t: (B, t, D))


@pytest.mark.parametrize("soft_cap", [None, 50.0])
def test_decoder_attention(soft_cap):
    run_layer_test(
        DecoderAttention,
        dict(**GEMMA_HEADS, attention_logit_soft_cap=soft_cap),
        _decoder_inputs,
        lambda t: (B, t, D),
    )


def test_decoder_block():
    run_layer_test(
        DecoderBlock,
        dict(**GEMMA_HEADS, intermediate_dim=48, attention_logit_soft_cap=50.0),
        _decoder_inputs,
        lambda t: (B, t, D),
    )


def test_vision_attention():
    run_layer_test(VisionAttention, dict(num_heads=2), _tokens(W), lambda t: (B, t, W))


def test_vision_block():
    run_layer_test(
        VisionBlock, dict(num_heads=2, intermediate_dim=32), _tokens(W), lambda t: (B, t, W)
    )


def test_vision_encoder_at_any_batch_size():
    config = dict(
        image_size=28, patch_size=14, hidden_dim=W, num_layers=2, num_heads=2, intermediate_dim=32
    )
    run_layer_test(
        VisionEncoder,
        config,
        # The "length" here is the batch: the image size is part of the config.
        lambda rng, b: ((rng.uniform(-1, 1, (b, 28, 28, 3)).astype("float32"),), {}),
        lambda b: (b, 4, W),
        lengths=(1, 3),
    )


def test_mask_decoder_at_any_batch_size():
    run_layer_test(
        MaskDecoder,
        dict(num_codes=16, code_dim=8, width=8),
        lambda rng, b: ((rng.integers(0, 16, (b, 16)).astype("int32"),), {}),
        lambda b: (b, 64, 64),
        lengths=(1, 3),
        # Nine convolutions deep: roundings compound layer by layer.
        tolerance=64.0,
    )


def _round_trip(obj):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(restored) is type(obj) and restored.get_config() == obj.get_config()
    return restored


@pytest.mark.parametrize("pipeline", ["big_vision", "big_vision_antialias", "colab", "keras_hub"])
def test_image_converter_config_round_trip(pipeline):
    converter = PaliGemma2ImageConverter(image_size=28, pipeline=pipeline)
    image = uint8_images(np.random.default_rng(0), batch=1, size=40)[0]
    np.testing.assert_array_equal(_round_trip(converter)(image), converter(image))


def test_tokenizer_and_preprocessor_config_round_trip(tmp_path):
    preprocessor = tiny_lm(scale=None, sequence_length=12).preprocessor
    restored = _round_trip(preprocessor)
    # The SentencePiece model travels as an asset beside the config, as in
    # `.keras` files and presets.
    preprocessor.tokenizer.save_assets(str(tmp_path))
    restored.tokenizer.load_assets(str(tmp_path))
    assert restored.tokenizer.get_vocabulary() == preprocessor.tokenizer.get_vocabulary()
    examples = {
        "images": uint8_images(np.random.default_rng(1)),
        "prompts": ["caption en", "answer en what colour"],
        "responses": ["a red circle", "two"],
    }
    for got, want in zip(restored(examples)[0].values(), preprocessor(examples)[0].values()):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_task_config_round_trip_keeps_its_backbone_and_preprocessor():
    lm = tiny_lm(seed=3, sequence_length=12, final_logit_soft_cap=30.0)
    restored = _round_trip(lm)
    restored.set_weights(lm.get_weights())
    x = backbone_inputs(np.random.default_rng(2), vocabulary_size=lm.backbone.vocabulary_size)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(lm(x)))
    assert restored.backbone.get_config() == lm.backbone.get_config()
