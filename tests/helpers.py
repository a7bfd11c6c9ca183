"""What the tests share: tiny models, tokenizers and inputs, randomisation, and
`run_layer_test` (keras-hub's idea: config round trip, serialisation, dtype
policies, variable input lengths, for every layer).

Every helper that draws takes its generator (or seed) as an argument: tests
seed their own inputs (conftest reseeds a module's `rng` from each test's
id), so nothing depends on which tests ran before.
"""

import functools

import keras
import numpy as np

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2 import PaliGemma2CausalLMPreprocessor
from keras_paligemma2 import PaliGemma2ImageConverter
from keras_paligemma2 import PaliGemma2Tokenizer
from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece

# A backbone small enough to build and compile in a second: 28 px images of
# 2x2 patches of 14 px, a 2-layer ViT and a 2-layer Gemma 2 with grouped
# queries (4 query heads sharing 2 key/value heads).
TINY_CONFIG = dict(
    image_size=28,
    patch_size=14,
    vit_hidden_dim=16,
    vit_num_layers=2,
    vit_num_heads=2,
    vit_intermediate_dim=32,
    vocabulary_size=64,
    num_layers=2,
    hidden_dim=32,
    num_query_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_dim=48,
)
# The same architecture as keras-hub's constructor spells it (PaliGemma 2:
# post-norms, soft caps), for tests that build keras-hub's own model.
KERAS_HUB_TINY = dict(
    vocabulary_size=64,
    image_size=28,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=32,
    intermediate_dim=96,  # keras-hub counts both GeGLU halves: ours is 48.
    head_dim=8,
    vit_patch_size=14,
    vit_num_heads=2,
    vit_hidden_dim=16,
    vit_num_layers=2,
    vit_intermediate_dim=24,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    query_head_dim_normalize=True,
)
# Words the tiny tokenizers know (with PaliGemma's `<loc>` / `<seg>` tokens,
# which `train_tiny_sentencepiece` always adds).
WORDS = (
    "caption en",
    "answer en what colour",
    "how many",
    "detect",
    "segment",
    "a red circle",
    "a blue square",
    "green",
    "one",
    "two",
    "cat",
)

# Unit roundoff of each float dtype: tolerances are stated as a multiple of
# it times the size of the values compared (`assert_close`).
EPS = {"float64": 2.0**-53, "float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def assert_close(got, want, *, ulps, dtype="float32", scale=None, err_msg=""):
    """Asserts `max |got - want| <= ulps * EPS[dtype] * max(max |want|, 1)`.

    The one rule for comparing computed floats in these tests: the bound is a
    count of roundoff units of the compute dtype (`EPS[dtype]`) times the
    magnitude of the reference (its largest |value|, at least 1: a sum's
    rounding is relative to its largest terms). The count, `ulps`, is chosen
    at each call site and a comment there says why: how many roundings the
    computation chain has (the depth of the network, the length of its
    reductions), and whether the reference is float64 (only our side rounds)
    or another float32 program (both sides round, in different orders).
    `ulps=0` asks for bit-equal results, where the arithmetic is exact.

    A scalar `want` is compared with every element of `got`; otherwise the
    shapes must be equal. The failure message gives the worst error, where it
    is, the bound, and the error in units of `EPS[dtype] * scale`, so a reader
    sees how far past (or how close to) the bound it went.

    Args:
        got: array-like, the computed values.
        want: array-like, the reference values.
        ulps: number of roundoff units allowed (see above).
        dtype: the compute dtype whose unit roundoff counts: a key of `EPS`.
        scale: None for the rule above; or an array (broadcast to `got`) of
            the magnitude each element's roundoff is relative to, where each
            element is rounded on its own (parameters after optimizer steps).
        err_msg: what is compared (a variable path, a step), for the message.
    """
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    if want.ndim and got.shape != want.shape:
        raise AssertionError(f"{err_msg}: shapes differ, got {got.shape}, want {want.shape}")
    if scale is None:
        scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
    scale = np.broadcast_to(np.asarray(scale, np.float64), got.shape)
    unit = EPS[dtype] * scale
    error = np.abs(got - want)
    excess = np.where(np.isnan(error), np.inf, error - ulps * unit)  # NaN fails too.
    if got.size == 0 or excess.max() <= 0:
        return
    at = np.unravel_index(np.argmax(excess), got.shape)
    raise AssertionError(
        f"{err_msg}{': ' if err_msg else ''}|got - want| = {error[at]:.3g} at {at} "
        f"(got {got[at]!r}, want {np.broadcast_to(want, got.shape)[at]!r}) > bound "
        f"{ulps * unit[at]:.3g} = {ulps} x EPS[{dtype}] x scale {scale[at]:.3g}: the error "
        f"is {error[at] / unit[at]:.3g} units of EPS[{dtype}] x scale"
    )


def tiny_config(**overrides):
    """`TINY_CONFIG` with `overrides`, a fresh dict."""
    return {**TINY_CONFIG, **overrides}


def randomize(model, rng, scale=0.2):
    """Every weight of `model` drawn from N(0, scale^2): initializers leave
    norms at zero and biases at zero, which would hide wiring mistakes."""
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * scale)
    return model


