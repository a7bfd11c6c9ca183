"""Constrained decoding: which tokens each decoding step may choose.

big_vision's decode (`predict_fns._sample_logits`) sets the logits of a fixed
set of tokens (`batch["mask_logits"]`) to -inf before the sampler runs.
`AllowedTokens` is that idea stated as the tokens kept. `TaskFormat` makes
the set depend on what each row has generated so far: a `detect` or
`segment` prompt's reply can then only be what `parse_detections` reads back
whole, per object

    <locYMIN><locXMIN><locYMAX><locXMAX> [16 x <segNNN>] label

with objects joined by " ; " and the reply ended by `<eos>` (or nothing but
`<eos>`: no object). Labels are the classes the prompt names, tokenized in
context exactly as a training target containing them is. Boxes have
y_max > y_min and x_max > x_min (the parser skips others). Each row's token
budget is respected: a step may only choose a token after which the reply
can still be completed, `<eos>` included, in the tokens that row has left,
so a reply is never cut mid-object.

Both run inside the compiled decoding loop: `arrays` is a pytree of the
per-call tables (traced), `key()` the static part the compiled loop is cached
by, `initial_state(arrays, batch)`, `allowed(arrays, state, index)` ((B, V)
or (1, V) bool for new token number `index`) and `advance(arrays, state,
token)` pure functions of those.
"""

import jax.numpy as jnp
import numpy as np

from keras_paligemma2.preprocessing.tokenizer import NUM_LOCATION_TOKENS
from keras_paligemma2.preprocessing.tokenizer import NUM_SEGMENTATION_TOKENS
from keras_paligemma2.utils.errors import InputError

FREE, DETECT, SEGMENT = 0, 1, 2
TASK_PREFIXES = {"detect": DETECT, "segment": SEGMENT}
BOX_TOKENS = 4
SEGMENT_CODES = 16


class TokenConstraint:
    """What the compiled decoding loop asks of a constraint; subclasses implement the
    underscored methods. `arrays` (a pytree of NumPy arrays, the per-call tables) is
    passed in traced; everything else on the object is static and part of `key()`."""

    arrays = {}

    def key(self):
        """The static configuration, which the compiled loop is cached by."""
        return (type(self).__name__,)

    def initial_state(self, arrays, batch):
        """The state before the first token.

        Args:
            arrays: this constraint's `arrays`, traced.
            batch: int, the number of rows.
        """
        return self._initial_state(arrays, batch)

    def allowed(self, arrays, state, index):
        """(B, V) or (1, V) bool: the tokens each row may choose now.

        Args:
            arrays: this constraint's `arrays`, traced.
            state: the current state (`initial_state`, then `advance`'s).
            index: int32 scalar, which new token is being chosen (0 the first).
        """
        return self._allowed(arrays, state, index)

    def advance(self, arrays, state, token):
        """The state once each row chose its token.

        Args:
            arrays: this constraint's `arrays`, traced.
            state: the state the token was chosen in.
            token: int32 (B,), the chosen tokens.
        """
        return self._advance(arrays, state, token)


class AllowedTokens(TokenConstraint):
    """Every step chooses among the same tokens (big_vision's `mask_logits`,
    whose set is the complement: the tokens masked out).

    Args:
        token_ids: iterable of int token ids, or a bool array (vocabulary_size,) True on the
            tokens kept.
        vocabulary_size: int, the model's vocabulary size (the logits' last axis).
        stop_token_ids: iterable of int; they are kept too (a reply can always end).
    """

    def __init__(self, token_ids, vocabulary_size, stop_token_ids=()):
        given = np.asarray(token_ids)
        if given.dtype == bool:
            if given.shape != (vocabulary_size,):
                raise InputError(
                    f"allowed_tokens as a mask must have shape ({vocabulary_size},), the "
                    f"vocabulary; got {given.shape}."
                )
            mask = given.copy()
        else:
            ids = given.reshape(-1)
            if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise InputError(
                    "allowed_tokens must be a non-empty list of integer token ids or a bool "
                    f"mask over the vocabulary; got {token_ids!r:.80}."
                )
            bad = ids[(ids < 0) | (ids >= vocabulary_size)]
            if bad.size:
                raise InputError(
                    f"allowed_tokens has ids outside the vocabulary [0, {vocabulary_size}): "
                    f"{bad[:5].tolist()}."
                )
            mask = np.zeros(vocabulary_size, bool)
            mask[ids] = True
        mask[list(stop_token_ids)] = True
        self.arrays = {"allowed": mask}

    def _initial_state(self, arrays, batch):
        return ()

    def _allowed(self, arrays, state, index):
        return arrays["allowed"][None]

    def _advance(self, arrays, state, token):
        return state


