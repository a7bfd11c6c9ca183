"""Decoding with a KV cache: prefill the real prompt, then extend one token at a time.

As big_vision (`gemma_bv.prefill_cache`), prompts are right-aligned first, so
that every row writes its next token into the same cache slot; each row keeps
its own positions, and padding slots are masked out, so a ragged batch decodes
exactly as each example alone. The image + prompt attend to each other fully
(prefix-LM); generated tokens are causal. The whole loop is one jitted
function of the model's variables, compiled once per (batch, prompt bucket,
new tokens) shape.

Cache: per layer, (B, 2, S, K, H) with S = image tokens + prompt bucket +
new tokens; [:, 0] keys, [:, 1] values.
"""

import functools

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np

from keras_paligemma2.layers.attention import make_attention_mask
from keras_paligemma2.models.constraints import constrained_logits
from keras_paligemma2.utils.errors import InputError

PROMPT_BUCKET = 16


def right_align(token_ids, padding_mask, bucket=PROMPT_BUCKET):
    """Moves each row's real tokens to the end, padding the length to a bucket.

    Args:
        token_ids: int array (B, T), left-aligned prompts.
        padding_mask: int/bool array (B, T), 1 on real tokens: ones then zeros, at least one
            per row (else a ValueError).
        bucket: int, the output length is the longest prompt rounded up to a multiple of it
            (default `PROMPT_BUCKET`, 16).

    Returns:
        (token_ids, valid), int32 NumPy (B, T') each, T' the bucketed length: the real tokens
        at the end of each row, 0 (and valid 0) before them.
    """
    token_ids = np.asarray(token_ids)
    padding_mask = np.asarray(padding_mask).astype(bool)
    batch, length = token_ids.shape
    lengths = padding_mask.sum(1)
    if (lengths == 0).any():
        raise InputError("Every prompt needs at least one token (<bos>).")
    for row in range(batch):
        if not padding_mask[row, : lengths[row]].all():
            raise InputError(
                f"Row {row} of padding_mask is not left-aligned (ones then "
                "zeros); prompts must start at position 0."
            )
    width = -(-int(lengths.max()) // bucket) * bucket
    aligned = np.zeros((batch, width), np.int32)
    valid = np.zeros((batch, width), np.int32)
    for row in range(batch):
        n = lengths[row]
        aligned[row, width - n :] = token_ids[row, :n]
        valid[row, width - n :] = 1
    return aligned, valid


class Sampler:
    """How the next token is chosen from the logits.

    Args:
        temperature: float or None. Logits are divided by it before
            sampling; 0 picks the most likely token (greedy). None (the
            default) means greedy without `top_k` / `top_p` and 1.0 with
            either, as keras-hub's `TopKSampler` / `TopPSampler` and
            big_vision's samplers sample at temperature 1 unless told.
        top_k: int or None; sample among the k most likely tokens only.
        top_p: float in (0, 1] or None; sample from the smallest set of
            most likely tokens whose probability reaches p (nucleus).
        seed: int, for reproducible sampling.
        top_p_scope: which probabilities the nucleus adds up when `top_k`
            is given too: "top_k" (default; transformers' `TopKLogitsWarper`
            then `TopPLogitsWarper`: the probabilities renormalised over the
            k kept tokens) or "vocabulary" (keras-hub's `TopPSampler(k=...)`:
            the softmax over the whole vocabulary, cut to the k most likely).

    `top_k` / `top_p` with `temperature=0` cannot mean anything (greedy
    decoding has nothing to restrict) and are refused rather than ignored.
    """

    def __init__(self, temperature=None, top_k=None, top_p=None, seed=0, top_p_scope="top_k"):
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
            raise InputError(f"top_k must be an integer >= 1; got {top_k!r}.")
        if top_p is not None and not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1]; got {top_p}.")
        restricted = top_k is not None or top_p is not None
        if temperature is None:
            temperature = 1.0 if restricted else 0.0
        if temperature < 0:
            raise InputError(f"temperature must be >= 0; got {temperature}.")
        if temperature == 0 and restricted:
            raise InputError(
                "top_k / top_p restrict sampling, but temperature=0 decodes "
                "greedily, so they would be ignored. Give a temperature > 0 "
                "(or leave it unset for 1.0), or drop top_k / top_p."
            )
        if top_p_scope not in ("top_k", "vocabulary"):
            raise InputError(f'top_p_scope must be "top_k" or "vocabulary"; got {top_p_scope!r}.')
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = top_p
        self.seed = int(seed)
        self.top_p_scope = top_p_scope

    @property
    def greedy(self):
        return self.temperature == 0.0

    def key(self):
        return (self.temperature, self.top_k, self.top_p, self.top_p_scope)

    def __call__(self, logits, rng):
        """Chooses one token per row.

        Args:
            logits: float (B, V).
            rng: a JAX random key (unused when greedy).

        Returns:
            int32 (B,) token ids.
        """
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
        unrestricted = logits
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None:
            ordered = jnp.sort(logits, axis=-1)[:, ::-1]
            if self.top_p_scope == "vocabulary":
                full = jax.nn.softmax(unrestricted, axis=-1)
                probabilities = jnp.sort(jnp.where(logits == -jnp.inf, 0.0, full), axis=-1)
                probabilities = probabilities[:, ::-1]
            else:
                probabilities = jax.nn.softmax(ordered, axis=-1)
            cumulative = jnp.cumsum(probabilities, axis=-1)
            # Keep tokens until the cumulative probability reaches top_p
            # (the token that crosses it included).
            cutoff_index = jnp.sum(cumulative < self.top_p, axis=-1, keepdims=True)
            cutoff = jnp.take_along_axis(ordered, cutoff_index, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def keras_hub_sampling(sampler):
    """Our decoding settings for a keras-hub sampler (`compile(sampler=...)`).

    Args:
        sampler: a name `keras_hub.samplers.get` knows ("greedy", "top_k",
            "top_p", "random", "beam") or one of those samplers' objects
            (`keras_hub.samplers.TopKSampler(k=5, temperature=0.7)`, ...).

    Returns:
        dict of `generate` settings with keras-hub's meaning: `temperature`,
        `top_k`, `top_p`, `top_p_scope` ("vocabulary", as `TopPSampler`
        with k), `seed` (None: fresh randomness each call, as keras-hub's
        seed=None) and `beam_size` with `beam_style` "keras_hub" for
        `BeamSampler`.
    """
    samplers = keras_hub.samplers
    if isinstance(sampler, str):
        name = sampler
        sampler = samplers.get(sampler)
        if isinstance(sampler, str):
            raise InputError(
                f"Unknown sampler {name!r}; keras-hub's names this task decodes with: "
                "greedy, top_k, top_p, random, beam."
            )
    kind = type(sampler)
    temperature = float(getattr(sampler, "temperature", 1.0))
    seed = getattr(sampler, "seed", None)
    settings = dict(temperature=temperature, seed=seed)
    if kind is samplers.GreedySampler:
        return dict(temperature=0.0, seed=None)
    if kind is samplers.TopKSampler:
        return {**settings, "top_k": int(sampler.k)}
    if kind is samplers.TopPSampler:
        return {
            **settings,
            "top_p": float(sampler.p),
            "top_k": sampler.k,
            "top_p_scope": "vocabulary",
        }
    if kind is samplers.RandomSampler:
        return settings
    if kind is samplers.BeamSampler:
        if sampler.return_all_beams:
            raise InputError(
                "BeamSampler(return_all_beams=True) is not supported: generate returns the best "
                "beam. Use return_all_beams=False."
            )
        return dict(
            beam_size=int(sampler.num_beams), beam_style="keras_hub", temperature=temperature
        )
    raise InputError(
        f"{kind.__name__} is not supported: this task decodes with its own KV-cache loop, "
        "which implements keras-hub's GreedySampler, TopKSampler, TopPSampler, RandomSampler "
        "and BeamSampler (give one of those, or their names)."
    )


def data_parallel_size():
    """How many ways the Keras distribution in force splits a batch (the size of its
    batch axis); 1 without one."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    axis = getattr(distribution, "batch_dim_name", None)
    return mesh.shape[mesh.axis_names.index(axis)] if axis in mesh.axis_names else 1


def split_batch(arrays):
    """`arrays` (a pytree of host arrays with the batch first) placed split over the batch
    axis of the Keras distribution in force, so that decoding runs data-parallel (rows
    never meet, so each device decodes its rows alone); unchanged when there is none, it
    has no batch axis, or the batch does not divide over it (then every device decodes
    the whole batch). Scalars and arrays of another leading size are replicated.

    Args:
        arrays: a pytree of NumPy arrays (or None leaves).
    """
    leaves = [x for x in jax.tree.leaves(arrays) if np.ndim(x)]
    ways = data_parallel_size()
    if ways == 1 or not leaves or np.shape(leaves[0])[0] % ways:
        return arrays
    batch = np.shape(leaves[0])[0]
    distribution = keras.distribution.distribution()
    mesh = distribution.device_mesh.backend_mesh
    split = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(distribution.batch_dim_name)
    )
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        x = np.asarray(x)
        return jax.device_put(x, split if x.ndim and x.shape[0] == batch else whole)

    return jax.tree.map(place, arrays)


class _Constrained:
    """A constraint with its traced tables, inside the compiled loop."""

    def __init__(self, constraint, arrays):
        self.constraint, self.arrays = constraint, arrays

    def initial_state(self, batch):
        return self.constraint.initial_state(self.arrays, batch)

    def allowed(self, state, index):
        allowed = self.constraint.allowed(self.arrays, state, index)
        # A row with nothing left to choose has already ended (its stop token
        # was chosen): let it pick anything rather than sample from all -inf.
        return allowed | ~jnp.any(allowed, axis=-1, keepdims=True)

    def advance(self, state, token):
        return self.constraint.advance(self.arrays, state, token)


def _choose(sampler, logits, rng, constrained, rules, index):
    """(token (B,), the logits it was chosen from, the constraint's next state)."""
    if not constrained:
        return sampler(logits, rng), logits, rules
    logits = constrained_logits(logits, constrained.allowed(rules, index))
    token = sampler(logits, rng)
    return token, logits, constrained.advance(rules, token)


class DecodeLoop:
    """KV-cache decoding for a `PaliGemma2CausalLM` (one per model).

    Args:
        causal_lm: the `PaliGemma2CausalLM` to decode with (its backbone and `text_logits`);
            compiled loops are cached per input shape and settings.
    """

    def __init__(self, causal_lm):
        self.lm = causal_lm
        self.backbone = causal_lm.backbone
        self._compiled = {}

    def __call__(
        self,
        images,
        token_ids,
        padding_mask,
        max_new_tokens,
        stop_token_ids,
        sampler=None,
        step_logits=False,
        constraint=None,
    ):
        """Returns (new tokens (B, max_new_tokens), logits).

        Tokens after a row's stop token are the pad id 0. The logits are the
        first step's (B, V), or with `step_logits=True` those every step
        chose from (B, max_new_tokens, V), final soft-cap as configured
        (0 for steps after every row stopped; -inf where a constraint
        ruled a token out).

        Args:
            images: float (B, S, S, 3) in [-1, 1] (or (B, n, S, S, 3) for n images each).
            token_ids: int (B, T) left-aligned prompts (`<bos> prompt "\\n"`).
            padding_mask: int/bool (B, T), 1 on real tokens.
            max_new_tokens: int >= 1, the number of tokens generated per row.
            stop_token_ids: iterable of int; a row stops after sampling one (may be empty).
            sampler: a `Sampler`; None (default) decodes greedily.
            step_logits: bool; True returns every step's logits instead of the first's.
            constraint: None, or a `constraints.AllowedTokens` / `constraints.TaskFormat`:
                the tokens each step may choose (the others' logits are -inf before the
                sampler sees them).
        """
        sampler = sampler or Sampler()
        aligned, valid = right_align(token_ids, padding_mask)
        stop = np.asarray(sorted(set(stop_token_ids)) or [-1], np.int32)
        key = (aligned.shape, int(max_new_tokens), tuple(stop), sampler.key(), bool(step_logits))
        key += (None if constraint is None else constraint.key(),)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                functools.partial(
                    self._generate,
                    max_new_tokens=int(max_new_tokens),
                    sampler=sampler,
                    step_logits=bool(step_logits),
                    constraint=constraint,
                )
            )
        values = [v.value for v in self.backbone.variables]
        rng = jax.random.key(sampler.seed)
        arrays = None if constraint is None else constraint.arrays
        images, aligned, valid, arrays = split_batch((images, aligned, valid, arrays))
        return self._compiled[key](values, images, aligned, valid, stop, rng, arrays)

    def _generate(
        self,
        values,
        images,
        token_ids,
        valid,
        stop,
        rng,
        arrays,
        max_new_tokens,
        sampler,
        step_logits,
        constraint,
    ):
        backbone = self.backbone
        with keras.StatelessScope(state_mapping=list(zip(backbone.variables, values))):
            return self._decode(
                images,
                token_ids,
                valid,
                stop,
                rng,
                max_new_tokens,
                sampler,
                step_logits,
                constraint and _Constrained(constraint, arrays),
            )

    def _prefill(self, images, token_ids, valid, max_new_tokens):
        """Image + prompt as one bidirectional block into a fresh cache.

        Returns the last position's logits (B, V) and the decoding state
        (caches, cache_valid, cache_positions, lengths).
        """
        backbone = self.backbone
        batch, prompt_len = token_ids.shape
        num_image = backbone.num_image_tokens
        prefill_len = num_image + prompt_len
        cache_len = prefill_len + max_new_tokens
        window = backbone.sliding_window_size
        image_tokens = backbone.embed_images(images)
        text_tokens = backbone.token_embedding(token_ids)
        x = jnp.concatenate([image_tokens.astype(text_tokens.dtype), text_tokens], 1)
        cache_valid = jnp.zeros((batch, cache_len), jnp.int32)
        cache_valid = cache_valid.at[:, :num_image].set(1)
        cache_valid = cache_valid.at[:, num_image:prefill_len].set(valid)
        cache_positions = jnp.cumsum(cache_valid, axis=1) - 1
        cache_blocks = jnp.zeros((batch, cache_len), jnp.int32)
        positions = cache_positions[:, :prefill_len]
        # Keys: the prefill's own tokens only; the rest of the cache is empty.
        masks = {
            local: make_attention_mask(
                cache_valid[:, :prefill_len],
                cache_blocks[:, :prefill_len],
                query_positions=positions,
                key_positions=positions,
                sliding_window=window if local else None,
            )
            for local in self._layer_kinds()
        }
        caches = []
        last = backbone.num_layers - 1
        for i, block in enumerate(backbone.decoder_blocks):
            empty = jnp.zeros(self._cache_shape(batch, cache_len), x.dtype)
            # Only the last prompt position's output is needed from the final
            # block (the first token's logits): it skips the other positions'
            # attention and MLP there, and still caches their keys/values.
            x, cache = block(
                x,
                positions,
                masks[backbone.is_local_layer(i, window)],
                kv_cache=empty,
                cache_index=0,
                last_only=i == last,
            )
            caches.append(cache)
        logits = self.lm.text_logits(backbone.final_norm(x[:, -1:]))[:, 0]
        lengths = jnp.sum(valid, axis=1) + num_image
        return logits, (caches, cache_valid, cache_positions, lengths)

    def _extend(self, token, index, state, prefill_len, soft_cap=True):
        """Feeds `token` (B,), the generated token number `index`; returns
        the next logits (B, V) and the updated state. Each generated token is
        its own causal block (mask_ar = 1)."""
        backbone = self.backbone
        window = backbone.sliding_window_size
        caches, cache_valid, cache_positions, lengths = state
        batch, cache_len = cache_valid.shape
        slot = prefill_len + index
        position = (lengths + index)[:, None]
        cache_valid = cache_valid.at[:, slot].set(1)
        cache_positions = cache_positions.at[:, slot].set(position[:, 0])
        slots = jnp.arange(cache_len)[None, :]
        cache_blocks = jnp.where(slots >= prefill_len, slots - prefill_len + 1, 0)
        masks = {
            local: make_attention_mask(
                cache_valid,
                cache_blocks,
                query_valid=jnp.ones((batch, 1), jnp.int32),
                query_blocks=jnp.full((batch, 1), index + 1, jnp.int32),
                query_positions=position,
                key_positions=cache_positions,
                sliding_window=window if local else None,
            )
            for local in self._layer_kinds()
        }
        x = backbone.token_embedding(token[:, None])
        new_caches = []
        for i, block in enumerate(backbone.decoder_blocks):
            x, cache = block(
                x,
                position,
                masks[backbone.is_local_layer(i, window)],
                kv_cache=caches[i],
                cache_index=slot,
            )
            new_caches.append(cache)
        logits = self.lm.text_logits(backbone.final_norm(x), decode_step=True, soft_cap=soft_cap)[
            :, 0
        ]
        return logits, (new_caches, cache_valid, cache_positions, lengths)

    def _layer_kinds(self):
        b = self.backbone
        return {b.is_local_layer(i, b.sliding_window_size) for i in range(b.num_layers)}

    def _decode(
        self, images, token_ids, valid, stop, rng, max_new_tokens, sampler, step_logits, constrained
    ):
        batch, prompt_len = token_ids.shape
        prefill_len = self.backbone.num_image_tokens + prompt_len
        first_logits, state = self._prefill(images, token_ids, valid, max_new_tokens)
        rng, pick = jax.random.split(rng)
        rules = constrained.initial_state(batch) if constrained else ()
        token, first_logits, rules = _choose(sampler, first_logits, pick, constrained, rules, 0)
        # Greedy steps skip the final soft-cap (the argmax is the same),
        # unless the logits themselves are returned.
        soft_cap = step_logits or not sampler.greedy
        if step_logits:
            recorded = jnp.zeros((batch, max_new_tokens, first_logits.shape[-1]), jnp.float32)
            recorded = recorded.at[:, 0].set(first_logits)
        else:
            recorded = first_logits

        # `token` was just chosen and stored at `index`; a step feeds it,
        # chooses the next and stores it at index + 1: n tokens, n - 1 steps.
        def step(carry):
            index, token, done, state, rules, output, recorded, rng = carry
            logits, state = self._extend(token, index, state, prefill_len, soft_cap=soft_cap)
            rng, pick = jax.random.split(rng)
            next_token, logits, rules = _choose(
                sampler, logits, pick, constrained, rules, index + 1
            )
            output = output.at[:, index + 1].set(jnp.where(done, 0, next_token))
            if step_logits:
                recorded = recorded.at[:, index + 1].set(logits.astype(jnp.float32))
            done = done | jnp.isin(next_token, stop)
            return index + 1, next_token, done, state, rules, output, recorded, rng

        def keep_going(carry):
            index, _, done, *_ = carry
            return (index + 1 < max_new_tokens) & ~jnp.all(done)

        output = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
        carry = (jnp.int32(0), token, jnp.isin(token, stop), state, rules, output, recorded, rng)
        carry = jax.lax.while_loop(keep_going, step, carry)
        return carry[5], carry[6]

    def beam_search(
        self,
        images,
        token_ids,
        padding_mask,
        max_new_tokens,
        beam_size,
        eos,
        style="big_vision",
        temperature=1.0,
    ):
        """Beam search, one compiled loop; scores are summed log-probabilities
        without length normalisation.

        style "big_vision" (`predict_fns._beam_decode`, the default): each
        step, every live beam may end with `eos` (a finished candidate, its
        score including log p(eos)); the best finished one per example is
        kept; live beams grow by their best non-`eos` tokens and the best
        `beam_size` survive. Stops when no live beam can beat the best
        finished one (scores only fall) or after `max_new_tokens`.

        style "keras_hub" (`keras_hub.samplers.BeamSampler`): the best
        `beam_size` of all beams x tokens survive each step, `eos` included,
        and a beam goes on growing after its `eos`; stops when every beam
        holds an `eos` or after `max_new_tokens`; the beam with the highest
        score wins and is cut after its first `eos`.

        Args:
            images: float (B, S, S, 3) in [-1, 1] (or (B, n, S, S, 3) for n images each).
            token_ids: int (B, T) left-aligned prompts (`<bos> prompt "\\n"`).
            padding_mask: int/bool (B, T), 1 on real tokens.
            max_new_tokens: int, the most tokens per sequence, `eos` included.
            beam_size: int, the number of live beams kept per example.
            eos: int, the token id that ends a sequence.
            style: "big_vision" (default) or "keras_hub", see above.
            temperature: float > 0, logits are divided by it before the
                log-softmax (style "keras_hub" only, as `BeamSampler`'s).

        Returns (B, max_new_tokens) tokens of the best finished sequence,
        `eos` included, padded with 0.
        """
        if style not in ("big_vision", "keras_hub"):
            raise InputError(f'style must be "big_vision" or "keras_hub"; got {style!r}.')
        if style == "big_vision" and temperature != 1.0:
            raise InputError("big_vision's beam search has no temperature; leave it at 1.0.")
        if temperature <= 0:
            raise InputError(f"temperature must be > 0 for beam search; got {temperature}.")
        aligned, valid = right_align(token_ids, padding_mask)
        key = ("beam", style, aligned.shape, int(max_new_tokens), int(beam_size), int(eos))
        key += (float(temperature),)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(
                functools.partial(
                    self._beam if style == "big_vision" else self._beam_keras_hub,
                    max_new_tokens=int(max_new_tokens),
                    beam_size=int(beam_size),
                    eos=int(eos),
                    **({} if style == "big_vision" else {"temperature": float(temperature)}),
                )
            )
        values = [v.value for v in self.backbone.variables]
        return self._compiled[key](values, jnp.asarray(images), aligned, valid)

    def _beam(self, values, images, token_ids, valid, max_new_tokens, beam_size, eos):
        backbone = self.backbone
        with keras.StatelessScope(state_mapping=list(zip(backbone.variables, values))):
            batch, prompt_len = token_ids.shape
            n = beam_size
            prefill_len = backbone.num_image_tokens + prompt_len
            logits, state = self._prefill(images, token_ids, valid, max_new_tokens)
            # Beams as rows (B * N): the cache of each example repeated N times.
            state = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), state)
            logits = jnp.repeat(logits, n, axis=0)
            neg = jnp.finfo(jnp.float32).min
            live_scores = jnp.full((batch, n), neg).at[:, 0].set(0.0)  # One live beam at first.
            live_tokens = jnp.zeros((batch, n, max_new_tokens), jnp.int32)
            best_tokens = jnp.zeros((batch, max_new_tokens), jnp.int32)
            best_score = jnp.full((batch,), neg)

            def step(carry):
                index, logits, state, live_scores, live_tokens, best_tokens, best_score = carry
                logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                logp = logp.reshape(batch, n, -1)
                # Ending now: each live beam followed by eos.
                ended = live_scores + logp[:, :, eos]
                pick = jnp.argmax(ended, axis=1)
                candidate = jnp.take_along_axis(ended, pick[:, None], 1)[:, 0]
                ended_tokens = jnp.take_along_axis(live_tokens, pick[:, None, None], 1)[:, 0]
                ended_tokens = ended_tokens.at[:, index].set(eos)
                better = candidate > best_score
                best_score = jnp.where(better, candidate, best_score)
                best_tokens = jnp.where(better[:, None], ended_tokens, best_tokens)
                # Growing: the best non-eos continuations of every live beam.
                grown = jnp.where(
                    jnp.arange(logp.shape[-1]) == eos, neg, live_scores[..., None] + logp
                )
                grown = jnp.where(live_scores[..., None] <= neg, neg, grown)
                top_scores, top_index = jax.lax.top_k(grown.reshape(batch, -1), n)
                parent = top_index // logp.shape[-1]
                token = (top_index % logp.shape[-1]).astype(jnp.int32)
                live_tokens = jnp.take_along_axis(live_tokens, parent[..., None], 1)
                live_tokens = live_tokens.at[:, :, index].set(token)
                rows = (parent + jnp.arange(batch)[:, None] * n).reshape(-1)
                state = jax.tree.map(lambda x: x[rows], state)
                logits, state = self._extend(token.reshape(-1), index, state, prefill_len)
                return index + 1, logits, state, top_scores, live_tokens, best_tokens, best_score

            def keep_going(carry):
                index, _, _, live_scores, _, _, best_score = carry
                can_improve = jnp.max(live_scores, axis=1) > best_score
                return (index < max_new_tokens) & jnp.any(can_improve)

            carry = (jnp.int32(0), logits, state, live_scores, live_tokens, best_tokens, best_score)
            carry = jax.lax.while_loop(keep_going, step, carry)
            return carry[5]

    def _beam_keras_hub(
        self, values, images, token_ids, valid, max_new_tokens, beam_size, eos, temperature
    ):
        backbone = self.backbone
        with keras.StatelessScope(state_mapping=list(zip(backbone.variables, values))):
            batch, prompt_len = token_ids.shape
            n = beam_size
            prefill_len = backbone.num_image_tokens + prompt_len
            logits, state = self._prefill(images, token_ids, valid, max_new_tokens)
            state = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), state)
            logits = jnp.repeat(logits, n, axis=0)
            # As BeamSampler: only the first beam is live at the first step.
            scores = jnp.full((batch, n), -1e9, jnp.float32).at[:, 0].set(0.0)
            tokens = jnp.zeros((batch, n, max_new_tokens), jnp.int32)
            ended = jnp.zeros((batch, n), bool)

            def step(carry):
                index, logits, state, scores, tokens, ended = carry
                logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
                vocab = logp.shape[-1]
                grown = scores[..., None] + logp.reshape(batch, n, vocab)
                scores, top_index = jax.lax.top_k(grown.reshape(batch, -1), n)
                parent = top_index // vocab
                token = (top_index % vocab).astype(jnp.int32)
                tokens = jnp.take_along_axis(tokens, parent[..., None], 1)
                tokens = tokens.at[:, :, index].set(token)
                ended = jnp.take_along_axis(ended, parent, 1) | (token == eos)
                rows = (parent + jnp.arange(batch)[:, None] * n).reshape(-1)
                state = jax.tree.map(lambda x: x[rows], state)
                logits, state = self._extend(token.reshape(-1), index, state, prefill_len)
                return index + 1, logits, state, scores, tokens, ended

            def keep_going(carry):
                index, *_, ended = carry
                return (index < max_new_tokens) & ~jnp.all(ended)

            carry = (jnp.int32(0), logits, state, scores, tokens, ended)
            _, _, _, scores, tokens, _ = jax.lax.while_loop(keep_going, step, carry)
            best = jnp.take_along_axis(tokens, jnp.argmax(scores, 1)[:, None, None], 1)[:, 0]
            # Cut after the first eos (keras-hub masks what follows; we zero it).
            after = jnp.cumsum(best == eos, axis=1) - (best == eos) > 0
            return jnp.where(after, 0, best)

    def _cache_shape(self, batch, cache_len):
        b = self.backbone
        return (batch, 2, cache_len, b.num_key_value_heads, b.head_dim)