@functools.lru_cache(maxsize=None)
def tokenizer_proto(words=WORDS):
    """A tiny SentencePiece model (bytes) knowing `words`, trained once per
    set of words in a test process."""
    return train_tiny_sentencepiece(list(words) * 3 + [" ".join(words)])


def tiny_tokenizer(words=WORDS):
    """A `PaliGemma2Tokenizer` on `tokenizer_proto(words)`."""
    return PaliGemma2Tokenizer(tokenizer_proto(tuple(words)))


def tiny_backbone(seed=0, scale=0.2, **overrides):
    """A tiny backbone (`tiny_config(**overrides)`), its weights drawn from
    `seed` (N(0, scale^2)), or left as initialised when `scale` is None."""
    backbone = PaliGemma2Backbone(**tiny_config(**overrides))
    if scale is None:
        return backbone
    return randomize(backbone, np.random.default_rng(seed), scale)


def tiny_lm(seed=0, scale=0.2, words=WORDS, sequence_length=None, **overrides):
    """A tiny task (`tiny_backbone(seed, scale, **overrides)`) with a
    preprocessor: tokenizer on `words`, images at the config's size,
    `sequence_length` (None: the preprocessor's default). `words=None` gives a
    task on token ids alone (vocabulary from the config)."""
    if words is None:
        return PaliGemma2CausalLM(tiny_backbone(seed, scale, **overrides))
    tokenizer = tiny_tokenizer(words)
    overrides.setdefault("vocabulary_size", tokenizer.vocabulary_size())
    backbone = tiny_backbone(seed, scale, **overrides)
    length = {} if sequence_length is None else {"sequence_length": sequence_length}
    preprocessor = PaliGemma2CausalLMPreprocessor(
        tokenizer, PaliGemma2ImageConverter(image_size=backbone.image_size), **length
    )
    return PaliGemma2CausalLM(backbone, preprocessor)


# The small one-layer text task several tests use: what the weights are does
# not matter to them (initialised, not randomised).
SMALL_TEXT_TASK = dict(
    scale=None, vit_num_layers=1, num_layers=1, num_query_heads=2, num_key_value_heads=1
)


def bv_tiny_text_logits(lm, reference):
    """The task's logits on the inputs of big_vision's tiny reference run
    (`tests/fixtures/bv_tiny/reference_outputs.npz`, loaded as `reference`)."""
    text = reference["text"]
    return lm(
        {
            "images": reference["images"],
            "token_ids": text,
            "padding_mask": np.ones_like(text),
            "response_mask": reference["mask_ar"],
        }
    )


