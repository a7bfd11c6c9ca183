"""Greedy decoding with the KV cache against big_vision, HF and our own full forward."""

import numpy as np
import pytest
from helpers import SMALL_TEXT_TASK
from helpers import assert_close
from helpers import randomize
from helpers import tiny_config
from helpers import tiny_lm

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2 import PaliGemma2CausalLMPreprocessor
from keras_paligemma2 import PaliGemma2ImageConverter
from keras_paligemma2 import PaliGemma2Tokenizer
from keras_paligemma2.layers.attention import attention_implementation
from keras_paligemma2.models.generation import right_align
from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_big_vision_greedy_and_first_step_logits(fixtures_dir, implementation):
    reference = np.load(fixtures_dir / "bv_tiny" / "reference_outputs.npz")
    prompt = reference["prompt"]
    mask = np.ones_like(prompt)
    # Fused Pallas attention (interpret mode here) in the ViT, the prefill
    # and every decoding step gives big_vision's tokens and logits too.
    with attention_implementation(implementation):
        lm = PaliGemma2CausalLM.from_preset(fixtures_dir / "bv_tiny" / "tiny_f32.npz")
        out = lm.generate(
            {"images": reference["images"], "token_ids": prompt, "padding_mask": mask},
            max_new_tokens=8,
            stop_token_ids=None,
            strip_prompt=True,
        )
        _, first = lm._decode_loop(reference["images"], prompt, mask, 8, [])
    np.testing.assert_array_equal(out["token_ids"], reference["greedy"])
    # bv_tiny in float32 against big_vision's run: two programs summing in
    # other orders (measured 8 ulps of the largest logit, ~17).
    assert_close(first, reference["step_logits"][:, 0], ulps=64)


def test_hf_greedy(fixtures_dir):
    reference = np.load(fixtures_dir / "hf_tiny" / "reference_outputs.npz")
    lm = PaliGemma2CausalLM.from_preset(fixtures_dir / "hf_tiny")
    ids = reference["gen_prompt_ids"][:, 9:]
    out = lm.generate(
        {
            "images": reference["pixel_values"].transpose(0, 2, 3, 1)[:1],
            "token_ids": ids,
            "padding_mask": np.ones_like(ids),
        },
        max_new_tokens=8,
        stop_token_ids=None,
        strip_prompt=True,
    )
    np.testing.assert_array_equal(out["token_ids"], reference["gen_output_ids"])


@pytest.fixture(scope="module")
def random_lm():
    rng = np.random.default_rng(7)
    backbone = PaliGemma2Backbone(
        **tiny_config(
            vit_num_layers=1, vocabulary_size=50, final_logit_soft_cap=30.0, sliding_window_size=9
        )
    )
    randomize(backbone, rng, 0.5)
    return PaliGemma2CausalLM(backbone)


def _teacher_forced_greedy(lm, image, prompt, steps):
    """Greedy by re-running the full (cache-free) forward each step."""
    tokens = list(prompt)
    generated = []
    for _ in range(steps):
        n = len(tokens)
        logits = lm(
            {
                "images": image[None],
                "token_ids": np.array([tokens]),
                "padding_mask": np.ones((1, n), "int32"),
                # The prompt is the prefix; generated tokens are causal.
                "response_mask": np.array([[0] * len(prompt) + [1] * (n - len(prompt))]),
            }
        )
        generated.append(int(np.argmax(np.asarray(logits)[0, -1])))
        tokens.append(generated[-1])
    return generated


def test_cache_matches_full_forward_past_the_window(random_lm):
    rng = np.random.default_rng(8)
    image = rng.uniform(-1, 1, (28, 28, 3)).astype("float32")
    prompt = [2, 5, 6, 7, 8]  # 4 image + 5 prompt + 6 new > window 9.
    out = random_lm.generate(
        {"images": image[None], "token_ids": np.array([prompt]), "padding_mask": np.ones((1, 5))},
        max_new_tokens=6,
        stop_token_ids=None,
        strip_prompt=True,
    )
    assert out["token_ids"][0].tolist() == _teacher_forced_greedy(random_lm, image, prompt, 6)


