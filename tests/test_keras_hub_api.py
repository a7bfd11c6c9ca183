"""keras-hub's PaliGemma API with keras-hub's meaning: samplers given to
`compile`, generate's token-id layout, `get_layout_map(mesh)`, the
separator. Where keras-hub's own code can run on our model (its samplers'
loops driven by our logits), it is the reference."""

import warnings

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np
import pytest
from helpers import backbone_inputs
from helpers import tiny_config
from helpers import tiny_lm
from helpers import uint8_images

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.models.generation import Sampler


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=3, scale=0.5)


def _token_inputs(lm, prompts, room):
    """The preprocessor's token ids for `prompts`, cut to the longest prompt
    plus `room` padding (keras-hub's layout: the padding is where it writes)."""
    images = list(uint8_images(np.random.default_rng(7), len(prompts)))
    features = lm.preprocessor.generate_preprocess({"images": images, "prompts": prompts})
    mask = np.asarray(features["padding_mask"]).astype(bool)
    width = int(mask.sum(1).max()) + room
    return {
        "images": np.asarray(features["images"]),
        "token_ids": np.asarray(features["token_ids"])[:, :width],
        "padding_mask": mask[:, :width],
    }


def _keras_hub_loop(lm, x, sampler, stop_token_ids):
    """keras-hub's own sampler loop (`Sampler.__call__`) over our model: its
    `next` runs our full forward on the tokens so far (prefix-LM: the
    prompt bidirectional, what was generated causal) and returns the logits
    for position `index`."""
    prompt_mask = np.asarray(x["padding_mask"]).astype(bool)
    prompt_len = prompt_mask.sum(1)
    width = prompt_mask.shape[1]

    def next_fn(tokens, cache, index):
        # Traced by keras-hub's while loop: jnp, and the functional `call`
        # (our `__call__` checks inputs with NumPy).
        beams = tokens.shape[0] // len(prompt_len)  # BeamSampler repeats each row.
        positions = jnp.arange(width)[None]
        padding = (positions < index).astype("int32")
        starts = np.repeat(prompt_len, beams)[:, None]
        response = (positions >= starts).astype("int32") * padding
        inputs = {
            "images": np.repeat(x["images"], beams, axis=0),
            "token_ids": tokens,
            "padding_mask": jnp.broadcast_to(padding, tokens.shape),
            "response_mask": response,
        }
        logits = lm.call(inputs)
        return jax.lax.dynamic_index_in_dim(logits, index - 1, 1, keepdims=False), None, cache

    start = int(prompt_len.min())
    assert (prompt_len == start).all(), "keras-hub's loop starts every row at one index"
    return np.asarray(
        sampler(
            next_fn,
            x["token_ids"],
            cache=(),
            index=start,
            mask=prompt_mask,
            stop_token_ids=stop_token_ids,
        )
    )


def _keras_hub_mask(tokens, prompt_mask, stop_token_ids):
    """keras-hub's output padding mask: True through the first new stop token."""
    new = np.isin(tokens, stop_token_ids) & ~prompt_mask
    return (np.cumsum(new, 1) - new) == 0


@pytest.mark.parametrize(
    "sampler",
    [lambda: keras_hub.samplers.GreedySampler(), lambda: "greedy"],
    ids=["object", "name"],
)
def test_compiled_greedy_gives_keras_hubs_own_loop(lm, sampler):
    x = _token_inputs(lm, ["caption en", "caption en"], room=0)
    same = _token_inputs(lm, ["caption en", "detect cat"], room=6)
    lm.compile(sampler=sampler())
    want = _keras_hub_loop(lm, same, keras_hub.samplers.GreedySampler(), [1])
    got = lm.generate(same)
    mask = _keras_hub_mask(want, same["padding_mask"], [1])
    np.testing.assert_array_equal(got["padding_mask"], mask)
    np.testing.assert_array_equal(got["token_ids"][mask], want[mask])
    assert got["token_ids"].shape == same["token_ids"].shape
    np.testing.assert_array_equal(got["images"], same["images"])
    with pytest.raises(ValueError, match="no room to generate"):
        lm.generate(x)


