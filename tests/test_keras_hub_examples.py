"""keras-hub's own documented PaliGemma examples, run on keras-hub's classes
and on ours with only the class and preset names changed.

The examples are those of keras-hub 0.32's `PaliGemmaCausalLM` and
`PaliGemmaBackbone` docstrings and the usage of keras-hub's LoRA
fine-tuning guide (`backbone.enable_lora(rank=4)`, `preprocessor.
sequence_length`, AdamW without decay on biases and scales, Keras' sparse
cross-entropy and accuracy, `fit` on images / prompts / responses). Both
models load one keras-hub task preset (a tiny PaliGemma 2 with random
weights and a tiny SentencePiece vocabulary) standing for
"pali_gemma_3b_mix_224", and images are the preset's size (28 px) instead of
224. keras-hub's output is the reference; where ours differs on purpose,
the test pins the difference the README's "Coming from keras-hub" table
states.
"""

import keras
import keras_hub
import numpy as np
import pytest
from helpers import KERAS_HUB_TINY
from helpers import assert_close
from helpers import randomize
from helpers import tokenizer_proto

from keras_paligemma2 import InputError
from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2 import PaliGemma2CausalLMPreprocessor
from keras_paligemma2 import PaliGemma2Tokenizer

KH = keras_hub.models
WORDS = ("answer en where is the cow standing?", "caption en", "on the beach", "a cow")
SIZE = KERAS_HUB_TINY["image_size"]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A keras-hub `PaliGemmaCausalLM` task preset: what `from_preset` of
    keras-hub's names gives, in miniature."""
    tokenizer = KH.PaliGemmaTokenizer(proto=tokenizer_proto(WORDS))
    backbone = KH.PaliGemmaBackbone(
        **{**KERAS_HUB_TINY, "vocabulary_size": tokenizer.vocabulary_size()}
    )
    randomize(backbone, np.random.default_rng(11), scale=0.5)
    converter = keras_hub.layers.PaliGemmaImageConverter(
        image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1
    )
    preprocessor = KH.PaliGemmaCausalLMPreprocessor(tokenizer, converter, sequence_length=24)
    path = tmp_path_factory.mktemp("keras_hub") / "pali_gemma_mix"
    KH.PaliGemmaCausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(preset):
    return KH.PaliGemmaCausalLM.from_preset(preset), PaliGemma2CausalLM.from_preset(preset)


def test_generate_with_prompts(models):
    theirs, ours = models
    # keras-hub: `image = np.random.rand(224, 224, 3)`.
    image = np.random.default_rng(0).random((SIZE, SIZE, 3))
    inputs = {"images": image, "prompts": ["answer en where is the cow standing?\n"]}
    # Different on purpose: floats in [0, 1] are refused (keras-hub reads
    # them as levels 0-1 of 255, an almost black picture, without a word).
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ours.generate(inputs)
    theirs.generate(inputs)  # runs, on the near-black picture

    levels = np.round(image * 255)  # a real picture's [0, 255] levels
    length = theirs.preprocessor.sequence_length
    for prompts, images in (
        (["answer en where is the cow standing?\n"], levels),
        (["answer en where is the cow standing?\n", "caption en\n"], [levels, levels[::-1]]),
    ):
        x = {"images": images, "prompts": prompts}
        want = theirs.generate(x)
        # Same: prompt + reply, with strip_prompt=False and keras-hub's
        # default length (its preprocessor's sequence_length; ours 64 new
        # tokens by default). The prompt's "\n" is the separator, not doubled.
        assert ours.generate(x, strip_prompt=False, max_length=length) == want
        # Ours by default: the reply alone (big_vision's decode output).
        replies = ours.generate(x, max_length=length)
        assert replies == [w[len(p) :] for w, p in zip(want, prompts)]


