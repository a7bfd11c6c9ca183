"""Every use of Keras' and keras-hub's private internals, in one place.

When Keras or keras-hub changes, this is the module to check: nothing else
in the package reaches past their public API. Each function says what it
relies on and why the public API does not do it.
"""

import contextlib
import sys
import types

import keras_hub
from keras import ops
from keras.src.backend.common import global_state
from keras.src.quantizers import gptq as keras_gptq
from keras.src.quantizers.gptq import GPTQ
from keras.src.quantizers.gptq import _stable_permutation
from keras.src.quantizers.quantizers import compute_quantization_parameters
from keras.src.quantizers.quantizers import dequantize_with_zero_point
from keras.src.quantizers.quantizers import quantize_with_zero_point
from keras.src.quantizers.utils import should_quantize_layer
from keras_hub.src.utils import preset_utils


def forget_pending_initialization(model_variables):
    """Drops these variables from Keras' list of variables to initialize.

    `StatelessScope(initialize_variables=False)` leaves them on that list
    (Keras' global attribute `uninitialized_variables`); a later scope exit
    would otherwise run their random initializers.

    Args:
        model_variables: list of `keras.Variable`, built in such a scope.
    """
    pending = global_state.get_global_attribute("uninitialized_variables")
    if pending:
        ours = {id(v) for v in model_variables}
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if id(v) not in ours]
        )


def initialize_variable(variable, value):
    """Gives a variable built without a value its first value.

    Keras' first-value path (`Variable._initialize`) places the value by the
    variable's layout, straight into its shards under a distribution;
    `assign` would need a value to exist first.

    Args:
        variable: `keras.Variable` built under
            `StatelessScope(initialize_variables=False)`.
        value: array of the variable's shape and dtype.
    """
    variable._initialize(value)


def initialize_layout(variable):
    """Resolves a valueless variable's layout from the current distribution
    (`Variable._initialize_layout`), as Keras does before a first value, so
    that a later `assign` places each value into its shards.

    Args:
        variable: `keras.Variable` built without a value.
    """
    variable._initialize_layout()


def has_value(variable):
    """Whether a variable built without a value has been given one
    (`Variable._value`).

    Args:
        variable: `keras.Variable`.
    """
    return variable._value is not None


def keras_hub_backbone_from_preset(cls, preset, **kwargs):
    """keras-hub's own `Backbone.from_preset` run for `cls`, bypassing the
    `from_preset` that `cls` defines (the bound method's `__func__`): our
    backbone's `from_preset` dispatches over formats and calls this for
    Keras preset directories.

    Args:
        cls: the backbone class to build.
        preset: str, a Keras preset directory or handle.
        **kwargs: keras-hub's `from_preset` arguments (`load_weights`, config
            overrides).
    """
    return keras_hub.models.Backbone.from_preset.__func__(cls, preset, **kwargs)


def read_preset_config(preset, config_file="config.json"):
    """A Keras preset's JSON file as a dict (keras-hub's
    `preset_utils.load_json`), without building its model.

    Args:
        preset: str, a Keras preset directory or handle.
        config_file: str, the file's name in the preset.
    """
    return preset_utils.load_json(preset, config_file)


def preset_file_exists(preset, name):
    """Whether a Keras preset holds a file (`preset_utils.check_file_exists`).

    Args:
        preset: str, a Keras preset directory or handle.
        name: str, a file name inside it.
    """
    return preset_utils.check_file_exists(preset, name)


def preset_file(preset, name):
    """Local path of a file of a Keras preset, downloading it if needed
    (`preset_utils.get_file`).

    Args:
        preset: str, a Keras preset directory or handle.
        name: str, a file name inside it.
    """
    return preset_utils.get_file(preset, name)


def load_preset_weights(model, preset):
    """Assigns a Keras preset's weights file to `model`, one tensor at a time
    (keras-hub's preset loader's `_load_backbone_weights`, which handles
    sharded weight files).

    Args:
        model: the backbone the preset describes.
        preset: str, a Keras preset directory or handle.
    """
    preset_utils.get_preset_loader(preset)._load_backbone_weights(model)


def load_preset_preprocessor(preset, cls):
    """The preprocessor a Keras preset saved, as `cls` (keras-hub's preset
    loader).

    Args:
        preset: str, a Keras preset directory or handle.
        cls: the preprocessor class.
    """
    return preset_utils.get_preset_loader(preset).load_preprocessor(cls)


def set_initial_epoch(model, epoch):
    """Makes the running `fit` continue after `epoch` (`Model._initial_epoch`,
    which `fit` reads at its start; Keras' own `BackupAndRestore` sets it too).

    Args:
        model: the `keras.Model` being fitted.
        epoch: int, the number of epochs already done.
    """
    model._initial_epoch = epoch


def release_value(variable):
    """Drops a variable's value (`Variable._value = None`) so that its memory
    is freed while the model it belongs to is a temporary being converted;
    Keras has no public way to empty a variable.

    Args:
        variable: `keras.Variable` that will not be used again.
    """
    variable._value = None


