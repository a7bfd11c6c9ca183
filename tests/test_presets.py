"""Preset names: resolution, close matches, honest errors."""

import pytest

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.checkpoints import presets


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'pg2_10b_224'"):
        PaliGemma2Backbone.from_preset("pg2_10b_22")
    with pytest.raises(ValueError, match="Unknown preset 'nothing_like_it'"):
        PaliGemma2CausalLM.from_preset("nothing_like_it")


def test_registered_name_without_weights_builds_the_architecture():
    config = presets.preset_config("pg2_28b_448")
    assert config["image_size"] == 448
    assert config["query_pre_attn_scalar"] == 144
    assert config["final_logit_soft_cap"] is None  # big_vision semantics.


def test_every_released_checkpoint_is_registered_with_its_sources():
    names = sorted(presets.PRESETS)
    assert len(names) == 9 + 6 + 2
    assert presets.list_presets() == names + sorted(presets.EMBEDDED)
    for size in ("3b", "10b", "28b"):
        for resolution in (224, 448):
            assert f"pg2_mix_{size}_{resolution}" in names
    assert {"pg2_docci_3b_448", "pg2_docci_10b_448"} <= set(names)
    sources = presets.PRESETS["pg2_10b_224"]["sources"]
    assert sources["big_vision"] == {
        "repo_id": "google/paligemma2-10b-pt-224-jax",
        "filename": "paligemma2-10b-pt-224.b16.npz",
    }
    assert sources["transformers"] == {"repo_id": "google/paligemma2-10b-pt-224"}
    assert sources["keras_hub"] == "kaggle://keras/paligemma2/keras/pali_gemma2_pt_10b_224/3"
    docci = presets.PRESETS["pg2_docci_3b_448"]["sources"]
    assert docci["big_vision"]["filename"] == "paligemma2-3b-ft-docci-448.b16.npz"
    for name in names:
        config = presets.PRESETS[name]["config"]
        assert f"_{config['image_size']}" in name
        assert presets.PRESETS[name]["sources"]["tokenizer"]["filename"] == "tokenizer.model"


def test_source_applies_to_registered_names_only(fixtures_dir):
    with pytest.raises(ValueError, match="registered preset names only"):
        PaliGemma2Backbone.from_preset(
            fixtures_dir / "bv_tiny" / "tiny_f32.npz", source="transformers"
        )
    with pytest.raises(ValueError, match="Unknown source 'github'"):
        PaliGemma2Backbone.from_preset("pg2_3b_224", source="github")