def test_generate_without_preprocessing(tmp_path):
    # keras-hub's ids are of the real 257,152-token vocabulary: a tiny model
    # with that vocabulary, saved as a keras-hub backbone preset.
    backbone = KH.PaliGemmaBackbone(**{**KERAS_HUB_TINY, "vocabulary_size": 257_152})
    randomize(backbone, np.random.default_rng(12), scale=0.5)
    backbone.save_to_preset(str(tmp_path / "pali_gemma_mix"))
    bare_theirs = KH.PaliGemmaCausalLM(backbone=backbone, preprocessor=None)
    bare_ours = PaliGemma2CausalLM.from_preset(tmp_path / "pali_gemma_mix", preprocessor=None)

    image = np.random.default_rng(1).random((SIZE, SIZE, 3))
    inputs = {
        "images": [image, image],
        # Token ids for "<bos> Keras is".
        "token_ids": np.array([[2, 214064, 603, 0, 0, 0, 0]] * 2),
        # Use `"padding_mask"` to indicate values that should not be overridden.
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0]] * 2),
    }
    # keras-hub's documented call fails in keras-hub itself: its default
    # stop_token_ids="auto" needs a preprocessor, and its backbone takes no
    # list of images. Ours takes both: it stops at PaliGemma's `<eos>` (id 1).
    with pytest.raises(ValueError, match="preprocessor"):
        bare_theirs.generate(inputs)
    with pytest.raises(AttributeError):
        bare_theirs.generate(inputs, stop_token_ids=[1])
    stacked = {**inputs, "images": np.stack(inputs["images"])}
    want = bare_theirs.generate(stacked, stop_token_ids=[1])
    # The ids carry no "\n" separator (as keras-hub's docs write them): ours
    # warns, and otherwise answers as keras-hub, in keras-hub's layout
    # (prompt then completion at the input's width, with its mask). Without
    # a preprocessor the backbone takes [-1, 1] images, as keras-hub's.
    with pytest.warns(UserWarning, match="separator"):
        got = bare_ours.generate(inputs)
    np.testing.assert_array_equal(got["token_ids"], np.asarray(want["token_ids"]))
    np.testing.assert_array_equal(got["padding_mask"], np.asarray(want["padding_mask"]))
    # With the separator added, the answer is the one the model was trained for.
    fixed = bare_ours.generate(inputs, add_separator=True, strip_prompt=True, max_new_tokens=3)
    assert fixed["token_ids"].shape == (2, 3)


def test_custom_backbone_and_vocabulary(tmp_path):
    proto = tmp_path / "proto.spm"
    proto.write_bytes(tokenizer_proto(WORDS))
    # keras-hub: `PaliGemmaTokenizer(proto="proto.spm")`, a preprocessor at
    # `sequence_length=128`, `PaliGemmaBackbone()` and the task. keras-hub's
    # `PaliGemmaBackbone()` without arguments raises in keras-hub too (they
    # are required); both get the same tiny architecture here.
    with pytest.raises(TypeError):
        KH.PaliGemmaBackbone()
    theirs = KH.PaliGemmaCausalLM(
        backbone=KH.PaliGemmaBackbone(**KERAS_HUB_TINY),
        preprocessor=KH.PaliGemmaCausalLMPreprocessor(
            tokenizer=KH.PaliGemmaTokenizer(proto=str(proto)), sequence_length=128
        ),
    )
    tokenizer = PaliGemma2Tokenizer(proto=str(proto))
    preprocessor = PaliGemma2CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=128)
    # Different: our constructor's names are ours (`patch_size`, and the
    # GeGLU width counted once); keras-hub's configs convert by
    # `from_preset` of their preset.
    config = keras_hub_config_as_ours(KERAS_HUB_TINY)
    ours = PaliGemma2CausalLM(backbone=PaliGemma2Backbone(**config), preprocessor=preprocessor)
    assert ours.backbone.count_params() == theirs.backbone.count_params()
    sample = {"prompts": ["caption en\n"], "responses": ["a cow"]}
    np.testing.assert_array_equal(
        tokenizer(sample["responses"][0]),
        theirs.preprocessor.tokenizer(sample["responses"][0]),
    )


