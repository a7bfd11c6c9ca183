"""How checkpoints are loaded: no initializers, nothing left pending, sharded placement."""

import jax
import keras
import numpy as np
import pytest
from keras.src.backend.common import global_state

from keras_paligemma2 import CheckpointError
from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM


def _pending():
    return global_state.get_global_attribute("uninitialized_variables") or []


@pytest.fixture
def bv_f32(fixtures_dir):
    return fixtures_dir / "bv_tiny" / "tiny_f32.npz"


def test_load_leaves_nothing_to_initialize(bv_f32):
    backbone = PaliGemma2Backbone.from_preset(bv_f32)
    assert not _pending()
    assert all(v._value is not None for v in backbone.variables)
    with keras.StatelessScope():  # Its exit initializes pending variables.
        pass


def test_failed_load_leaves_nothing_pending(bv_f32):
    with pytest.raises(CheckpointError):
        PaliGemma2Backbone.from_preset(bv_f32, intermediate_dim=96)
    assert not _pending()


def test_initializers_never_compute_values(bv_f32, monkeypatch):
    # Keras traces the layers symbolically (under jax.eval_shape), where an
    # uninitialized variable's initializer gives an abstract placeholder;
    # no initializer may ever produce a concrete array while loading.
    concrete = []
    for name in ("GlorotUniform", "VarianceScaling", "RandomNormal", "Zeros", "Ones"):
        cls = getattr(keras.initializers, name)

        def traced_only(self, *args, _original=cls.__call__, **kwargs):
            out = _original(self, *args, **kwargs)
            if not isinstance(out, jax.core.Tracer):
                concrete.append(type(self).__name__)
            return out

        monkeypatch.setattr(cls, "__call__", traced_only)
    PaliGemma2Backbone.from_preset(bv_f32)
    assert concrete == []


def test_load_under_model_parallel_places_shards(fixtures_dir, bv_f32):
    devices = jax.devices()
    assert len(devices) == 8, "tests run with 8 simulated CPU devices"
    reference = np.load(fixtures_dir / "bv_tiny" / "reference_outputs.npz")
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    layout_map["decoder_block_.*/mlp/(gate|up)/kernel"] = (None, "model")
    layout_map["decoder_block_.*/mlp/down/kernel"] = ("model", None)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        lm = PaliGemma2CausalLM.from_preset(bv_f32)
    embedding = lm.backbone.token_embedding.embeddings.value
    assert len(embedding.sharding.device_set) == 8
    assert embedding.addressable_shards[0].data.shape == (1200 // 4, 48)
    gate = lm.backbone.decoder_blocks[0].mlp.gate.kernel.value
    assert gate.addressable_shards[0].data.shape == (48, 80 // 4)
    text = reference["text"]
    logits = lm(
        {
            "images": reference["images"],
            "token_ids": text,
            "padding_mask": np.ones_like(text),
            "response_mask": reference["mask_ar"],
        }
    )
    assert np.abs(np.asarray(logits) - reference["text_logits"]).max() < 1e-4
