"""Export to big_vision's `.npz`: the inverse of loading one, LoRA folded
in, refused for quantised models, and from the command line."""

import hashlib
import json

import numpy as np
import pytest
from helpers import assert_close

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


def test_big_vision_reads_the_export_as_we_compute(fixtures_dir, tmp_path):
    """`tests/fixtures/bv_export` (tests/fixtures/gen/big_vision_export.py):
    big_vision's own `paligemma.load` read pg2_tiny_shapes exported by
    `save_to_big_vision`, and its training forward gave these logits."""
    info = json.loads((fixtures_dir / "bv_export" / "versions.json").read_text())
    reference = np.load(fixtures_dir / "bv_export" / "reference.npz")
    path = tmp_path / "pg2_tiny_shapes.npz"
    with pytest.warns(UserWarning, match=r"final logit soft-cap 30.0 .* not in the file"):
        PaliGemma2CausalLM.from_preset("pg2_tiny_shapes").save_to_big_vision(path)
    # The reference is about exactly the bytes exported now.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["exported_npz_sha256"]
    lm = PaliGemma2CausalLM.from_preset(path)  # big_vision's semantics: no final soft-cap
    valid = reference["mask_input"]
    logits = np.asarray(
        lm(
            {
                "images": reference["images"],
                "token_ids": reference["text"],
                "padding_mask": valid.astype("int32"),
                "response_mask": reference["mask_ar"] * valid,
            }
        )
    )
    # Two float32 programs (4 + 4 layers, sums of up to 768 terms) in other
    # orders; big_vision's own rows alone vs its ragged batch differ by 7e-6
    # (8 ulps of its largest logit, 15.4). Measured: 9.5e-6 (10 ulps). 64 ulps
    # as the other big_vision logit comparisons (test_big_vision.py).
    assert_close(logits[valid], reference["logits"][valid], ulps=64)
