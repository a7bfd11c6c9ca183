"""Export to transformers: what transformers itself makes of the exported
directory (`tests/fixtures/hf_export`, made by tests/fixtures/gen/hf_export.py),
the round trip through our own HF loader, shards, LoRA, refusals."""

import hashlib
import json

import numpy as np
import pytest
from helpers import tiny_lm

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.apps.cli import main
from keras_paligemma2.utils.errors import InputError


@pytest.fixture(scope="module")
def shapes_lm():
    return PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")


@pytest.fixture(scope="module")
def exported(shapes_lm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export") / "pg2_tiny_shapes_hf"
    shapes_lm.save_to_transformers(directory)
    return directory


def test_transformers_reads_the_export_as_we_compute(fixtures_dir, shapes_lm, exported):
    info = json.loads((fixtures_dir / "hf_export" / "versions.json").read_text())
    # The reference is about exactly the bytes exported now.
    for name, digest in info["exported_files_sha256"].items():
        assert hashlib.sha256((exported / name).read_bytes()).hexdigest() == digest, name
    assert sorted(p.name for p in exported.iterdir()) == sorted(info["exported_files_sha256"])
    reference = np.load(fixtures_dir / "hf_export" / "reference.npz")
    lm = shapes_lm
    images = lm.backbone.num_image_tokens
    vocabulary = lm.backbone.vocabulary_size
    for i, (_, prompt, suffix) in enumerate(info["examples"]):
        ids = reference[f"input_ids_{i}"]
        assert (ids[0, :images] == vocabulary).all()  # <image> right after the vocabulary
        text = ids[:, images:]
        # transformers' tokenizer, built from the exported files, tokenizes as ours.
        ours = lm.preprocessor(
            {"images": np.zeros((1, 8, 8, 3), "uint8"), "prompts": [prompt], "responses": [suffix]}
        )
        ours = ours[0] if isinstance(ours, tuple) else ours
        mask = np.asarray(ours["padding_mask"])[0].astype(bool)
        np.testing.assert_array_equal(np.asarray(ours["token_ids"])[0][mask], text[0])
        pixels = reference[f"pixel_values_{i}"].transpose(0, 2, 3, 1)
        response = (reference[f"token_type_ids_{i}"][:, images:] == 1).astype("int32")
        logits = np.asarray(
            lm(
                {
                    "images": pixels,
                    "token_ids": text,
                    "padding_mask": np.ones_like(text),
                    "response_mask": response,
                }
            )
        )
        want = reference[f"logits_{i}"]
        np.testing.assert_allclose(logits, want[..., :vocabulary], rtol=0, atol=1e-4)
        prefix = reference[f"prefix_ids_{i}"][:, images:]
        generated = reference[f"generated_{i}"]
        out = lm.generate(
            {"images": pixels, "token_ids": prefix, "padding_mask": np.ones_like(prefix)},
            max_new_tokens=generated.shape[1],
            strip_prompt=True,
        )
        n = int(out["padding_mask"][0].sum())
        np.testing.assert_array_equal(out["token_ids"][0, :n], generated[0, :n])


def test_our_loader_reads_the_export_back(shapes_lm, exported):
    loaded = PaliGemma2CausalLM.from_preset(exported)
    config = {k: v for k, v in loaded.backbone.get_config().items() if k != "name"}
    assert config == {k: v for k, v in shapes_lm.backbone.get_config().items() if k != "name"}
    for got, want in zip(loaded.backbone.weights, shapes_lm.backbone.weights):
        assert got.path == want.path
        np.testing.assert_array_equal(np.asarray(got.value), np.asarray(want.value), got.path)
    assert loaded.preprocessor.tokenizer.proto == shapes_lm.preprocessor.tokenizer.proto
    config = json.loads((exported / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 1600  # 1,587 + <image>, to a multiple of 64
    assert config["image_token_index"] == 1587


def test_shards_lora_and_no_window(tmp_path):
    lm = tiny_lm(seed=1, scale=0.2, sliding_window_size=None)
    lm.enable_lora(2)
    rng = np.random.default_rng(0)
    for variable in lm.backbone.weights:
        if "lora_kernel" in variable.path:
            variable.assign(0.1 * rng.standard_normal(variable.shape).astype("float32"))
    merged = {
        layer.path: np.asarray(layer.kernel)
        for layer in lm.backbone._flatten_layers()
        if getattr(layer, "lora_enabled", False)
    }
    lm.save_to_transformers(tmp_path / "out", max_shard_size=20e3 / 1e9)  # 20 kB shards
    assert lm.backbone.get_layer("decoder_block_0").attention.query.lora_enabled
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all(
        k.startswith(
            ("vision_tower.vision_model.", "language_model.model.", "multi_modal_projector.")
        )
        for k in index["weight_map"]
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config["text_config"]["layer_types"]) == {"full_attention"}
    loaded = PaliGemma2Backbone.from_preset(tmp_path / "out")
    assert loaded.sliding_window_size is None
    for layer in loaded._flatten_layers():
        if layer.path in merged:
            np.testing.assert_array_equal(np.asarray(layer.kernel), merged[layer.path])


def test_what_transformers_cannot_express_is_refused(fixtures_dir, tmp_path):
    lm = PaliGemma2CausalLM.from_preset(
        fixtures_dir / "bv_tiny" / "tiny_f32.npz",
        final_logit_soft_cap=30.0,
        final_logit_soft_cap_scope="decode_steps",
    )
    with pytest.raises(InputError, match="decode steps"):
        lm.save_to_transformers(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    lm = tiny_lm(seed=0, scale=0.2, words=None)
    lm.quantize("int8")
    with pytest.raises(InputError, match="quantised"):
        lm.save_to_transformers(tmp_path / "out")


def test_convert_to_transformers(exported, tmp_path, capsys):
    destination = tmp_path / "hf"
    assert main(["convert", "pg2_tiny_shapes", str(destination), "--to", "transformers"]) == 0
    assert "with its tokenizer" in capsys.readouterr().out
    for path in exported.iterdir():
        assert (destination / path.name).read_bytes() == path.read_bytes(), path.name
