"""Layouts of PaliGemma 2 weights on a device mesh (`keras.distribution`).

Mesh axes: "batch" (data parallel; with `fsdp=True` it also shards weights,
FSDP / ZeRO-3 style) and "model" (tensor parallel). Every weight gets a
layout that is valid for the mesh it is made for: a dimension is sharded
over an axis only when the axis size divides it, else the next preferred
dimension is tried, else the weight is replicated along that axis. So any
mesh shape works, including a model axis that does not divide the number of
kv heads (keras-hub's Gemma layout fails there with `IndivisibleError`).

Preferences over the model axis (first that divides wins):

    token embedding (V, D)            V, then D   (vocabulary-parallel logits)
    decoder q/k/v (heads, D, H)       heads, H, D
    decoder output (N, H, D)          N, H, D
    decoder gate/up (D, F)            F, D;  down (F, D): F, D
    ViT q/k/v (W, n, h), bias (n, h)  n, h, W
    ViT output (n, h, W)              n, h, W
    ViT mlp_in (W, F), bias (F)       F, W;  mlp_out (F, W): F, W
    patch kernel (p, p, 3, W)         W;  position embedding (P, W): W, P
    image projection (W, D)           D, W

Norm scales, small biases, LoRA adapters and int8 scales are replicated (they
are small); an int8 kernel has its float kernel's path and shape, so the
same layout.
"""

import re

import keras

from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.keras_internals import variable_being_laid_out

MODEL_PREFERENCES = (
    (r"(^|/)token_embedding/embeddings$", (0, 1)),
    (r"decoder_block_\d+/attention/(query|key|value)/kernel$", (0, 2, 1)),
    (r"decoder_block_\d+/attention/output/kernel$", (0, 1, 2)),
    (r"decoder_block_\d+/mlp/(gate|up)/kernel$", (1, 0)),
    (r"decoder_block_\d+/mlp/down/kernel$", (0, 1)),
    (r"vision_encoder/block_\d+/attention/(query|key|value)/kernel$", (1, 2, 0)),
    (r"vision_encoder/block_\d+/attention/(query|key|value)/bias$", (0, 1)),
    (r"vision_encoder/block_\d+/attention/output/kernel$", (0, 1, 2)),
    (r"vision_encoder/block_\d+/mlp_in/kernel$", (1, 0)),
    (r"vision_encoder/block_\d+/mlp_in/bias$", (0,)),
    (r"vision_encoder/block_\d+/mlp_out/kernel$", (0, 1)),
    (r"vision_encoder/patch_embedding/kernel$", (3,)),
    (r"vision_encoder/position_embedding$", (1, 0)),
    (r"(^|/)image_projection/kernel$", (1, 0)),
)
# Weights below this many elements are not sharded over the data axis.
FSDP_MIN_SIZE = 2**14


def variable_layout(path, shape, axis_sizes, model_axis="model", data_axis="batch", fsdp=False):
    """The axis name (or None) for each dimension of one weight.

    Args:
        path: the Keras variable path (`decoder_block_3/mlp/gate/kernel`).
        shape: tuple of int, its shape.
        axis_sizes: {axis name: size} of the mesh; a missing axis counts as size 1.
        model_axis: str, the tensor-parallel mesh axis (default "model").
        data_axis: str, the data-parallel mesh axis (default "batch"), used only with `fsdp`.
        fsdp: bool; also shard the largest remaining divisible dimension over the
            data axis (for training: weights, gradients and optimizer state
            split across data-parallel replicas), for weights of `FSDP_MIN_SIZE`
            elements or more that `MODEL_PREFERENCES` lists (others stay replicated).

    Returns:
        tuple of str or None, one per dimension of `shape`.
    """
    layout = [None] * len(shape)
    model_size = axis_sizes.get(model_axis, 1)
    for pattern, dims in MODEL_PREFERENCES:
        if re.search(pattern, path):
            if model_size > 1:
                for dim in dims:
                    if shape[dim] % model_size == 0:
                        layout[dim] = model_axis
                        break
            break
    else:
        return tuple(layout)  # not a sharded weight: replicated
    data_size = axis_sizes.get(data_axis, 1)
    if fsdp and data_size > 1 and element_count(shape) >= FSDP_MIN_SIZE:
        free = [d for d in range(len(shape)) if layout[d] is None and shape[d] % data_size == 0]
        if free:
            layout[max(free, key=lambda d: shape[d])] = data_axis
    return tuple(layout)