def test_compiled_beam_sampler_gives_keras_hubs_beam_search(lm):
    x = _token_inputs(lm, ["caption en", "segment cat"], room=7)
    sampler = keras_hub.samplers.BeamSampler(num_beams=3)
    want = _keras_hub_loop(lm, x, sampler, [1])
    lm.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=3))
    got = lm.generate(x)
    mask = _keras_hub_mask(want, x["padding_mask"], [1])
    np.testing.assert_array_equal(got["padding_mask"], mask)
    np.testing.assert_array_equal(got["token_ids"][mask], want[mask])
    # big_vision's beam search (generate's beam_size) is another algorithm,
    # and still the default there.
    ours = lm.generate(x, beam_size=3)
    assert ours["token_ids"].shape == got["token_ids"].shape
    with pytest.raises(ValueError, match="return_all_beams"):
        lm.compile(sampler=keras_hub.samplers.BeamSampler(return_all_beams=True))


def _draws(sample, count=3000):
    return np.array([int(sample(i)) for i in range(count)])


def test_top_p_with_k_samples_as_keras_hubs_top_p_sampler():
    # Probabilities .3, .25, .2, .1, then a tail: with p=0.6 and k=4
    # keras-hub's TopPSampler sums the full softmax's probabilities (keeps
    # 3 tokens); transformers renormalises over the top 4 first (keeps 2).
    probabilities = np.array([0.3, 0.25, 0.2, 0.1] + [0.15 / 12] * 12, "float32")
    logits = np.log(probabilities)[None]
    reference = keras_hub.samplers.TopPSampler(p=0.6, k=4, seed=1)
    want = _draws(lambda i: reference.get_next_token(keras.ops.softmax(logits))[0])
    ours = Sampler(1.0, top_k=4, top_p=0.6, top_p_scope="vocabulary")
    got = _draws(lambda i: ours(logits, jax.random.key(i))[0])
    assert set(want) == set(got) == {0, 1, 2}
    for token in range(3):  # Frequencies agree within sampling noise (sd ~0.009).
        assert abs((want == token).mean() - (got == token).mean()) < 0.05, token
    renormalised = Sampler(1.0, top_k=4, top_p=0.6)
    assert set(_draws(lambda i: renormalised(logits, jax.random.key(i))[0], 500)) == {0, 1}


def test_compiled_samplers_map_onto_ours_and_seedless_ones_vary(lm):
    x = {
        "images": list(uint8_images(np.random.default_rng(21), 2)),
        "prompts": ["caption en", "detect cat"],
    }
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=1, seed=5))
    top_1 = lm.generate(x, max_new_tokens=6)
    assert top_1 == lm.generate(x, max_new_tokens=6, temperature=0)  # k=1 is greedy.
    lm.compile(sampler=keras_hub.samplers.RandomSampler(seed=5, temperature=3.0))
    seeded = lm.generate(x, max_new_tokens=12)
    assert seeded == lm.generate(x, max_new_tokens=12)  # A seed reproduces.
    assert seeded == lm.generate(x, max_new_tokens=12, temperature=3.0, seed=5)
    lm.compile(sampler=keras_hub.samplers.RandomSampler(temperature=3.0))
    draws = {tuple(lm.generate(x, max_new_tokens=12)) for _ in range(3)}
    assert len(draws) > 1  # keras-hub's seed=None: fresh randomness per call.
    # generate's own arguments take precedence over the compiled sampler.
    assert lm.generate(x, max_new_tokens=6, temperature=0) == top_1
    for bad in ("contrastive", "nucleus"):
        with pytest.raises(ValueError, match="not supported|Unknown sampler"):
            lm.compile(sampler=bad)
    lm.compile()


