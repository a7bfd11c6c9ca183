"""Layouts for a config or preset over a device mesh, and the meshes a device count allows."""

import json

import keras

from keras_paligemma2.checkpoints.presets import preset_config
from keras_paligemma2.models.backbone import PaliGemma2Backbone
from keras_paligemma2.models.layouts import layout_map_for


def resolve_config(config):
    """A config dict, from a dict or a registered or shipped preset name, or a preset directory.

    Args:
        config: dict of backbone constructor arguments, or a registered or
            shipped preset name, or a Keras preset directory.

    Returns:
        A new dict (a copy when `config` is a dict).
    """
    if isinstance(config, str):
        return preset_config(config)
    return dict(config)


def model_weights(config):
    """[(path, shape)] of every weight of a backbone with `config` (a dict or
    a preset name), found without allocating anything.

    Args:
        config: dict of backbone constructor arguments, or a registered or
            shipped preset name, or a Keras preset directory.
    """
    config = resolve_config(config)
    try:
        key = json.dumps(config, sort_keys=True)
    except TypeError:  # e.g. a DTypePolicy object as dtype: no cache
        return PaliGemma2Backbone.weight_shapes(config)
    if key not in _WEIGHTS:
        # Tracing the backbone's construction takes ~1.4 s at PaliGemma 2's
        # sizes; the planner and `plan`'s what-would-fit search ask for the
        # same config many times.
        _WEIGHTS[key] = tuple(PaliGemma2Backbone.weight_shapes(config))
    return list(_WEIGHTS[key])


_WEIGHTS = {}  # json of a config -> its ((path, shape), ...)


def layout_map(device_mesh, config, model_axis="model", data_axis="batch", fsdp=False):
    """A `keras.distribution.LayoutMap` with an exact entry for every weight
    of the backbone `config` describes (see `keras_paligemma2.models.layouts.variable_layout`).

    Args:
        device_mesh: `keras.distribution.DeviceMesh` with both `model_axis` and
            `data_axis` among its axis names (else a ValueError).
        config: dict of backbone constructor arguments, or a registered or
            shipped preset name, or a Keras preset directory.
        model_axis: str, the tensor-parallel mesh axis (default "model").
        data_axis: str, the data-parallel mesh axis (default "batch").
        fsdp: bool; also shard large weights over `data_axis` (default False).
    """
    return layout_map_for(device_mesh, model_weights(config), model_axis, data_axis, fsdp)


def model_parallel(config, mesh_shape, devices=None, fsdp=False):
    """A `keras.distribution.ModelParallel` over a ("batch", "model") mesh of
    `mesh_shape`, with `layout_map` for `config`. Set it with
    `keras.distribution.set_distribution(...)` before building or loading.

    Args:
        config: dict of backbone constructor arguments, or a registered or
            shipped preset name, or a Keras preset directory.
        mesh_shape: (data, model) ints, the mesh's axis sizes; their product
            must be the number of devices.
        devices: list of Keras device names or None (every device,
            `keras.distribution.list_devices()`).
        fsdp: bool; also shard large weights over the "batch" axis (default False).
    """
    mesh = keras.distribution.DeviceMesh(
        tuple(mesh_shape), ("batch", "model"), devices=devices or keras.distribution.list_devices()
    )
    config = resolve_config(config)
    return keras.distribution.ModelParallel(
        layout_map=layout_map(mesh, config, fsdp=fsdp), batch_dim_name="batch"
    )


def meshes(count, batch_size):
    """(data, model) shapes using `count` devices, most data-parallel first;
    the data axis must divide the batch.

    Args:
        count: int, the number of devices.
        batch_size: int, the global batch size.

    Returns:
        A list of (data, model) int pairs with data * model == count.
    """
    return [
        (count // model, model)
        for model in range(1, count + 1)
        if count % model == 0 and batch_size % (count // model) == 0
    ]