def test_ragged_batch_equals_each_alone(random_lm):
    rng = np.random.default_rng(9)
    images = rng.uniform(-1, 1, (3, 28, 28, 3)).astype("float32")
    prompts = [[2, 5, 6], [2, 9, 10, 11, 12, 13, 14], [2, 7]]
    token_ids = np.zeros((3, 7), "int32")
    mask = np.zeros((3, 7), "int32")
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    tokens, first = random_lm._decode_loop(images, token_ids, mask, 5, [])
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_first = random_lm._decode_loop(
            images[row : row + 1], np.array([prompt]), np.ones((1, len(prompt))), 5, []
        )
        np.testing.assert_array_equal(np.asarray(tokens)[row], np.asarray(alone_tokens)[0])
        # A row of a ragged batch and the row alone: the same model, other
        # padding and cache shapes, so other sums (measured 6.7 ulps of the
        # largest logit, ~13); 12 is what the old 1e-5 allowed.
        assert_close(np.asarray(first)[row], np.asarray(alone_first)[0], ulps=12)


def test_stop_tokens_end_rows(random_lm):
    rng = np.random.default_rng(10)
    images = rng.uniform(-1, 1, (1, 28, 28, 3)).astype("float32")
    free = random_lm.generate(
        {"images": images, "token_ids": np.array([[2, 5]]), "padding_mask": np.ones((1, 2))},
        max_new_tokens=6,
        stop_token_ids=None,
        strip_prompt=True,
    )["token_ids"][0]
    stop = int(free[2])
    first_stop = list(free).index(stop)
    out = random_lm.generate(
        {"images": images, "token_ids": np.array([[2, 5]]), "padding_mask": np.ones((1, 2))},
        max_new_tokens=6,
        stop_token_ids=[stop],
        strip_prompt=True,
    )
    assert out["token_ids"][0, : first_stop + 1].tolist() == free[: first_stop + 1].tolist()
    assert out["padding_mask"][0].tolist() == [1] * (first_stop + 1) + [0] * (5 - first_stop)
    assert (out["token_ids"][0, first_stop + 1 :] == 0).all()


def test_text_in_text_out_reuses_one_compiled_function():
    lm = tiny_lm(words=("caption en", "answer en what is it", "a cat"), **SMALL_TEXT_TASK)
    image = np.zeros((40, 40, 3), "uint8")
    text = lm.generate({"images": image, "prompts": "caption en"}, max_new_tokens=4)
    assert isinstance(text, str)
    texts = lm.generate(
        {"images": [image, image], "prompts": ["caption en", "answer en what is it"]},
        max_new_tokens=4,
    )
    assert isinstance(texts, list) and len(texts) == 2
    lm.generate(
        {"images": [image, image], "prompts": ["answer en what", "caption en"]}, max_new_tokens=4
    )
    assert len(lm._decode_loop._compiled) == 2  # (1, 16) and (2, 16) shapes only.
    scores = lm.score(
        {"images": [image, image], "prompts": ["caption en"] * 2, "responses": ["a cat", "a"]}
    )
    assert scores.shape == (2,) and (scores < 0).all()


def test_bad_generate_inputs(random_lm):
    with pytest.raises(ValueError, match="missing \\['padding_mask'\\]"):
        random_lm.generate({"images": np.zeros((1, 28, 28, 3)), "token_ids": np.array([[2]])})
    with pytest.raises(ValueError, match="leaves no room"):
        random_lm.generate(
            {
                "images": np.zeros((1, 28, 28, 3)),
                "token_ids": np.array([[2, 3]]),
                "padding_mask": np.ones((1, 2)),
            },
            max_length=2,
            strip_prompt=True,
        )
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        random_lm.generate(
            {
                "images": np.zeros((1, 28, 28, 3)),
                "token_ids": np.array([[2, 3]]),
                "padding_mask": np.ones((1, 2)),
            },
            max_new_tokens=0,
        )
    with pytest.raises(ValueError, match="not left-aligned"):
        random_lm.generate(
            {
                "images": np.zeros((1, 28, 28, 3)),
                "token_ids": np.array([[0, 2]]),
                "padding_mask": np.array([[0, 1]]),
            },
            strip_prompt=True,
        )