def test_load_model_restores_the_compiled_sampler_and_loss_settings(tmp_path):
    lm = tiny_lm(seed=1)
    lm.compile(
        sampler=keras_hub.samplers.TopKSampler(k=3, seed=2, temperature=0.5),
        loss_normalization="per_token",
        label_smoothing=0.1,
    )
    path = tmp_path / "task.keras"
    lm.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = keras.saving.load_model(path)
    assert not [w for w in caught if "compile()" in str(w.message)]
    assert restored.compiled
    assert isinstance(restored.sampler, keras_hub.samplers.TopKSampler)
    assert restored.sampler.get_config() == lm.sampler.get_config()
    assert restored.loss.normalization == "per_token"
    assert restored.loss.label_smoothing == pytest.approx(0.1)
    assert restored.optimizer.get_config()["global_clipnorm"] == 1.0
    x = {
        "images": list(uint8_images(np.random.default_rng(22), 2)),
        "prompts": ["caption en", "detect cat"],
    }
    assert restored.generate(x, max_new_tokens=6) == lm.generate(x, max_new_tokens=6)


def test_token_ids_layout_and_the_new_tokens_form(lm):
    lm.compile()
    x = _token_inputs(lm, ["caption en", "answer en what colour"], room=5)
    lengths = x["padding_mask"].sum(1)
    laid_out = lm.generate(x, stop_token_ids=None)
    new = lm.generate(x, stop_token_ids=None, strip_prompt=True, max_new_tokens=9)
    width = x["token_ids"].shape[1]
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(laid_out["token_ids"][row, :n], x["token_ids"][row, :n])
        # The completion after each row's own prompt, cut at the input width.
        np.testing.assert_array_equal(
            laid_out["token_ids"][row, n:], new["token_ids"][row, : width - n]
        )
    assert laid_out["padding_mask"].all() and new["token_ids"].shape == (2, 9)
    longer = lm.generate(x, stop_token_ids=None, max_length=width + 3)
    assert longer["token_ids"].shape == (2, width + 3)
    # keras-hub's max_length: each row's prompt + completion fills it, so the
    # shorter prompt gets more new tokens; the new-tokens form says as much.
    np.testing.assert_array_equal(longer["padding_mask"].sum(1), [width + 3] * 2)
    budget = lm.generate(x, stop_token_ids=None, max_length=width + 3, strip_prompt=True)
    np.testing.assert_array_equal(budget["padding_mask"].sum(1), width + 3 - lengths)
    assert not budget["token_ids"][~budget["padding_mask"]].any()


def test_text_with_strip_prompt_false_is_prompt_then_reply(lm):
    x = {
        "images": list(uint8_images(np.random.default_rng(23), 2)),
        "prompts": ["caption en", "detect cat\n"],
    }
    replies = lm.generate(x, max_new_tokens=5)
    full = lm.generate(x, max_new_tokens=5, strip_prompt=False)
    assert full == ["caption en\n" + replies[0], "detect cat\n" + replies[1]]


