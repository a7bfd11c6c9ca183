"""Export to big_vision's `.npz`: the inverse of loading one, LoRA folded
in, refused for quantised models, and from the command line."""

import numpy as np
import pytest

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.apps.cli import main
from keras_paligemma2.utils.errors import InputError


@pytest.mark.parametrize("name, dtype", [("tiny_f32.npz", None), ("tiny.b16.npz", "bfloat16")])
def test_exporting_a_loaded_checkpoint_gives_back_the_file(fixtures_dir, tmp_path, name, dtype):
    source = fixtures_dir / "bv_tiny" / name
    overrides = {"dtype": dtype} if dtype else {}
    backbone = PaliGemma2Backbone.from_preset(source, **overrides)
    backbone.save_to_big_vision(tmp_path / "out.npz")
    with np.load(source) as want, np.load(tmp_path / "out.npz") as got:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            assert got[key].dtype == want[key].dtype, key  # bfloat16 as 2-byte void
            assert got[key].shape == want[key].shape, key
            np.testing.assert_array_equal(got[key].view(np.uint8), want[key].view(np.uint8), key)


def test_lora_is_folded_in_and_the_model_left_alone(fixtures_dir, tmp_path):
    lm = PaliGemma2CausalLM.from_preset(fixtures_dir / "bv_tiny" / "tiny_f32.npz")
    lm.enable_lora(2)
    rng = np.random.default_rng(0)
    for variable in lm.backbone.weights:
        if "lora_kernel" in variable.path:
            variable.assign(0.1 * rng.standard_normal(variable.shape).astype("float32"))
    query = lm.backbone.get_layer("decoder_block_0").attention.query
    merged = np.asarray(query.kernel)
    lm.save_to_big_vision(tmp_path / "merged.npz")
    assert query.lora_enabled  # still adapted
    loaded = PaliGemma2Backbone.from_preset(tmp_path / "merged.npz")
    kernel = loaded.get_layer("decoder_block_0").attention.query.kernel
    np.testing.assert_array_equal(np.asarray(kernel), merged)
    assert not np.array_equal(merged, np.asarray(query._kernel))


def test_quantised_models_and_wrong_names_are_refused(fixtures_dir, tmp_path, capsys):
    source = str(fixtures_dir / "bv_tiny" / "tiny_f32.npz")
    backbone = PaliGemma2Backbone.from_preset(source, quantization="int8")
    with pytest.raises(InputError, match="quantised"):
        backbone.save_to_big_vision(tmp_path / "int8.npz")
    assert not (tmp_path / "int8.npz").exists()
    assert main(["convert", source, str(tmp_path / "out"), "--to", "big_vision"]) == 2
    assert ".npz file" in capsys.readouterr().err
    out = tmp_path / "export" / "tiny.npz"
    assert main(["convert", source, str(out), "--to", "big_vision"]) == 0
    with np.load(source) as want, np.load(out) as got:
        assert sorted(got.files) == sorted(want.files)
    assert main(["convert", source, str(out), "--to", "big_vision"]) == 2  # no overwrite
