"""What every checkpoint format shares: lazy tensor reading and checked assignment.

A format module provides a table of `Rule`s: for each of our variables, the
source tensor name and the function that turns that tensor into our layout.
`load_model` checks every rule against the file before reading anything, so
a mismatched checkpoint fails with one error naming every missing,
unexpected and mis-shaped tensor, and never leaves a half-loaded model.
"""

import dataclasses
import json
import os
import zipfile
from typing import Callable

import jax.numpy as jnp
import keras
import ml_dtypes
import numpy as np
import tqdm
from keras.src.backend.common import global_state
from numpy.lib import format as npy_format


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Our variable `target` (a Keras variable path) comes from `source`."""

    target: str
    source: str
    convert: Callable[[np.ndarray], np.ndarray] = lambda x: x


class LazyTensor:
    """A checkpoint tensor known by shape and dtype, read only by `read()`."""

    def __init__(self, shape, dtype, read):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.read = read


def layer_slice(index):
    """Selects one layer of a tensor stacked along a leading layer axis."""
    return lambda x: x[index]


def read_npz_lazily(path):
    """Maps each member of an `.npz` file to a `LazyTensor`.

    Members stored uncompressed (`np.savez`, as the released checkpoints are)
    are memory-mapped at their offset in the zip when read, one map per
    read, so that a loader dropping each array after use never holds more
    than one tensor's pages. Compressed members are decompressed on read.
    bfloat16 stored as 2-byte void (`V2`) comes back as `ml_dtypes.bfloat16`.
    Nothing is ever unpickled: object arrays are refused.
    """
    path = os.fspath(path)
    tensors = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            file_size = os.fstat(raw.fileno()).st_size
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                if info.compress_type == zipfile.ZIP_STORED:
                    tensors[name] = _stored_member(path, raw, info, file_size)
                else:
                    tensors[name] = _compressed_member(path, archive, info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise _unreadable(path, error) from error
    return tensors


def _unreadable(path, error):
    return CheckpointError(
        f"Cannot read {path!r} as a checkpoint ({error}). The file may be "
        "truncated or corrupt: download it again."
    )


def _stored_member(path, raw, info, file_size):
    # The local file header: 30 fixed bytes, then the name and extra field,
    # whose lengths may differ from the central directory's copy.
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"bad zip header for member {info.filename!r}")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    shape, fortran_order, dtype = _read_npy_header(raw, info.filename)
    offset = raw.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > file_size:
        raise ValueError(
            f"member {info.filename!r} ends at byte {offset + nbytes} but the "
            f"file has {file_size} bytes"
        )
    order = "F" if fortran_order else "C"
    return LazyTensor(
        shape,
        _as_bfloat16_if_void(dtype),
        lambda: _map(path, dtype, offset, shape, order),
    )


def _compressed_member(path, archive, info):
    with archive.open(info) as member:
        shape, _, dtype = _read_npy_header(member, info.filename)

    def read():
        with zipfile.ZipFile(path) as again, again.open(info) as member:
            array = npy_format.read_array(member, allow_pickle=False)
        return array.view(_as_bfloat16_if_void(array.dtype))

    return LazyTensor(shape, _as_bfloat16_if_void(dtype), read)


def _read_npy_header(stream, name):
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version} in {name!r}")
    if dtype.hasobject:
        raise ValueError(f"member {name!r} holds Python objects")
    return shape, fortran_order, dtype


def _map(path, dtype, offset, shape, order="C"):
    if int(np.prod(shape, dtype=np.int64)) == 0:
        array = np.zeros(shape, dtype)
    else:
        array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    return array.view(_as_bfloat16_if_void(dtype))


def _as_bfloat16_if_void(dtype):
    if dtype.kind == "V" and dtype.itemsize == 2:
        return np.dtype(ml_dtypes.bfloat16)
    return dtype


# safetensors dtype names (the format's spec) to numpy.
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors_lazily(path):
    """Maps each tensor of a `.safetensors` file to a `LazyTensor`.

    The header (8-byte length, then JSON with dtype, shape and byte offsets)
    is parsed here and each tensor memory-mapped when read, one map per read:
    `safetensors.safe_open` keeps the whole file mapped while its handle
    lives, so every page read would stay in this process's memory until the
    end of loading. The format has no code to unpickle.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= min(file_size - 8, 100 * 2**20):
                raise ValueError(f"header length {header_len} does not fit the file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as error:
        raise _unreadable(path, error) from error
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as error:
            raise _unreadable(path, f"bad header entry for {name!r}: {error}") from error
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise _unreadable(path, f"{name!r} has {end - begin} bytes for shape {shape}")
        if data_start + end > file_size:
            raise _unreadable(path, f"{name!r} ends past the end of the file")
        tensors[name] = LazyTensor(
            shape,
            dtype,
            lambda dtype=dtype, offset=data_start + begin, shape=shape: _map(
                path, dtype, offset, shape
            ),
        )
    return tensors


def load_model(cls, config, rules, tensors, source_name, ignored=(), progress=None):
    """Builds `cls(**config)` with every variable filled from the checkpoint.

    The model is built without running any initializer (a 3B model's random
    init costs more than reading its checkpoint). The rules are checked
    against the tensors by shape alone (each conversion runs on a
    zero-strided stand-in), so a checkpoint that does not fit fails with one
    error naming every problem before anything is read. Then each tensor is
    read, converted and placed in its variable one at a time: the host holds
    at most one tensor beside the model, and under a `keras.distribution`
    each value goes straight to its shards.

    Args:
        cls: the model class.
        config: its constructor arguments.
        rules: function from the model's config to `Rule`s covering every
            variable.
        tensors: mapping from source names to `LazyTensor`s.
        source_name: the file or directory, for error messages.
        ignored: source names that may be present and are not used.
        progress: show a progress bar (on stderr); None shows one for
            checkpoints over 1 GiB.
    """
    with keras.StatelessScope(initialize_variables=False):
        model = cls(**config)
    variables = {v.path: v for v in model.variables}
    try:
        table = rules(model.get_config())
        _check(table, variables, tensors, source_name, ignored)
        total = sum(_nbytes(v) for v in variables.values())
        show = progress if progress is not None else total > 2**30
        with tqdm.tqdm(
            total=total, unit="B", unit_scale=True, desc="loading", disable=not show
        ) as bar:
            for rule in table:
                variable = variables[rule.target]
                value = rule.convert(tensors[rule.source].read())
                _materialize(variable, value)
                del value  # Unmaps the tensor before the next one is read.
                bar.update(_nbytes(variable))
    except OSError as error:
        raise _unreadable(source_name, error) from error
    finally:
        _forget_pending_initialization(model.variables)
    return model


def _nbytes(variable):
    return int(np.prod(variable.shape, dtype=np.int64)) * np.dtype(variable.dtype).itemsize


def _check(table, variables, tensors, source_name, ignored):
    uncovered = sorted(set(variables) - {r.target for r in table})
    if uncovered:  # A bug in a rule table, not in the user's file.
        raise AssertionError(f"No checkpoint rule for variables {uncovered}")
    missing = sorted({r.source for r in table if r.source not in tensors})
    used = {r.source for r in table} | set(ignored)
    unexpected = sorted(k for k in tensors if k not in used)
    problems = []
    for rule in table:
        if rule.source not in tensors:
            continue
        source_shape = tensors[rule.source].shape
        target_shape = tuple(variables[rule.target].shape)
        stand_in = np.broadcast_to(np.zeros((), np.int8), source_shape)
        try:
            fits = tuple(rule.convert(stand_in).shape) == target_shape
        except (ValueError, IndexError, TypeError):
            fits = False
        if not fits:
            problems.append(
                f"{rule.source} has shape {source_shape}, which does not give "
                f"{rule.target} its shape {target_shape}"
            )
    if missing or unexpected or problems:
        lines = [f"Checkpoint {source_name!r} does not match the model:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(
                f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}"
            )
        for problem in dict.fromkeys(problems):
            lines.append(f"  mis-shaped: {problem}")
        lines.append(
            "  Check that the file is a complete PaliGemma 2 checkpoint and "
            "that any config overrides match it."
        )
        raise CheckpointError("\n".join(lines))


def _materialize(variable, value):
    """Gives a never-initialized Keras variable its first value.

    Uses Keras' own first-value path (`_initialize`), which asks the active
    `keras.distribution` for the variable's layout and places the value
    there. A host array goes to `jax.device_put` as it is, so that each
    device receives only its shard.
    """
    value = np.asarray(value, dtype=np.dtype(variable.dtype))
    if keras.distribution.distribution() is None:
        value = jnp.asarray(value)
    variable._initialize(value)


def _forget_pending_initialization(model_variables):
    """Drops these variables from Keras' list of variables to initialize.

    `StatelessScope(initialize_variables=False)` leaves them on that list;
    a later scope exit would otherwise run their random initializers.
    """
    pending = global_state.get_global_attribute("uninitialized_variables")
    if pending:
        ours = {id(v) for v in model_variables}
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if id(v) not in ours]
        )