def test_score_is_the_log_probability_of_the_response(fixtures_dir):
    reference = np.load(fixtures_dir / "bv_tiny" / "reference_outputs.npz")
    lm = PaliGemma2CausalLM.from_preset(fixtures_dir / "bv_tiny" / "tiny_f32.npz")
    text, mask_ar = reference["text"], reference["mask_ar"]
    scores = lm.score(
        {
            "images": reference["images"],
            "token_ids": text,
            "padding_mask": np.ones_like(text),
            "response_mask": mask_ar,
        },
        per_token=True,
    )
    # big_vision's scoring logits: log-softmax, next token, response only.
    logits = reference["text_logits"].astype(np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = np.take_along_axis(log_probs[:, :-1], text[:, 1:, None], -1)[..., 0] * mask_ar[:, 1:]
    # Log-softmax of our logits (within 16 ulps of big_vision's, see
    # test_big_vision.py) against float64 of big_vision's: measured 1.3 ulps
    # of the largest score.
    assert_close(scores, want, ulps=32)
    totals = lm.score(
        {
            "images": reference["images"],
            "token_ids": text,
            "padding_mask": np.ones_like(text),
            "response_mask": mask_ar,
        }
    )
    # Sums of the scores above over a few tokens (measured 0.2 ulps).
    assert_close(totals, want.sum(1), ulps=32)
    assert (totals < 0).all()


def test_sampler_restrictions_on_known_logits():
    import jax
    import jax.numpy as jnp

    from keras_paligemma2.models.generation import Sampler

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = lambda sampler: np.array([int(sampler(logits, k)[0]) for k in keys[:400]])
    assert set(draw(Sampler(1.0, top_k=2))) <= {0, 1}
    assert set(draw(Sampler(1.0, top_p=0.7))) <= {0, 1}  # 0.5 < 0.7 <= 0.8.
    assert set(draw(Sampler(1.0, top_p=0.5))) == {0}
    counts = np.bincount(draw(Sampler(1.0)), minlength=4) / 400
    assert np.abs(counts - [0.5, 0.3, 0.15, 0.05]).max() < 0.08
    assert int(Sampler()(logits, keys[0])[0]) == 0  # Greedy.
    with pytest.raises(ValueError, match="top_p"):
        Sampler(1.0, top_p=1.5)


def test_top_k_and_top_p_sample_at_temperature_one_unless_given():
    import jax
    import jax.numpy as jnp

    from keras_paligemma2.models.generation import Sampler

    # keras-hub's TopKSampler / TopPSampler and big_vision's samplers sample
    # at temperature 1 when none is given; they never decode greedily.
    assert Sampler(top_k=2).temperature == 1.0
    assert Sampler(top_p=0.9).temperature == 1.0
    assert Sampler().greedy and not Sampler(top_k=3).greedy
    assert Sampler(0.5, top_k=3).temperature == 0.5
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(1), 400)
    drawn = np.array([int(Sampler(top_k=2)(logits, k)[0]) for k in keys])
    assert set(drawn) == {0, 1}  # Both kept tokens drawn: not greedy.
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.08  # Temperature 1.
    drawn = np.array([int(Sampler(top_p=0.9)(logits, k)[0]) for k in keys])
    assert set(drawn) == {0, 1, 2}


@pytest.mark.parametrize("restriction", [dict(top_k=4), dict(top_p=0.9)])
def test_restricted_sampling_at_temperature_zero_is_refused(restriction):
    from keras_paligemma2.models.generation import Sampler

    with pytest.raises(ValueError, match="temperature=0 decodes greedily"):
        Sampler(0.0, **restriction)


def test_top_k_must_be_a_positive_integer():
    from keras_paligemma2.models.generation import Sampler

    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            Sampler(top_k=bad)


