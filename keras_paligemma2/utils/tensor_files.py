"""What every checkpoint format shares: lazy tensor reading and checked assignment.

A format module provides a table of `Rule`s: for each of our variables, the
source tensor name and the function that turns that tensor into our layout.
`load_model` checks every rule against the file before reading anything, so
a mismatched checkpoint fails with one error naming every missing,
unexpected and mis-shaped tensor, and never leaves a half-loaded model.
"""

import json
import os
import zipfile

import keras
import ml_dtypes
import numpy as np
from numpy.lib import format as npy_format

from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.files import atomic_file


class CheckpointError(InputError):
    """A checkpoint that cannot be read or does not fit the model."""


class LazyTensor:
    """A checkpoint tensor known by shape and dtype, read only by `read()`.

    `location` (path, byte offset, byte count), when known, lets the loader
    ask the kernel to read the bytes ahead while it copies other tensors.

    Args:
        shape: iterable of int, the tensor's shape (stored as a tuple).
        dtype: `np.dtype` of the array `read()` returns.
        read: callable with no arguments returning the NumPy array (a memory map, or a
            freshly decompressed array).
        location: None (default), or (path, byte offset, byte count) of the raw bytes.
    """

    def __init__(self, shape, dtype, read, location=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.read = read
        self.location = location

    def prefetch(self, reader=None):
        """Asks the kernel to start reading this tensor into the page cache,
        unless `reader` (a `_FileReader`) will read it around the cache.

        Args:
            reader: None (default), or the `_FileReader` the loader reads with.
        """
        if self.location is None or not hasattr(os, "posix_fadvise"):
            return
        path, offset, nbytes = self.location
        if reader is not None and reader.reads_directly(path, nbytes):
            return
        try:
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # Only a hint.


def read_npz_lazily(path):
    """Maps each member of an `.npz` file to a `LazyTensor`.

    Members stored uncompressed (`np.savez`, as the released checkpoints are)
    are memory-mapped at their offset in the zip when read, one map per
    read, so that a loader dropping each array after use never holds more
    than one tensor's pages. Compressed members are decompressed on read.
    bfloat16 stored as 2-byte void (`V2`) comes back as `ml_dtypes.bfloat16`.
    Nothing is ever unpickled: object arrays are refused.

    Args:
        path: str or path-like, the `.npz` file.

    Returns:
        {member name without ".npy": `LazyTensor`}.

    Raises:
        CheckpointError: the file is not a readable zip of `.npy` members.
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
        raise unreadable_checkpoint(path, error) from error
    return tensors


def unreadable_checkpoint(path, error):
    """The `CheckpointError` for a file that cannot be parsed (to raise, not raised here).

    Args:
        path: str, the file.
        error: the exception or message saying what is wrong.
    """
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
        raise InputError(f"bad zip header for member {info.filename!r}")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    shape, fortran_order, dtype = _read_npy_header(raw, info.filename)
    offset = raw.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > file_size:
        raise InputError(
            f"member {info.filename!r} ends at byte {offset + nbytes} but the "
            f"file has {file_size} bytes"
        )
    order = "F" if fortran_order else "C"
    return LazyTensor(
        shape,
        _as_bfloat16_if_void(dtype),
        lambda: _map(path, dtype, offset, shape, order),
        location=(path, offset, nbytes),
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
        raise InputError(f"unsupported .npy version {version} in {name!r}")
    if dtype.hasobject:
        raise InputError(f"member {name!r} holds Python objects")
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

    Args:
        path: str or path-like, the `.safetensors` file.

    Returns:
        {tensor name: `LazyTensor`} (the `__metadata__` entry skipped).

    Raises:
        CheckpointError: a bad header, unknown dtype, or a tensor past the end of the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= min(file_size - 8, 100 * 2**20):
                raise InputError(f"header length {header_len} does not fit the file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as error:
        raise unreadable_checkpoint(path, error) from error
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
            raise unreadable_checkpoint(path, f"bad header entry for {name!r}: {error}") from error
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise unreadable_checkpoint(path, f"{name!r} has {end - begin} bytes for shape {shape}")
        if data_start + end > file_size:
            raise unreadable_checkpoint(path, f"{name!r} ends past the end of the file")
        tensors[name] = LazyTensor(
            shape,
            dtype,
            lambda dtype=dtype, offset=data_start + begin, shape=shape: _map(
                path, dtype, offset, shape
            ),
            location=(path, data_start + begin, end - begin),
        )
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Writes `{name: array}` as a `.safetensors` file, atomically.

    Written to a temporary file beside `path`, flushed, then renamed over
    it: an interrupted write leaves any previous file untouched. A
    `LazyTensor` value is read only when its bytes are written, and dropped
    after: the header needs only its shape and dtype, so a file of such
    values is written holding one tensor at a time.

    Args:
        path: str or path-like, the file to write.
        tensors: {name: array-like or `LazyTensor`}; dtypes as in `SAFETENSORS_DTYPES`
            (else an InputError).
        metadata: None, or {str: str}, the header's `__metadata__` (transformers reads
            `{"format": "pt"}` there).
    """
    codes = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset, entries = 0, []
    for name, value in tensors.items():
        if not isinstance(value, LazyTensor):
            array = np.asarray(value)
            value = LazyTensor(array.shape, array.dtype, lambda array=array: array)
        dtype = np.dtype(value.dtype)
        if dtype not in codes:
            raise InputError(f"Cannot store {name!r} of dtype {dtype} in safetensors.")
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": codes[dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        entries.append((name, value, dtype))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned
    with atomic_file(path) as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, value, dtype in entries:
            array = np.asarray(value.read())
            if array.shape != value.shape or array.dtype != dtype:
                raise InputError(
                    f"{name!r} was announced as {value.shape} {dtype}, but is "
                    f"{array.shape} {array.dtype}."
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            del array


def _by_path(variables):
    if isinstance(variables, dict):
        return variables
    named = {}
    for variable in variables:
        if variable.path in named:
            raise InputError(f"Two variables share the path {variable.path!r}.")
        named[variable.path] = variable
    return named


def write_state(path, variables):
    """Saves Keras variables (a list, keyed by path, or a {key: variable}
    dict) to a `.safetensors` file, atomically.

    Args:
        path: str or path-like, the file to write.
        variables: list of `keras.Variable` (keyed by `variable.path`, which must be unique),
            or a {key: `keras.Variable`} dict.
    """
    named = _by_path(variables)
    write_safetensors(path, {k: keras.ops.convert_to_numpy(v.value) for k, v in named.items()})


def read_state(path, variables, strict=True):
    """Assigns the values saved by `write_state` to `variables`, by key.

    With `strict`, a variable missing from the file, a saved value with no
    variable, or a shape mismatch is an error naming them all; nothing is
    assigned unless everything matches.

    Args:
        path: str or path-like, a file written by `write_state`.
        variables: list of `keras.Variable` (keyed by path) or {key: `keras.Variable`}, as
            given to `write_state`; saved values are cast to each variable's dtype.
        strict: bool; True (default) also refuses missing and unexpected keys; False assigns
            the keys both have. Shape mismatches are an error either way.

    Raises:
        CheckpointError: naming every mismatch; nothing is assigned then.
    """
    saved = read_safetensors_lazily(path)
    by_path = _by_path(variables)
    missing = sorted(set(by_path) - set(saved))
    unexpected = sorted(set(saved) - set(by_path))
    misshaped = [
        f"{p}: saved {saved[p].shape}, variable {tuple(v.shape)}"
        for p, v in by_path.items()
        if p in saved and tuple(saved[p].shape) != tuple(v.shape)
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing from the file: {missing}")
    if strict and unexpected:
        problems.append(f"in the file but not in the model: {unexpected}")
    if misshaped:
        problems.append(f"shapes differ: {misshaped}")
    if problems:
        raise CheckpointError(f"{path!r} does not match the model; " + "; ".join(problems) + ".")
    for p, variable in by_path.items():
        if p in saved:
            variable.assign(saved[p].read().astype(variable.dtype))
