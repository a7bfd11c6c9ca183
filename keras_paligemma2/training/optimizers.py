"""big_vision's optimizer chain as a Keras optimizer, its schedule and decay mask."""

import math
import re

import keras
from keras import ops

from keras_paligemma2.checkpoints.big_vision import big_vision_name
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.keras_internals import optimizer_slot


def big_vision_warmup_steps(total_steps, warmup_fraction):
    """Warmup steps as big_vision's `utils.steps("warmup", ...)` counts a
    `warmup_percent`: rounded (half to even), at least 1 when non-zero.

    Args:
        total_steps: int, the number of updates.
        warmup_fraction: float in [0, 1), the warmup share of `total_steps`.
    """
    steps = total_steps * warmup_fraction
    return max(1, round(steps)) if steps else 0


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class BigVisionSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """big_vision's `utils.create_learning_rate_schedule` ("cosine"), times
    a peak rate.

    `rate(c) = peak * 0.5 * (1 + cos(pi * clip((c - w) / (T - w), 0, 1)))
    * min(1, c / w)` at update count c (0 for the first update, so the first
    update moves nothing while a warmup runs, as in big_vision).

    Args:
        total_steps: int, T, the number of updates.
        peak: float, the rate at the end of the warmup (1.0 gives
            big_vision's multiplier itself).
        warmup_steps: int, w; big_vision requires w < T (or T <= 1).
    """

    def __init__(self, total_steps, peak=1.0, warmup_steps=0):
        total_steps, warmup_steps = int(total_steps), int(warmup_steps)
        if total_steps < 1:
            raise InputError(f"total_steps must be at least 1; got {total_steps}.")
        if total_steps > 1 and not 0 <= warmup_steps < total_steps:
            raise InputError(
                f"warmup_steps ({warmup_steps}) must be below total_steps ({total_steps})."
            )
        self.total_steps = total_steps
        self.peak = float(peak)
        self.warmup_steps = warmup_steps

    def multiplier(self, step):
        """big_vision's schedule multiplier at `step`, without the peak.

        Args:
            step: int or int tensor, the update count c (0-based).

        Returns:
            float32 scalar tensor in [0, 1].
        """
        step = ops.cast(step, "float32")
        warmup = float(self.warmup_steps)
        progress = (step - warmup) / float(self.total_steps - warmup or 1)
        value = 0.5 * (1.0 + ops.cos(math.pi * ops.clip(progress, 0.0, 1.0)))
        if self.warmup_steps:
            value = value * ops.minimum(1.0, step / warmup)
        return value

    def __call__(self, step):
        return self.peak * self.multiplier(step)

    def get_config(self):
        return dict(total_steps=self.total_steps, peak=self.peak, warmup_steps=self.warmup_steps)


def big_vision_schedule(total_steps, learning_rate=3e-5, warmup_fraction=0.05):
    """Linear warmup over `warmup_fraction` of the steps, then cosine to 0,
    as big_vision's PaliGemma transfer configs (`decay_type="cosine"`,
    `warmup_percent`).

    Args:
        total_steps: int, the number of updates.
        learning_rate: float, the peak rate (default 3e-5).
        warmup_fraction: float, big_vision's `warmup_percent` (default 0.05).

    Returns:
        A `BigVisionSchedule`.
    """
    return BigVisionSchedule(
        total_steps, learning_rate, big_vision_warmup_steps(int(total_steps), warmup_fraction)
    )