def test_generate_with_top_k_alone_samples(random_lm):
    rng = np.random.default_rng(13)
    inputs = {
        "images": rng.uniform(-1, 1, (1, 28, 28, 3)).astype("float32"),
        "token_ids": np.array([[2, 5, 6]]),
        "padding_mask": np.array([[1, 1, 1]]),
    }
    greedy = random_lm.generate(inputs, max_new_tokens=16, stop_token_ids=None, strip_prompt=True)[
        "token_ids"
    ]
    drawn = [
        random_lm.generate(
            inputs, max_new_tokens=16, stop_token_ids=None, top_k=50, seed=s, strip_prompt=True
        )["token_ids"]
        for s in range(6)
    ]
    assert any((d != greedy).any() for d in drawn)
    at_one = random_lm.generate(
        inputs,
        max_new_tokens=16,
        stop_token_ids=None,
        top_k=50,
        temperature=1.0,
        seed=5,
        strip_prompt=True,
    )["token_ids"]
    np.testing.assert_array_equal(drawn[5], at_one)
    with pytest.raises(ValueError, match="temperature=0"):
        random_lm.generate(inputs, max_new_tokens=6, temperature=0.0, top_p=0.5)


def test_sampling_is_reproducible_and_differs_from_greedy(random_lm):
    rng = np.random.default_rng(11)
    inputs = {
        "images": rng.uniform(-1, 1, (2, 28, 28, 3)).astype("float32"),
        "token_ids": np.array([[2, 5, 6], [2, 7, 0]]),
        "padding_mask": np.array([[1, 1, 1], [1, 1, 0]]),
    }
    a = random_lm.generate(
        inputs, max_new_tokens=8, stop_token_ids=None, temperature=2.0, seed=1, strip_prompt=True
    )
    b = random_lm.generate(
        inputs, max_new_tokens=8, stop_token_ids=None, temperature=2.0, seed=1, strip_prompt=True
    )
    c = random_lm.generate(
        inputs, max_new_tokens=8, stop_token_ids=None, temperature=2.0, seed=2, strip_prompt=True
    )
    np.testing.assert_array_equal(a["token_ids"], b["token_ids"])
    assert (a["token_ids"] != c["token_ids"]).any()


def test_several_images_per_example(tmp_path):
    """Tokens of each example's images come in order before the prompt."""
    rng = np.random.default_rng(12)
    config = tiny_config(
        vit_num_layers=1, vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1
    )
    single = PaliGemma2Backbone(**config)
    randomize(single, rng, 0.5)
    double = PaliGemma2Backbone(**config, num_images=2)
    double.set_weights(single.get_weights())
    assert double.num_image_tokens == 8
    images = rng.uniform(-1, 1, (1, 2, 28, 28, 3)).astype("float32")
    ids = np.array([[2, 5, 6]])
    x = {
        "images": images,
        "token_ids": ids,
        "padding_mask": np.ones((1, 3)),
        "response_mask": np.zeros((1, 3)),
    }
    hidden = np.asarray(double(x))
    assert hidden.shape == (1, 8 + 3, 32)
    # The image tokens are the two images' tokens in order, as the encoder gives them.
    tokens = np.asarray(double.embed_images(images))
    first = np.asarray(single.embed_images(images[:, 0]))
    second = np.asarray(single.embed_images(images[:, 1]))
    # The same encoder on the images batched or one by one: bit-equal here
    # (measured 0); 8 ulps for batch-dependent splits of the sums.
    assert_close(tokens, np.concatenate([first, second], 1), ulps=8)
    lm = PaliGemma2CausalLM(double)
    out = lm.generate(
        {"images": images, "token_ids": ids, "padding_mask": np.ones((1, 3))},
        max_new_tokens=3,
        stop_token_ids=None,
        strip_prompt=True,
    )
    assert out["token_ids"].shape == (1, 3)
    # Swapping the two images changes the answer's logits: their order matters.
    swapped = {**x, "images": images[:, ::-1]}
    assert np.abs(np.asarray(lm(swapped)) - np.asarray(lm(x))).max() > 1e-4
    with pytest.raises(ValueError, match="takes 2 images per example"):
        lm({**x, "images": images[:, 0]})
    path = tmp_path / "double.keras"
    lm.save(path)
    import keras

    assert keras.saving.load_model(path).backbone.num_images == 2