def variable_being_laid_out(path, max_depth=8):
    """The `keras.Variable` whose layout Keras is asking a LayoutMap for.

    `ModelParallel.get_variable_layout(variable)` looks its layout map up by
    `variable.path` alone; a layout that depends on the shape (shard a
    dimension only where the mesh axis divides it) needs the variable too,
    so this reads it from that caller's frame (its local `variable`).

    Args:
        path: str, the path being looked up (the variable's must match).
        max_depth: int, how many caller frames to search (default 8).

    Returns:
        The variable, or None when the lookup does not come from Keras'
        variable creation (then the caller knows no shape).
    """
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("variable")
        if getattr(candidate, "path", None) == path and hasattr(candidate, "shape"):
            return candidate
    return None


def base_kernel(layer):
    """The float kernel variable of a LoRA-enabled Keras `Dense` /
    `EinsumDense`, without the adapters: Keras' public `kernel` property
    returns `kernel + A @ B * alpha / rank`, a full new matrix.

    Args:
        layer: a built `keras.layers.Dense` or `keras.layers.EinsumDense`.
    """
    return layer._kernel


def remove_lora_adapters(layer):
    """Deletes a layer's `lora_kernel_a` / `_b` (Keras untracks a variable
    attribute when it is deleted, which its tracker must allow) and turns
    LoRA off.

    Args:
        layer: a LoRA-enabled Keras `Dense` or `EinsumDense`.
    """
    layer._tracker.unlock()
    del layer.lora_kernel_a
    del layer.lora_kernel_b
    layer._tracker.lock()
    layer.lora_enabled = False


def optimizer_slot(optimizer, reference, name, dtype):
    """An optimizer variable shaped and laid out as `reference`, in `dtype`.

    Keras' `add_variable_from_reference` names and lays out the slot but
    takes the reference's dtype; its layout is the private `_layout`.

    Args:
        optimizer: the `keras.optimizers.Optimizer` building its state.
        reference: the model variable the slot follows.
        name: str, the slot's name prefix (Keras' naming: path, then name).
        dtype: str, the slot's dtype.
    """
    return optimizer.add_variable(
        shape=reference.shape,
        initializer="zeros",
        dtype=dtype,
        name=f"{reference.path.replace('/', '_')}_{name}",
        layout=getattr(reference, "_layout", None),
    )


def gptq_solver(layer, config, kernel_matrix):
    """Keras' GPTQ solver (`keras.src.quantizers.gptq.GPTQ`, not public)
    for a layer put in "gptq" mode, reading the kernel as `kernel_matrix`
    (rows: contracted input features): for a 3-D kernel the solver guesses
    the layout from the largest axis (see `projections.EinsumDense`).

    Args:
        layer: a Keras `Dense` / `EinsumDense` after `quantize("gptq")`.
        config: `keras.quantizers.GPTQConfig`.
        kernel_matrix: the float kernel as (rows, columns).

    Returns:
        The solver: `update_hessian_with_batch(x (n, rows))`, then
        `quantize_and_correct_layer()` writes the layer's GPTQ variables.
    """
    solver = GPTQ(layer, config)
    solver.rows, solver.columns = (int(n) for n in kernel_matrix.shape)
    solver.layer = types.SimpleNamespace(kernel=kernel_matrix)
    solver.hessian = ops.zeros((solver.rows, solver.rows), "float32")
    return solver


def should_quantize(layer, filters):
    """Keras' reading of `Model.quantize`'s `filters` for one layer
    (`keras.src.quantizers.utils.should_quantize_layer`): a regex on the
    layer's name, a list of them, a callable, or None (every layer).

    Args:
        layer: a Keras layer.
        filters: as `Model.quantize` takes them.
    """
    return should_quantize_layer(layer, filters)


# Keras' GPTQ arithmetic, for `calibration.gptq_matrix` to compute the same
# values: the zero-point quantiser and its inverse, the stable order of
# activation-order GPTQ; the scale and zero its quantiser's `find_params`
# computes.
gptq_scale_and_zero = compute_quantization_parameters
gptq_quantize_column = quantize_with_zero_point
gptq_dequantize_column = dequantize_with_zero_point
gptq_column_order = _stable_permutation


@contextlib.contextmanager
def gptq_column_solver(function):
    """While open, Keras' `GPTQ.quantize_and_correct_layer` (its Hessian
    damping, inverse, int4 packing and variable writes) solves the columns
    with `function` instead of Keras' `gptq_quantize_matrix` (same
    signature), which it looks up by module name.

    Args:
        function: a drop-in for `keras.src.quantizers.gptq.gptq_quantize_matrix`.
    """
    original = keras_gptq.gptq_quantize_matrix
    keras_gptq.gptq_quantize_matrix = function
    try:
        yield
    finally:
        keras_gptq.gptq_quantize_matrix = original


def keras_gptq_matrix(*args, **kwargs):
    """Keras' own `gptq_quantize_matrix` (the reference `gptq_matrix` is
    tested against).

    Args:
        *args: its positional arguments.
        **kwargs: its keyword arguments.
    """
    return keras_gptq.gptq_quantize_matrix(*args, **kwargs)