def prompt_format(prompt):
    """(kind, labels) of a prompt: `detect a ; b` -> (DETECT, ["a", "b"]),
    `segment a` -> (SEGMENT, ["a"]), anything else (FREE, []).

    Args:
        prompt: str, the prompt without `<bos>` and the separator.
    """
    text = prompt.strip()
    for word, kind in TASK_PREFIXES.items():
        if text == word or text.startswith(word + " "):
            labels = [label.strip() for label in text[len(word) :].split(";")]
            labels = list(dict.fromkeys(label for label in labels if label))
            if not labels:
                raise InputError(
                    f"The prompt {prompt!r} names no class to {word}; write e.g. "
                    f"'{word} cat ; dog'."
                )
            return kind, labels
    return FREE, []


class TaskFormat(TokenConstraint):
    """Per row, the grammar of its prompt's task (`prompt_format`); other rows are free.

    Args:
        tokenizer: the model's `PaliGemma2Tokenizer` (location and segmentation ids, labels
            tokenized in context).
        prompts: list of str, one per row, without `<bos>` and the separator.
        room: int array (B,), how many tokens each row may generate.
        vocabulary_size: int, the logits' last axis.
    """

    def __init__(self, tokenizer, prompts, room, vocabulary_size):
        self.tokenizer = tokenizer
        self.location_start = int(tokenizer.location_token_start)
        self.segmentation_start = int(tokenizer.segmentation_token_start)
        self.end = int(tokenizer.end_token_id)
        self.vocabulary_size = int(vocabulary_size)
        rows = []
        for prompt in prompts:
            kind, labels = prompt_format(prompt)
            rows.append((kind, [self._label_sequences(kind, label) for label in labels]))
        # Sequences padded to multiples of 4 (count) and 8 (length), so calls reuse one
        # compiled loop.
        count = max([2 * len(seqs) for _, seqs in rows] + [1])
        count = -(-count // 4) * 4
        length = max([len(s) for _, seqs in rows for pair in seqs for s in pair] + [1])
        length = -(-length // 8) * 8
        batch = len(prompts)
        sequences = np.full((batch, count, length), -1, np.int32)
        lengths = np.zeros((batch, count), np.int32)
        ends = np.zeros((batch, count), bool)
        for row, (kind, seqs) in enumerate(rows):
            flat = [(s, False) for s, _ in seqs] + [(e, True) for _, e in seqs]
            self._check_unambiguous(prompts[row], [s for s, _ in flat])
            for m, (seq, is_end) in enumerate(flat):
                sequences[row, m, : len(seq)] = seq
                lengths[row, m] = len(seq)
                ends[row, m] = is_end
        kinds = np.array([kind for kind, _ in rows], np.int32)
        codes = np.where(kinds == SEGMENT, SEGMENT_CODES, 0).astype(np.int32)
        shortest_end = np.where(ends, lengths, np.iinfo(np.int32).max).min(1, initial=2**30)
        self.arrays = {
            "constrained": kinds != FREE,
            "codes": codes,
            "sequences": sequences,
            "lengths": lengths,
            "ends": ends,
            # Tokens an object needs after its first <loc> is chosen and before <eos>:
            # the other three, the codes, the shortest label ending the reply.
            "object_rest": (BOX_TOKENS - 1 + codes + np.where(kinds != FREE, shortest_end, 0)),
            "room": np.asarray(room, np.int32),
        }

    def key(self):
        """The static configuration: the special tokens' ids."""
        return ("TaskFormat", self.location_start, self.segmentation_start, self.end)

    def _label_sequences(self, kind, label):
        """(label then " ; " before the next object, label then <eos>) as token ids, cut
        from the tokenization of a two-object reply so SentencePiece sees them in context."""
        box = "<loc0000>" * BOX_TOKENS + ("<seg000>" * SEGMENT_CODES if kind == SEGMENT else "")
        ids = np.asarray(self.tokenizer.tokenize(f"{box} {label} ; {box} {label}"))
        ids = [int(i) for i in ids]
        special = [i for i, t in enumerate(ids) if self._is_box_token(t)]
        per_object = len(special) // 2
        if len(special) % 2 or special[:per_object] != list(range(per_object)):
            raise InputError(
                f"The tokenizer does not keep <loc>/<seg> tokens whole around {label!r}; "
                "constrained decoding needs PaliGemma's tokenizer."
            )
        second = special[per_object]
        if special[per_object:] != list(range(second, second + per_object)):
            raise InputError(f"The label {label!r} tokenizes into location tokens.")
        between = ids[per_object:second]
        ending = ids[second + per_object :] + [self.end]
        if not between or len(ending) < 2:
            raise InputError(f"The label {label!r} tokenizes to nothing.")
        return between, ending

    def _is_box_token(self, token):
        loc = self.location_start <= token < self.location_start + NUM_LOCATION_TOKENS
        seg = self.segmentation_start <= token < self.segmentation_start + NUM_SEGMENTATION_TOKENS
        return loc or seg

    @staticmethod
    def _check_unambiguous(prompt, sequences):
        for i, a in enumerate(sequences):
            for j, b in enumerate(sequences):
                if i != j and len(a) < len(b) and b[: len(a)] == a:
                    raise InputError(
                        f"In {prompt!r}, one class's tokens followed by ' ; ' begin another "
                        "class's tokens, so a constrained reply could not tell where an object "
                        "ends; rename the classes."
                    )

    # --- Inside the compiled loop -------------------------------------------

    def _initial_state(self, arrays, batch):
        zeros = jnp.zeros((batch,), jnp.int32)
        return {
            "slot": zeros,  # 0-3 box tokens, then the codes, then the label
            "position": zeros,  # within the label sequences
            "alive": jnp.zeros(arrays["lengths"].shape, bool),  # sequences still matching
            "y_min": zeros,
            "x_min": zeros,
            "started": jnp.zeros((batch,), bool),  # an object has begun
        }

    def _label_tokens(self, arrays, state):
        position = state["position"][:, None, None]
        return jnp.take_along_axis(arrays["sequences"], position, axis=2)[..., 0]  # (B, M)

    def _allowed(self, arrays, state, index):
        constrained, codes = arrays["constrained"], arrays["codes"]
        slot, position = state["slot"], state["position"]
        after = arrays["room"] - index - 1  # tokens the row has left once this one is chosen
        batch = slot.shape[0]
        bins = jnp.arange(NUM_LOCATION_TOKENS)
        lower = jnp.select([slot == 2, slot == 3], [state["y_min"], state["x_min"]], -1)
        upper = jnp.where(slot < 2, NUM_LOCATION_TOKENS - 2, NUM_LOCATION_TOKENS - 1)
        fits = arrays["object_rest"] - slot <= after
        box_ok = (constrained & (slot < BOX_TOKENS) & fits)[:, None]
        box_ok &= (bins[None] > lower[:, None]) & (bins[None] <= upper[:, None])
        code_slot = (slot >= BOX_TOKENS) & (slot < BOX_TOKENS + codes)
        code_ok = jnp.broadcast_to(
            (constrained & code_slot)[:, None], (batch, NUM_SEGMENTATION_TOKENS)
        )
        in_label = constrained & (slot == BOX_TOKENS + codes)
        lengths, ends = arrays["lengths"], arrays["ends"]
        cost = (
            lengths - position[:, None] - 1 + jnp.where(ends, 0, arrays["object_rest"][:, None] + 1)
        )
        label_ok = in_label[:, None] & state["alive"] & (lengths > position[:, None])
        label_ok &= cost <= after[:, None]
        tokens = jnp.maximum(self._label_tokens(arrays, state), 0)
        mask = jnp.zeros((batch, self.vocabulary_size), jnp.int32)
        loc, seg = self.location_start, self.segmentation_start
        mask = mask.at[:, loc : loc + NUM_LOCATION_TOKENS].set(box_ok.astype(jnp.int32))
        mask = mask.at[:, seg : seg + NUM_SEGMENTATION_TOKENS].set(code_ok.astype(jnp.int32))
        mask = mask.at[jnp.arange(batch)[:, None], tokens].add(label_ok.astype(jnp.int32))
        no_object = constrained & (slot == 0) & ~state["started"]
        mask = mask.at[:, self.end].add(no_object.astype(jnp.int32))
        return (mask > 0) | ~constrained[:, None]

    def _advance(self, arrays, state, token):
        codes = arrays["codes"]
        slot, position = state["slot"], state["position"]
        in_label = slot == BOX_TOKENS + codes
        matches = state["alive"] & (self._label_tokens(arrays, state) == token[:, None])
        finished = matches & (arrays["lengths"] == position[:, None] + 1) & ~arrays["ends"]
        next_object = in_label & jnp.any(finished, axis=1)
        enters_label = ~in_label & (slot + 1 == BOX_TOKENS + codes)
        alive = jnp.where(in_label[:, None], matches, state["alive"])
        alive = jnp.where(enters_label[:, None], arrays["lengths"] > 0, alive)
        bin_ = token - self.location_start
        return {
            "slot": jnp.where(in_label, jnp.where(next_object, 0, slot), slot + 1),
            "position": jnp.where(in_label & ~next_object, position + 1, 0),
            "alive": alive,
            "y_min": jnp.where(slot == 0, bin_, state["y_min"]),
            "x_min": jnp.where(slot == 1, bin_, state["x_min"]),
            "started": state["started"] | ((slot == 0) & (token != self.end)),
        }


def constrained_logits(logits, allowed):
    """`logits` with the tokens not `allowed` at -inf (big_vision's masking).

    Args:
        logits: float (B, V).
        allowed: bool (B, V) or (1, V).
    """
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))