def test_preprocessor_stacks_several_images_per_example():
    tokenizer = PaliGemma2Tokenizer(train_tiny_sentencepiece(["caption en", "a cat"]))
    preprocessor = PaliGemma2CausalLMPreprocessor(tokenizer, PaliGemma2ImageConverter(28))
    image = np.zeros((40, 40, 3), "uint8")
    x = preprocessor.generate_preprocess(
        {"images": [[image, image], [image, image]], "prompts": ["caption en"] * 2}
    )
    assert x["images"].shape == (2, 2, 28, 28, 3)


def _tiny_vocabulary_lm(seed):
    rng = np.random.default_rng(seed)
    backbone = PaliGemma2Backbone(
        **tiny_config(
            vit_num_layers=1,
            vocabulary_size=6,
            hidden_dim=16,
            num_query_heads=2,
            num_key_value_heads=1,
            intermediate_dim=32,
        )
    )
    randomize(backbone, rng, 0.8)
    # A weak eos row, so that ending at once is not always the best sequence.
    table = np.asarray(backbone.token_embedding.embeddings).copy()
    table[1] *= 0.1
    backbone.token_embedding.embeddings.assign(table)
    return PaliGemma2CausalLM(backbone)


def _brute_force_best(lm, image, prompt, max_new, eos=1):
    """Every sequence that ends with eos within max_new tokens, scored whole."""
    import itertools

    best, best_score = None, -np.inf
    others = [t for t in range(6) if t != eos]
    for length in range(1, max_new + 1):
        for body in itertools.product(others, repeat=length - 1):
            sequence = list(body) + [eos]
            ids = np.array([prompt + sequence])
            response = np.array([[0] * len(prompt) + [1] * len(sequence)])
            score = float(
                lm.score(
                    {
                        "images": image[None],
                        "token_ids": ids,
                        "padding_mask": np.ones_like(ids),
                        "response_mask": response,
                    }
                )[0]
            )
            if score > best_score:
                best, best_score = sequence, score
    return best, best_score


@pytest.mark.parametrize("seed", [0, 2])
def test_beam_search_equals_brute_force_when_the_beam_holds_everything(seed):
    lm = _tiny_vocabulary_lm(seed)
    image = np.random.default_rng(seed).uniform(-1, 1, (28, 28, 3)).astype("float32")
    prompt = [2, 3, 4]
    best, _ = _brute_force_best(lm, image, prompt, max_new=3)
    assert len(best) == 3  # Seeds where the best sequence is not just eos.
    out = lm.generate(
        {"images": image[None], "token_ids": np.array([prompt]), "padding_mask": np.ones((1, 3))},
        max_new_tokens=3,
        beam_size=25,  # 5 x 5 non-eos continuations: nothing is ever pruned.
        stop_token_ids=[1],
        strip_prompt=True,
    )
    got = out["token_ids"][0][out["padding_mask"][0] == 1].tolist()
    assert got == best