def element_count(shape):
    """The number of elements of an array of `shape`.

    Args:
        shape: iterable of int (1 for `()`).
    """
    total = 1
    for s in shape:
        total *= int(s)
    return total


def layout_map_for(device_mesh, weights, model_axis="model", data_axis="batch", fsdp=False):
    """A `keras.distribution.LayoutMap` with an exact entry for each of
    `weights`, [(variable path, shape)] (see `variable_layout`).

    Args:
        device_mesh: `keras.distribution.DeviceMesh`; it must have both `model_axis` and
            `data_axis` (else a ValueError).
        weights: iterable of (variable path, shape) pairs.
        model_axis: str, the tensor-parallel mesh axis (default "model").
        data_axis: str, the data-parallel mesh axis (default "batch").
        fsdp: bool; also shard large weights over `data_axis` (see `variable_layout`).

    Returns:
        A `PathLayoutMap` (looked up by exact path; unlisted paths are replicated).
    """
    check_axes(device_mesh, model_axis, data_axis)
    axis_sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
    layouts = PathLayoutMap(device_mesh)
    for path, shape in weights:
        layouts[path] = variable_layout(path, shape, axis_sizes, model_axis, data_axis, fsdp)
    return layouts


def check_axes(device_mesh, model_axis, data_axis):
    """Raises a ValueError unless the mesh has both axes.

    Args:
        device_mesh: `keras.distribution.DeviceMesh`.
        model_axis: str, the tensor-parallel axis name.
        data_axis: str, the data-parallel axis name.
    """
    for axis in (model_axis, data_axis):
        if axis not in device_mesh.axis_names:
            raise InputError(
                f"The mesh has axes {tuple(device_mesh.axis_names)}; expected {model_axis!r} "
                f"and {data_axis!r} (or name the mesh's axes for model and data parallelism)."
            )


class ShapeRuleLayoutMap(keras.distribution.LayoutMap):
    """A LayoutMap that decides each weight's layout when Keras creates it,
    from its path and shape by `variable_layout`: no config needed, valid
    for any model and mesh (keras-hub's `get_layout_map(mesh)` form).

    Args:
        device_mesh: `keras.distribution.DeviceMesh` with both axes.
        model_axis: str, the tensor-parallel mesh axis (default "model").
        data_axis: str, the data-parallel mesh axis (default "batch").
        fsdp: bool; also shard large weights over `data_axis`.
    """

    def __init__(self, device_mesh, model_axis="model", data_axis="batch", fsdp=False):
        check_axes(device_mesh, model_axis, data_axis)
        super().__init__(device_mesh)
        self._rule = dict(
            axis_sizes=dict(zip(device_mesh.axis_names, device_mesh.shape)),
            model_axis=model_axis,
            data_axis=data_axis,
            fsdp=fsdp,
        )

    def __getitem__(self, key):
        if key in self._layout_map:
            return self._layout_map[key]
        variable = variable_being_laid_out(key)
        if variable is None:
            return None  # Not a variable being created: replicated, as Keras.
        axes = variable_layout(key, tuple(variable.shape), **self._rule)
        return keras.distribution.TensorLayout(axes, self.device_mesh)


class PathLayoutMap(keras.distribution.LayoutMap):
    """A LayoutMap looked up by exact variable path.

    Keras' LayoutMap tries every key as a regular expression when a path is
    not a key, which for the 1,000+ weights of the large models (and the
    LoRA / int8 variables made later, not listed here) costs seconds; a path
    that is not listed is replicated, as in Keras.
    """

    def __getitem__(self, key):
        return self._layout_map.get(key)
