"""HF transformers checkpoints give HF's own logits (hf_tiny fixture)."""

import json
import shutil

import numpy as np
import pytest
from helpers import assert_close
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from keras_paligemma2 import CheckpointError
from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.checkpoints import hf

NUM_IMAGE_TOKENS = 9
# The fixture's vocabulary is 1030 with the `<image>` placeholder at 1029;
# as with the real 257,152-token vocabulary, the model keeps the rows below
# the placeholder, so logits are compared over those 1029 columns.
VOCABULARY = 1029


@pytest.fixture
def hf_dir(fixtures_dir):
    return fixtures_dir / "hf_tiny"


@pytest.fixture
def reference(hf_dir):
    return np.load(hf_dir / "reference_outputs.npz")


def _inputs(reference, name):
    ids = reference[f"{name}_input_ids"][:, NUM_IMAGE_TOKENS:]
    return {
        "images": reference["pixel_values"].transpose(0, 2, 3, 1),
        "token_ids": ids,
        "padding_mask": np.ones_like(ids),
        "response_mask": reference[f"{name}_token_type_ids"][:, NUM_IMAGE_TOKENS:],
    }


def _want(reference, name):
    return reference[f"{name}_logits"][:, NUM_IMAGE_TOKENS:, :VOCABULARY]


@pytest.fixture
def hf_lm(hf_dir):
    return PaliGemma2CausalLM.from_preset(hf_dir)


def test_config_follows_hf_semantics(hf_lm):
    config = hf_lm.backbone.get_config()
    assert config["final_logit_soft_cap"] == 30.0
    assert config["sliding_window_size"] == 20
    assert config["query_pre_attn_scalar"] == 12
    assert config["vocabulary_size"] == VOCABULARY


@pytest.mark.parametrize("name", ["short", "long"])
def test_logits_match_hf(hf_lm, reference, name):
    logits = np.asarray(hf_lm(_inputs(reference, name)))
    # hf_tiny (2-layer ViT + 2-layer Gemma 2), float32 in torch and in XLA:
    # sums in other orders (measured 7 ulps of the largest logit, ~16).
    assert_close(logits, _want(reference, name), ulps=48)


def test_long_sequence_needs_the_window(hf_dir, reference):
    # Without HF's sliding window, the 24-token sequence differs: the window
    # path above is really exercised.
    lm = PaliGemma2CausalLM.from_preset(hf_dir, sliding_window_size=None)
    long_logits = np.asarray(lm(_inputs(reference, "long")))
    assert np.abs(long_logits - _want(reference, "long")).max() > 1e-3
    short_logits = np.asarray(lm(_inputs(reference, "short")))
    assert_close(short_logits, _want(reference, "short"), ulps=48)  # As test_logits_match_hf.


def _respell(hf_dir, tmp_path, rename, extra=None, drop=()):
    target = tmp_path / "respelled"
    target.mkdir()
    shutil.copy(hf_dir / "config.json", target / "config.json")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors = {rename(k): v for k, v in tensors.items() if k not in drop}
    tensors.update(extra or {})
    # Split in two shards, as the Hub's larger checkpoints are.
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, target / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[1::2]}, target / "model-00002-of-00002.safetensors")
    return target