def test_small_beam_never_beats_brute_force_and_batches_exactly():
    lm = _tiny_vocabulary_lm(2)
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (2, 28, 28, 3)).astype("float32")
    prompts = [[2, 3, 4], [2, 5]]
    token_ids = np.array([[2, 3, 4], [2, 5, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    batch = lm.generate(
        {"images": images, "token_ids": token_ids, "padding_mask": mask},
        max_new_tokens=3,
        beam_size=2,
        stop_token_ids=[1],
        strip_prompt=True,
    )
    for row, prompt in enumerate(prompts):
        alone = lm.generate(
            {
                "images": images[row : row + 1],
                "token_ids": np.array([prompt]),
                "padding_mask": np.ones((1, len(prompt))),
            },
            max_new_tokens=3,
            beam_size=2,
            stop_token_ids=[1],
            strip_prompt=True,
        )
        np.testing.assert_array_equal(batch["token_ids"][row], alone["token_ids"][0])
        _, best_score = _brute_force_best(lm, images[row], prompt, max_new=3)
        sequence = alone["token_ids"][0][alone["padding_mask"][0] == 1].tolist()
        assert sequence[-1] == 1
        ids = np.array([prompt + sequence])
        response = np.array([[0] * len(prompt) + [1] * len(sequence)])
        score = float(
            lm.score(
                {
                    "images": images[row : row + 1],
                    "token_ids": ids,
                    "padding_mask": np.ones_like(ids),
                    "response_mask": response,
                }
            )[0]
        )
        assert score <= best_score + 1e-5
    with pytest.raises(ValueError, match="takes no temperature"):
        lm.generate(
            {"images": images, "token_ids": token_ids, "padding_mask": mask},
            beam_size=2,
            temperature=1.0,
        )


@pytest.mark.parametrize("scope", ["all", "decode_steps"])
def test_final_soft_cap_scope(random_lm, scope):
    """ "decode_steps" (big_vision) caps only the decode steps after the first
    generated token; "all" (HF, keras-hub) caps every logit."""
    cap = 2.0  # small, so that capping is visible on these logits
    config = dict(
        random_lm.backbone.get_config(), final_logit_soft_cap=cap, final_logit_soft_cap_scope=scope
    )
    backbone = PaliGemma2Backbone.from_config(config)
    backbone.set_weights(random_lm.backbone.get_weights())
    lm = PaliGemma2CausalLM(backbone)
    plain = PaliGemma2CausalLM(
        PaliGemma2Backbone.from_config(dict(config, final_logit_soft_cap=None))
    )
    plain.backbone.set_weights(random_lm.backbone.get_weights())
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (1, 28, 28, 3)).astype("float32")
    prompt = np.array([[2, 7, 9, 11]])
    out = lm.generate(
        {"images": image, "token_ids": prompt, "padding_mask": np.ones_like(prompt)},
        max_new_tokens=2,
        stop_token_ids=None,
        strip_prompt=True,
    )
    first = int(out["token_ids"][0, 0])
    ids = np.concatenate([prompt, [[first]]], axis=1)
    full = {
        "images": image,
        "token_ids": ids,
        "padding_mask": np.ones_like(ids),
        "response_mask": np.array([[0, 0, 0, 0, 1]]),
    }
    uncapped = np.asarray(plain(full))[0]
    capped = cap * np.tanh(uncapped / cap)
    # Training / scoring logits (the task's call).
    want = capped if scope == "all" else uncapped
    # The same model with and without the cap, numpy's tanh on our float32
    # logits: a rounding or two (measured 2 ulps); 8 is what the old 1e-5
    # allowed on logits ~20.
    assert_close(np.asarray(lm(full))[0], want, ulps=8)
    # Generation: the prefill logits, then the first decode step's.
    decoder = lm._decode_loop
    aligned, valid = right_align(prompt, np.ones_like(prompt))
    logits0, state = decoder._prefill(image, aligned, valid, max_new_tokens=2)
    prefill_len = backbone.num_image_tokens + aligned.shape[1]
    logits1, _ = decoder._extend(np.array([first]), 0, state, prefill_len)
    # The prefill (right-aligned, padded) and the first cached step against
    # the full forward: other shapes, so other sums. Measured 13 ulps (the
    # old 1e-5 allowed 17) and 16.
    assert_close(np.asarray(logits0)[0], want[3], ulps=16)
    assert_close(np.asarray(logits1)[0], capped[4], ulps=64)
    assert np.abs(uncapped[3:]).max() > 2 * cap  # the cap changes these logits


def test_final_soft_cap_scope_is_checked():
    with pytest.raises(ValueError, match="final_logit_soft_cap_scope"):
        PaliGemma2Backbone(
            image_size=28,
            vocabulary_size=50,
            num_layers=1,
            hidden_dim=32,
            num_query_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            intermediate_dim=48,
            final_logit_soft_cap_scope="prefill",
        )
