"""What every checkpoint format shares: lazy tensor reading and checked assignment.

A format module provides a table of `Rule`s: for each of our variables, the
source tensor name and the function that turns that tensor into our layout.
`assign_weights` checks every rule against the file before writing anything,
so a mismatched checkpoint fails with one error naming every missing,
unexpected and mis-shaped tensor, and never leaves a half-loaded model.
"""

import dataclasses
import os
import zipfile
from typing import Callable

import ml_dtypes
import numpy as np
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
    are memory-mapped at their offset in the zip, so a tensor is read only
    when used. Compressed members are read whole. bfloat16 stored as 2-byte
    void (`V2`) is reinterpreted as `ml_dtypes.bfloat16`. Nothing is ever
    unpickled: object arrays are refused.
    """
    path = os.fspath(path)
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            file_size = os.fstat(raw.fileno()).st_size
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                if info.compress_type == zipfile.ZIP_STORED:
                    array = _mmap_stored_member(path, raw, info, file_size)
                else:
                    with archive.open(info) as member:
                        array = npy_format.read_array(member, allow_pickle=False)
                array = _as_bfloat16_if_void(array)
                arrays[name] = LazyTensor(
                    array.shape, array.dtype, lambda array=array: array
                )
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise CheckpointError(
            f"Cannot read {path!r} as an .npz checkpoint ({error}). The file "
            "may be truncated or corrupt: download it again."
        ) from error
    return arrays


def _mmap_stored_member(path, raw, info, file_size):
    # The local file header: 30 fixed bytes, then the name and extra field,
    # whose lengths may differ from the central directory's copy.
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"bad zip header for member {info.filename!r}")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    version = npy_format.read_magic(raw)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(raw)
    elif version == (2, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(raw)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError(f"member {info.filename!r} holds Python objects")
    offset = raw.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > file_size:
        raise ValueError(
            f"member {info.filename!r} ends at byte {offset + nbytes} but the "
            f"file has {file_size} bytes"
        )
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(
        path,
        dtype=dtype,
        mode="r",
        offset=offset,
        shape=shape,
        order="F" if fortran_order else "C",
    )


def _as_bfloat16_if_void(array):
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        return array.view(ml_dtypes.bfloat16)
    return array


def assign_weights(model, rules, tensors, source_name, ignored=()):
    """Checks all `rules` against `tensors`, then assigns them to `model`.

    The check uses shapes only (each conversion runs on a zero-strided
    stand-in), so nothing is read before the whole checkpoint is known to
    fit. Then each tensor is read, converted and assigned one at a time, so
    the host holds at most one converted tensor beside the model.

    Args:
        model: a built Keras model.
        rules: `Rule`s covering every variable of `model`.
        tensors: mapping from source names to `LazyTensor`s.
        source_name: the file or directory, for error messages.
        ignored: source names that may be present and are not used.
    """
    variables = {v.path: v for v in model.weights}
    uncovered = sorted(set(variables) - {r.target for r in rules})
    if uncovered:  # A bug in a rule table, not in the user's file.
        raise AssertionError(f"No checkpoint rule for variables {uncovered}")
    missing = sorted({r.source for r in rules if r.source not in tensors})
    used = {r.source for r in rules} | set(ignored)
    unexpected = sorted(k for k in tensors if k not in used)
    problems = []
    for rule in rules:
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
    for rule in rules:
        variable = variables[rule.target]
        value = rule.convert(tensors[rule.source].read())
        variable.assign(np.asarray(value).astype(variable.dtype))