# big_vision's default `wd_mults`: only parameters whose big_vision name ends
# in "/kernel" decay, i.e. the ViT's and the projection's kernels, not
# Gemma's einsum weights, embeddings, norms or biases.
BIG_VISION_DECAY_MULTS = ((r".*/kernel$", 1.0),)


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class BigVisionAdam(keras.optimizers.Optimizer):
    """big_vision's optimizer chain (`big_vision/optax.py` `make`) for Adam.

    Each update, with c the number of updates so far and s(c) the schedule
    multiplier (`BigVisionSchedule`, 1 at its peak):

        g = clip_by_global_norm(gradients, global_clipnorm)   # optax's
        adam = m_hat / (sqrt(v_hat + epsilon_root) + epsilon)  # optax scale_by_adam
        p -= s(c) * (learning_rate * adam + weight_decay * mult(p) * p)

    Weight decay is decoupled and scaled by the schedule, not by the
    learning rate (big_vision's configs therefore write wd = 0.1 x lr), and
    applies to the parameters `weight_decay_mults` names: (regex, mult)
    pairs matched in full against each parameter's big_vision name, the
    first match deciding, as big_vision's `wd_mults`. Adam's epsilon is added
    to the bias-corrected second moment's root (optax), not to the raw one
    (Keras' `Adam`, 1e-7).

    Args:
        total_steps: int, the number of updates (the schedule's length).
        learning_rate: float, the peak learning rate (`config.lr`).
        warmup_fraction: float, big_vision's `warmup_percent`.
        weight_decay: float, `config.wd` (0 for none).
        weight_decay_mults: (regex, float) pairs over big_vision parameter
            names (`BIG_VISION_DECAY_MULTS` by default), or a function from
            a Keras variable to its multiplier. Variables with no big_vision
            name (LoRA adapters) match no pattern and never decay.
        global_clipnorm: float or None, `config.grad_clip_norm`.
        beta_1: float, Adam's b1 (0.9).
        beta_2: float, Adam's b2 (0.999, the PaliGemma configs').
        epsilon: float, optax's eps (1e-8).
        epsilon_root: float, optax's eps_root (0).
        mu_dtype: None (the variable's dtype), or the dtype Adam's first
            moment is stored in between steps ("bfloat16": half its bytes),
            as optax's `scale_by_adam(mu_dtype=)` (`config.optax.mu_dtype`):
            each update is computed from the moment before it is rounded.
        gradient_accumulation_steps: int or None; updates then happen every
            that many steps, with the mean gradient, and the schedule counts
            updates.
        name: str (default "big_vision_adam").
        **kwargs: passed to `keras.optimizers.Optimizer` (e.g. `use_ema`,
            `loss_scale_factor`); `clipnorm`, `clipvalue` and
            `weight_decay_decouple` are a ValueError.
    """

    def __init__(
        self,
        total_steps,
        learning_rate=3e-5,
        warmup_fraction=0.05,
        weight_decay=0.0,
        weight_decay_mults=BIG_VISION_DECAY_MULTS,
        global_clipnorm=1.0,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        epsilon_root=0.0,
        mu_dtype=None,
        gradient_accumulation_steps=None,
        name="big_vision_adam",
        **kwargs,
    ):
        for unsupported in ("clipnorm", "clipvalue", "weight_decay_decouple"):
            if kwargs.pop(unsupported, None) is not None:
                raise InputError(
                    f"BigVisionAdam takes no {unsupported}: big_vision clips by global norm."
                )
        schedule = big_vision_schedule(total_steps, learning_rate, warmup_fraction)
        super().__init__(
            learning_rate=schedule,
            name=name,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.peak_learning_rate = float(learning_rate)
        self.warmup_fraction = float(warmup_fraction)
        self.bv_weight_decay = float(weight_decay or 0.0)
        self.weight_decay_mults = (
            weight_decay_mults
            if callable(weight_decay_mults)
            else tuple((str(p), float(m)) for p, m in weight_decay_mults)
        )
        self.bv_global_clipnorm = global_clipnorm
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.epsilon_root = epsilon_root
        self.mu_dtype = None if mu_dtype is None else keras.backend.standardize_dtype(mu_dtype)

    def decay_multiplier(self, variable):
        """The weight-decay multiplier of `variable` (0: not decayed).

        Args:
            variable: a Keras variable of the model (its `path` is matched).
        """
        if callable(self.weight_decay_mults):
            return float(self.weight_decay_mults(variable))
        name = big_vision_name(variable.path)
        if name is None:
            return 0.0
        for pattern, mult in self.weight_decay_mults:
            if re.fullmatch(pattern, name):
                return mult
        return 0.0

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        # Keras Adam's slot names, so that training states saved with the
        # earlier Adam-based recipe still restore.
        if self.mu_dtype is None:
            self._mu, self._nu = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        else:
            self._mu = [optimizer_slot(self, v, "momentum", self.mu_dtype) for v in var_list]
            self._nu = self.add_optimizer_variables(var_list, "velocity")
        self._decay = {v.path: self.decay_multiplier(v) for v in var_list}

    def _clip_gradients(self, grads):
        # optax.clip_by_global_norm: kept below the norm, else g / |g| * norm.
        # Keras calls this once per update, after any accumulation.
        if not self.bv_global_clipnorm:
            return grads
        present = [g for g in grads if g is not None]
        norm = ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in present))
        limit = float(self.bv_global_clipnorm)
        return [
            None
            if g is None
            else ops.where(norm < limit, g, g / ops.cast(norm, g.dtype) * ops.cast(limit, g.dtype))
            for g in grads
        ]

    def update_step(self, gradient, variable, learning_rate):
        """One Adam update of `variable`, with decoupled, scheduled decay.

        Args:
            gradient: tensor shaped as `variable`, clipped (and averaged when
                accumulating) by Keras.
            variable: the Keras variable to update.
            learning_rate: the schedule's current rate, from Keras; unused
                (the peak rate and `schedule.multiplier` are applied apart).
        """
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        # Updates so far (on JAX, Keras restores `iterations` with the other
        # optimizer variables on accumulating steps, so it counts updates).
        count = self.iterations
        t = ops.cast(count + 1, dtype)
        mu = self._mu[self._get_variable_index(variable)]
        nu = self._nu[self._get_variable_index(variable)]
        # optax's order: the new moments in the variable's dtype, the update
        # from them, the first moment rounded to `mu_dtype` only when stored.
        # (optax multiplies the stored moment by b1 in its own dtype.)
        decayed_mu = ops.cast(ops.multiply(mu.value, ops.cast(self.beta_1, mu.dtype)), dtype)
        new_mu = (1.0 - self.beta_1) * gradient + decayed_mu
        new_nu = (1.0 - self.beta_2) * ops.square(gradient) + self.beta_2 * nu
        self.assign(mu, ops.cast(new_mu, mu.dtype))
        self.assign(nu, new_nu)
        mu_hat = new_mu / (1.0 - ops.power(ops.cast(self.beta_1, dtype), t))
        nu_hat = new_nu / (1.0 - ops.power(ops.cast(self.beta_2, dtype), t))
        update = mu_hat / (ops.sqrt(nu_hat + self.epsilon_root) + self.epsilon)
        update = update * ops.cast(self.peak_learning_rate, dtype)
        mult = self._decay.get(variable.path, 0.0)
        if self.bv_weight_decay and mult:
            update = update + ops.cast(self.bv_weight_decay * mult, dtype) * variable
        update = update * ops.cast(self.schedule.multiplier(count), dtype)
        self.assign_sub(variable, update)

    def get_config(self):
        config = super().get_config()
        config.pop("learning_rate", None)
        if callable(self.weight_decay_mults):
            raise InputError(
                "A BigVisionAdam with a function for weight_decay_mults cannot be serialised."
            )
        config.update(
            total_steps=self.total_steps,
            learning_rate=self.peak_learning_rate,
            warmup_fraction=self.warmup_fraction,
            weight_decay=self.bv_weight_decay,
            weight_decay_mults=[list(m) for m in self.weight_decay_mults],
            global_clipnorm=self.bv_global_clipnorm,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            epsilon_root=self.epsilon_root,
            mu_dtype=self.mu_dtype,
        )
        return config


def big_vision_optimizer(total_steps, **kwargs):
    """big_vision's PaliGemma transfer recipe: a `BigVisionAdam`, whose
    defaults are its transfer configs' (`optax_name="scale_by_adam"`, b2
    0.999, `grad_clip_norm=1.0`, cosine schedule with `warmup_percent`,
    `wd` decoupled and scaled by the schedule). Keyword arguments as
    `BigVisionAdam` (`learning_rate`, `warmup_fraction`, `weight_decay`,
    `weight_decay_mults`, `gradient_accumulation_steps`, ...).

    Args:
        total_steps: int, the number of updates (the schedule's length).
        **kwargs: passed to `BigVisionAdam`.
    """
    return BigVisionAdam(total_steps, **kwargs)