def _transformers_4_5x(name):
    for old, new in (
        ("vision_tower.vision_model.", "model.vision_tower.vision_model."),
        ("language_model.model.", "model.language_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _no_vision_model(name):
    return name.replace("vision_tower.vision_model.", "vision_tower.")


@pytest.mark.parametrize("rename", [_transformers_4_5x, _no_vision_model])
def test_every_key_spelling_loads(hf_dir, reference, tmp_path, rename):
    tensors = load_file(hf_dir / "model.safetensors")
    embedding_name = rename("language_model.model.embed_tokens.weight")
    padded = np.concatenate(
        [tensors["language_model.model.embed_tokens.weight"], np.ones((64, 48), np.float32)]
    )
    path = _respell(
        hf_dir,
        tmp_path,
        rename,
        extra={embedding_name: padded, "lm_head.weight": padded},
    )
    lm = PaliGemma2CausalLM.from_preset(path)
    logits = np.asarray(lm(_inputs(reference, "short")))
    assert_close(logits, _want(reference, "short"), ulps=48)  # As test_logits_match_hf.


def test_missing_and_unknown_tensors_are_named(hf_dir, tmp_path):
    path = _respell(
        hf_dir,
        tmp_path,
        lambda k: k,
        extra={"language_model.model.layers.0.self_attn.q_norm.weight": np.zeros(12, np.float32)},
        drop=["language_model.model.layers.1.mlp.up_proj.weight"],
    )
    with pytest.raises(CheckpointError) as error:
        PaliGemma2Backbone.from_preset(path)
    message = str(error.value)
    assert "text.layers.1.mlp.up_proj.weight" in message
    assert "text.layers.0.self_attn.q_norm.weight" in message


def test_directory_without_weights(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        PaliGemma2Backbone.from_preset(tmp_path)


def test_corrupt_safetensors(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        PaliGemma2Backbone.from_preset(tmp_path)


def test_non_gemma2_language_model_is_refused(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(hf_dir / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="only PaliGemma 2"):
        PaliGemma2Backbone.from_preset(tmp_path)


def test_unknown_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="neither an HF transformers"):
        PaliGemma2Backbone.from_preset(tmp_path)


# hf_window: transformers 5.24 with the image + prefix block (16 tokens)
# longer than the sliding window (8), as every 896 px checkpoint (4,096 image
# tokens against a 4,096 window). Made by tests/fixtures/gen/hf_past_window.py.


@pytest.fixture(scope="module")
def window_reference():
    from conftest import FIXTURES

    return np.load(FIXTURES / "hf_window" / "reference.npz")


@pytest.fixture(scope="module")
def window_lm():
    from conftest import FIXTURES

    return PaliGemma2CausalLM.from_preset(FIXTURES / "hf_window")


def test_masks_past_the_window_equal_hf(window_reference):
    from keras_paligemma2.layers.attention import make_attention_mask

    ref = window_reference
    valid = ref["attention_mask"]
    # HF's blocks: image + prefix (token type 0) one bidirectional block,
    # each suffix token its own causal block.
    blocks = np.cumsum(ref["token_type_ids"], axis=1) * valid
    for window, name in ((8, "mask_sliding"), (None, "mask_full")):
        mask = np.asarray(make_attention_mask(valid, blocks, sliding_window=window))
        real = valid.astype(bool)[:, :, None] & valid.astype(bool)[:, None, :]
        # Rows of padded queries are never read; compare real query rows.
        np.testing.assert_array_equal(mask[real], ref[name][real])


def test_logits_past_the_window_equal_hf(window_lm, window_reference):
    ref = window_reference
    ids = ref["input_ids"][:, NUM_IMAGE_TOKENS:]
    valid = ref["attention_mask"][:, NUM_IMAGE_TOKENS:]
    logits = np.asarray(
        window_lm(
            {
                "images": ref["pixel_values"].transpose(0, 2, 3, 1),
                "token_ids": ids,
                "padding_mask": valid,
                "response_mask": ref["token_type_ids"][:, NUM_IMAGE_TOKENS:],
            }
        )
    )
    want = ref["logits"][:, NUM_IMAGE_TOKENS:, :VOCABULARY]
    real = valid.astype(bool)
    # As test_logits_match_hf, logits up to ~25 (soft-capped) past the window:
    # measured 33 ulps; 64 is what the old 1e-4 allowed.
    assert_close(logits[real], want[real], ulps=64)


@pytest.mark.parametrize("name", ["gen", "gen2"])
def test_generation_past_the_window_equals_hf(window_lm, window_reference, name):
    ref = window_reference
    prompts = ref[f"{name}_prompt_ids"]
    attention = ref[f"{name}_attention_mask"].astype(bool)
    # HF left-pads; ours takes left-aligned prompts (ones then zeros).
    rows = [p[a][NUM_IMAGE_TOKENS:] for p, a in zip(prompts, attention)]
    width = max(len(r) for r in rows)
    token_ids = np.zeros((len(rows), width), "int32")
    padding_mask = np.zeros((len(rows), width), "int32")
    for i, r in enumerate(rows):
        token_ids[i, : len(r)], padding_mask[i, : len(r)] = r, 1
    images = ref["pixel_values"][: len(rows)].transpose(0, 2, 3, 1)
    out = window_lm.generate(
        {"images": images, "token_ids": token_ids, "padding_mask": padding_mask},
        max_new_tokens=10,
        stop_token_ids=None,
        return_logits=True,
        strip_prompt=True,
    )
    np.testing.assert_array_equal(out["token_ids"], ref[f"{name}_output_ids"])
    # HF's `output_logits` (soft-capped, every step; prefill then decode
    # steps whose sliding layers see only the last 8 positions).
    want = ref[f"{name}_step_logits"][..., :VOCABULARY]
    # float32 on both sides, two programs (torch, XLA) summing in different
    # orders, through 10 decode steps whose caches carry the differences on
    # (measured 72 ulps of the largest logit, ~28).
    assert_close(out["logits"], want, ulps=320)


@pytest.mark.parametrize("case", ["bare", "sparse_3b"])
def test_fields_a_config_leaves_out_take_transformers_defaults(fixtures_dir, case):
    """transformers' config classes fill what a config.json omits (files
    written as a diff against them omit exactly those fields): head_dim 256,
    both soft-caps, the window... (resolved by transformers itself)."""
    directory = fixtures_dir / "hf_config_defaults"
    raw = json.loads((directory / case / "config.json").read_text())
    want = json.loads((directory / "resolved.json").read_text())[case]
    text, vision = want["text"], want["vision"]
    assert hf.infer_config(raw, case) == dict(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        vit_hidden_dim=vision["hidden_size"],
        vit_num_layers=vision["num_hidden_layers"],
        vit_num_heads=vision["num_attention_heads"],
        vit_intermediate_dim=vision["intermediate_size"],
        vit_layer_norm_epsilon=vision["layer_norm_eps"],
        num_layers=text["num_hidden_layers"],
        hidden_dim=text["hidden_size"],
        num_query_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"],
        head_dim=text["head_dim"],
        intermediate_dim=text["intermediate_size"],
        query_pre_attn_scalar=text["query_pre_attn_scalar"],
        attention_logit_soft_cap=text["attn_logit_softcapping"],
        final_logit_soft_cap=text["final_logit_softcapping"],
        sliding_window_size=text["sliding_window"],
        layer_norm_epsilon=text["rms_norm_eps"],
        rope_max_wavelength=want["rope_theta"],
        # The logits cover the vocabulary below the <image> placeholder.
        vocabulary_size=min(text["vocab_size"], want["image_token_index"]),
    )