def test_token_ids_without_the_separator_warn_or_get_it(lm):
    x = _token_inputs(lm, ["caption en", "detect cat"], room=4)
    stripped = {**x, "padding_mask": x["padding_mask"].copy()}
    last = x["padding_mask"].sum(1) - 1
    stripped["padding_mask"][1, last[1]] = False  # Row 1 loses its "\n".
    stripped["token_ids"] = x["token_ids"].copy()
    stripped["token_ids"][1, last[1]] = 0
    with pytest.warns(UserWarning, match=r"1 of 2 prompt rows \(e.g. \[1\]\) do not end"):
        lm.generate(stripped, strip_prompt=True, max_new_tokens=4)
    fixed = lm.generate(stripped, strip_prompt=True, max_new_tokens=4, add_separator=True)
    want = lm.generate(x, strip_prompt=True, max_new_tokens=4)
    np.testing.assert_array_equal(fixed["token_ids"], want["token_ids"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate(x, strip_prompt=True, max_new_tokens=2)
    bare = PaliGemma2CausalLM(lm.backbone)  # No tokenizer: the id is unknown.
    with pytest.raises(ValueError, match="separator's id is unknown"):
        bare.generate(stripped, max_new_tokens=2, add_separator=True)


def test_get_layout_map_without_config_as_keras_hub():
    config = tiny_config(vit_num_layers=1, vocabulary_size=60)
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("data", "tensor"), devices)
    listed = PaliGemma2Backbone.get_layout_map(mesh, "tensor", "data", config=config, fsdp=True)
    decided = PaliGemma2Backbone.get_layout_map(
        mesh, model_parallel_dim_name="tensor", data_parallel_dim_name="data", fsdp=True
    )
    distribution = keras.distribution.ModelParallel(layout_map=decided, batch_dim_name="data")
    with distribution.scope():
        backbone = PaliGemma2Backbone(**config)
    sharded = 0
    for variable in backbone.weights:
        want = listed[variable.path]
        spec = tuple(variable.value.sharding.spec)
        axes = tuple(want.axes) if want is not None else (None,) * len(variable.shape)
        assert spec + (None,) * (len(axes) - len(spec)) == axes, variable.path
        sharded += any(axes)
    assert sharded > 10
    with pytest.raises(ValueError, match="pass the backbone config as config="):
        PaliGemma2Backbone.get_layout_map(mesh, "pg2_3b_224")
    with pytest.raises(ValueError, match="expected 'model' and 'batch'"):
        PaliGemma2Backbone.get_layout_map(mesh)


def test_backbone_enable_lora_adapts_what_keras_hubs_does():
    ours = tiny_lm(seed=2, words=None).backbone
    theirs = tiny_lm(seed=2, words=None).backbone
    ours.enable_lora(4)
    # keras-hub's own method, with its PaliGemma backbone's default names
    # (the base class's plus its ViT's "query_proj" / "value_proj").
    names = keras_hub.models.Backbone.default_lora_layer_names(theirs)
    names += ["query_proj", "value_proj"]
    keras_hub.models.Backbone.enable_lora(theirs, 4, target_layer_names=names)
    trainable = sorted(v.path for v in ours.trainable_weights)
    assert trainable == sorted(v.path for v in theirs.trainable_weights)
    # A and B of query and value in 2 decoder + 2 ViT blocks, and the ViT biases.
    assert len(trainable) == 2 * 8 + 4
    assert {v.path.rsplit("/", 2)[-2] for v in ours.trainable_weights} == {"query", "value"}
    x = backbone_inputs(np.random.default_rng(24), vocabulary_size=64)
    for backbone in (ours, theirs):  # Same adapters, same (zero-initialised B) output.
        for layer in backbone._flatten_layers():
            if getattr(layer, "lora_enabled", False):
                layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.01, "float32"))
                layer.lora_kernel_a.assign(np.full(layer.lora_kernel_a.shape, 0.02, "float32"))
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))
    with pytest.raises(ValueError, match="No projection layer is named"):
        tiny_lm(seed=2, words=None).backbone.enable_lora(2, target_layer_names=["query_proj"])


def test_score_takes_keras_hubs_signature(lm):
    x = backbone_inputs(
        np.random.default_rng(25), vocabulary_size=lm.backbone.vocabulary_size, length=6
    )
    ids, mask = x["token_ids"], x["padding_mask"].copy()
    mask[1, 4:] = 0
    logits = lm.score(ids, padding_mask=mask, images=x["images"])
    want = lm({**x, "padding_mask": mask, "response_mask": mask})  # Causal text.
    np.testing.assert_array_equal(logits, np.asarray(want))
    targets = np.roll(ids, -1, axis=1)
    loss = lm.score(
        ids, padding_mask=mask, images=x["images"], scoring_mode="loss", target_ids=targets
    )
    # The reference: keras-hub's own loss, Keras' unreduced cross-entropy.
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    want = np.asarray(cross_entropy(targets, np.asarray(logits))) * mask
    # log-softmax in float32 two ways (NumPy here, Keras there) over 64-ish
    # logits of size ~10: a few roundings of the largest logit.
    np.testing.assert_allclose(loss, want, atol=16 * 2.0**-24 * np.abs(logits).max())
    assert (loss[1, 4:] == 0).all()
    with pytest.raises(ValueError, match="layer_intercept_fn is not supported"):
        lm.score(ids, images=x["images"], layer_intercept_fn=lambda i, h: h)
    with pytest.raises(ValueError, match="pass images="):
        lm.score(ids)
