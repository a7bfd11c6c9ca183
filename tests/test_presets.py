"""Preset names: resolution, close matches, honest errors."""

import pytest

from keras_paligemma2 import CheckpointError
from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2 import presets


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


def test_weights_of_registered_name_say_what_to_do():
    with pytest.raises(CheckpointError, match="load_weights=False"):
        PaliGemma2Backbone.from_preset("pg2_3b_224")
