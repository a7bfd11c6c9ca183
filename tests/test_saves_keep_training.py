"""Saved models keep what trains: LoRA adapters unmerged (rank, alpha,
layers), trainable flags and quantisation modes, through `.keras`,
`save_to_preset` / `from_preset` and `TrainingCheckpoint`."""

import keras
import numpy as np
import pytest
from helpers import backbone_inputs
from helpers import tiny_backbone
from helpers import tiny_lm

from keras_paligemma2 import InputError
from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.training import lora
from keras_paligemma2.training.callbacks import TrainingCheckpoint

# One ViT and one decoder layer: what is saved does not depend on depth.
ONE_LAYER = dict(num_layers=1, vit_num_layers=1)


def _nonzero_adapters(backbone, rng):
    # New adapters start with B = 0 (no effect): give them values, so a save
    # that dropped or merged them would change the output.
    for variable in lora.lora_variables(backbone):
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.1)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_backbone_saves_keep_lora_flags_and_quantisation(tmp_path, quantize):
    rng = np.random.default_rng(0)
    backbone = tiny_backbone(**ONE_LAYER)
    if quantize:
        backbone.quantize(quantize)
    backbone.enable_lora(2)  # keras-hub's: query and value, decoder and ViT
    _nonzero_adapters(backbone, rng)
    x = backbone_inputs(rng)
    want = np.asarray(backbone(x))
    setup = lora.training_setup(backbone)
    assert len(setup["lora_adapters"]) == 4  # (query, value) x (decoder, ViT)
    assert (setup["quantized_layers"] is not None) == bool(quantize)

    backbone.save(tmp_path / "b.keras")
    backbone.save_to_preset(tmp_path / "preset")
    for restored in (
        keras.saving.load_model(tmp_path / "b.keras"),
        PaliGemma2Backbone.from_preset(tmp_path / "preset"),
    ):
        assert lora.training_setup(restored) == setup
        assert len(lora.lora_variables(restored)) == 8
        # Bit-equal: the same variables, nothing merged or requantised.
        np.testing.assert_array_equal(np.asarray(restored(x)), want)


def test_task_saves_keep_lora_and_merging_stays_explicit(tmp_path):
    rng = np.random.default_rng(1)
    lm = tiny_lm(**ONE_LAYER)
    lm.enable_lora(4, alpha=8.0)  # ours: decoder attention + MLP
    _nonzero_adapters(lm.backbone, rng)
    x = backbone_inputs(rng, vocabulary_size=lm.backbone.vocabulary_size)
    want = np.asarray(lm.backbone(x))
    setup = lora.training_setup(lm.backbone)
    assert {tuple(v) for v in setup["lora_adapters"].values()} == {(4, 8.0)}
    lm.save(tmp_path / "lm.keras")
    lm.save_to_preset(tmp_path / "task")
    for restored in (
        keras.saving.load_model(tmp_path / "lm.keras"),
        PaliGemma2CausalLM.from_preset(tmp_path / "task"),
    ):
        assert lora.training_setup(restored.backbone) == setup
        trainable = {v.path for v in restored.backbone.trainable_variables}
        assert trainable == {v.path for v in lora.lora_variables(restored.backbone)}
        np.testing.assert_array_equal(np.asarray(restored.backbone(x)), want)
    restored.merge_lora()
    assert lora.training_setup(restored.backbone)["lora_adapters"] is None
    merged = np.asarray(restored.backbone(x))
    # Merging folds B @ A into the kernels: float32 sums in another order.
    np.testing.assert_allclose(merged, want, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_training_checkpoint_keeps_the_setup(tmp_path):
    rng = np.random.default_rng(2)
    lm = tiny_lm(**ONE_LAYER)
    lm.enable_lora(2)
    _nonzero_adapters(lm.backbone, rng)
    x = backbone_inputs(rng, vocabulary_size=lm.backbone.vocabulary_size)
    want = np.asarray(lm.backbone(x))
    checkpoint = TrainingCheckpoint(tmp_path / "run")
    checkpoint.set_model(lm)
    checkpoint.on_epoch_end(0, {"loss": 1.0})
    checkpoint.wait()  # written in the background

    fresh = tiny_lm(seed=1, **ONE_LAYER)  # other weights, no adapters
    resumed = TrainingCheckpoint(tmp_path / "run")
    resumed.set_model(fresh)
    with pytest.raises(InputError, match="restore_setup"):
        resumed.on_train_begin()
    resumed.restore_setup(fresh)
    resumed.on_train_begin()
    assert lora.training_setup(fresh.backbone) == lora.training_setup(lm.backbone)
    np.testing.assert_array_equal(np.asarray(fresh.backbone(x)), want)