def keras_hub_config_as_ours(config):
    """keras-hub's constructor arguments of `KERAS_HUB_TINY` in ours."""
    return dict(
        image_size=config["image_size"],
        patch_size=config["vit_patch_size"],
        vit_hidden_dim=config["vit_hidden_dim"],
        vit_num_layers=config["vit_num_layers"],
        vit_num_heads=config["vit_num_heads"],
        vit_intermediate_dim=config["vit_intermediate_dim"],
        vocabulary_size=config["vocabulary_size"],
        num_layers=config["num_layers"],
        hidden_dim=config["hidden_dim"],
        num_query_heads=config["num_query_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        intermediate_dim=config["intermediate_dim"] // 2,
        attention_logit_soft_cap=config["attention_logit_soft_cap"],
        final_logit_soft_cap=config["final_logit_soft_cap"],
    )


def test_backbone_example(preset):
    theirs = KH.PaliGemmaBackbone.from_preset(preset)
    ours = PaliGemma2Backbone.from_preset(preset)
    rng = np.random.default_rng(2)
    input_data = {
        "token_ids": np.ones(shape=(1, 12), dtype="int32"),
        "images": rng.uniform(size=(1, SIZE, SIZE, 3)),
        "padding_mask": np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]),
    }
    # keras-hub's documented input has no `response_mask`, which its own
    # backbone requires: both refuse it; ours names the missing key.
    with pytest.raises(ValueError):
        theirs(input_data)
    with pytest.raises(InputError, match="response_mask"):
        ours(input_data)
    full = {**input_data, "response_mask": np.zeros((1, 12), "int32")}
    want, got = np.asarray(theirs(full)), np.asarray(ours(full))
    real = np.concatenate([np.ones((1, ours.num_image_tokens)), full["padding_mask"]], 1) > 0
    # Two float32 programs of 2 + 2 layers (as tests/checkpoints/test_keras_hub.py).
    assert_close(got[real[0][None]], want[real[0][None]], ulps=48)


def test_lora_fine_tuning_guide(preset):
    rng = np.random.default_rng(3)
    images = [np.round(rng.random((SIZE, SIZE, 3)) * 255) for _ in range(2)]
    data = {
        "images": images,
        "prompts": ["caption en\n", "answer en where is the cow standing?\n"],
        "responses": ["a cow", "on the beach"],
    }
    results = []
    for cls in (KH.PaliGemmaCausalLM, PaliGemma2CausalLM):
        lm = cls.from_preset(preset)
        lm.backbone.enable_lora(rank=4)
        lm.preprocessor.sequence_length = 20
        optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
        optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
        lm.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=optimizer,
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
        )
        before = lm.evaluate(x=data, batch_size=2, verbose=0, return_dict=True)
        history = lm.fit(x=data, epochs=1, batch_size=1, verbose=0)
        trainable = sorted((v.path, tuple(v.shape)) for v in lm.backbone.trainable_variables)
        results.append((before, history.history["loss"], trainable))
    (theirs_before, theirs_loss, theirs_trainable), (ours_before, ours_loss, ours_trainable) = (
        results
    )

    # Same adapted layers: decoder and ViT query / value, rank 4, the ViT
    # ones with their biases trainable. Different on purpose: our ViT
    # projections are per-head `EinsumDense` (as both decoders are), so
    # their adapters are A (width, heads, rank) and B (rank, head_dim) where
    # keras-hub's `Dense` ones are (width, rank) and (rank, width).
    def split(trainable):
        decoder = [t for t in trainable if t[0].startswith("decoder_block")]
        vit = sorted("/".join(p.split("/")[-2:]).replace("_proj", "") for p, _ in trainable)
        return decoder, [name for name in vit if not name.startswith("decoder")]

    assert len(ours_trainable) == len(theirs_trainable)
    assert split(ours_trainable)[0] == split(theirs_trainable)[0]
    assert sorted(split(ours_trainable)[1]) == sorted(split(theirs_trainable)[1])
    # Same loss and accuracy before training, and the same loss of the
    # first LoRA epoch: keras-hub's labels, weights and loss meaning.
    for key in ("loss", "sparse_categorical_accuracy"):
        np.testing.assert_allclose(ours_before[key], theirs_before[key], rtol=1e-4)
    np.testing.assert_allclose(ours_loss, theirs_loss, rtol=1e-4)