def backbone_inputs(rng, batch=2, length=7, image_size=28, vocabulary_size=64, response_from=None):
    """Random backbone inputs: images in [-1, 1], token ids in [1, V), every
    position real, the second half (or from `response_from`) a response."""
    response = np.zeros((batch, length), "int32")
    response[:, length // 2 if response_from is None else response_from :] = 1
    return {
        "images": rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype("float32"),
        "token_ids": rng.integers(1, vocabulary_size, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
        "response_mask": response,
    }


def uint8_images(rng, batch=2, size=28):
    """Random uint8 pictures (B, size, size, 3), as a user passes them."""
    return rng.integers(0, 256, (batch, size, size, 3)).astype("uint8")


def run_layer_test(
    layer_cls,
    init_kwargs,
    make_inputs,
    expected_output_shape,
    lengths=(5, 9),
    dtypes=("float32", "bfloat16", "mixed_bfloat16"),
    output_dtype=None,
    tolerance=8.0,
    seed=0,
):
    """Checks what every layer must do, in keras-hub's `run_layer_test` spirit:

    - the config round trip: `from_config(get_config())` has the same config,
      and with the same weights gives the same output (bit-equal, float32);
    - Keras serialisation by registered name (`serialize_keras_object` and
      back) gives the same class and config;
    - each dtype policy: variables in its variable dtype, output in its
      compute dtype (or `output_dtype`), and values within `tolerance` x the
      compute dtype's unit roundoff x max |float32 output| of the float32
      layer with the same weights (`assert_close`);
    - variable input lengths: one layer built once runs at each of
      `lengths`, its output shape following.

    Args:
        layer_cls: the layer class.
        init_kwargs: dict, its constructor arguments (without `dtype`).
        make_inputs: function `(rng, length) -> (args, kwargs)` for `call`.
        expected_output_shape: function `length -> shape` of the output (the
            first output when `call` returns several).
        lengths: input lengths to run at; the first builds the layer.
        dtypes: dtype policies to check.
        output_dtype: the output dtype whatever the policy (e.g. float32
            logits), or None for the policy's compute dtype.
        tolerance: multiple of the unit roundoff allowed (see above); the
            default allows a few roundings of values of the output's size.
        seed: seed of the weights and inputs.
    """
    rng = np.random.default_rng(seed)
    args, kwargs = make_inputs(rng, lengths[0])
    reference = layer_cls(**init_kwargs, dtype="float32")
    _first(reference(*args, **kwargs))  # builds it
    randomize(reference, rng)
    weights = [np.asarray(w) for w in reference.get_weights()]

    # Variable lengths: the same built layer at every length.
    outputs = {}
    for length in lengths:
        args_n, kwargs_n = make_inputs(np.random.default_rng(seed + length), length)
        out = _first(reference(*args_n, **kwargs_n))
        assert tuple(out.shape) == tuple(expected_output_shape(length)), (length, out.shape)
        outputs[length] = (args_n, kwargs_n, np.asarray(out, "float32"))

    # Config round trip and serialisation.
    config = reference.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    args_0, kwargs_0, want = outputs[lengths[0]]
    _first(clone(*args_0, **kwargs_0))
    clone.set_weights(weights)
    np.testing.assert_array_equal(np.asarray(_first(clone(*args_0, **kwargs_0)), "float32"), want)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(reference))
    assert type(restored) is layer_cls and restored.get_config() == config

    # Dtype policies.
    for policy_name in dtypes:
        policy = keras.dtype_policies.get(policy_name)
        layer = layer_cls(**init_kwargs, dtype=policy_name)
        _first(layer(*args_0, **kwargs_0))
        layer.set_weights(weights)
        for variable in layer.weights:
            assert variable.dtype == policy.variable_dtype, (policy_name, variable.path)
        out = _first(layer(*args_0, **kwargs_0))
        assert str(out.dtype) == (output_dtype or policy.compute_dtype), (policy_name, out.dtype)
        assert_close(out, want, ulps=tolerance, dtype=policy.compute_dtype, err_msg=policy_name)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output
