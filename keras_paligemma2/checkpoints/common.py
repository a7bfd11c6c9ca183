"""What every checkpoint format shares: lazy tensor reading and checked assignment.

A format module provides a table of `Rule`s: for each of our variables, the
source tensor name and the function that turns that tensor into our layout.
`load_model` checks every rule against the file before reading anything, so
a mismatched checkpoint fails with one error naming every missing,
unexpected and mis-shaped tensor, and never leaves a half-loaded model.
"""

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import json
import mmap
import os
import threading
import zipfile
from typing import Callable

import jax
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
    """A checkpoint tensor known by shape and dtype, read only by `read()`.

    `location` (path, byte offset, byte count), when known, lets the loader
    ask the kernel to read the bytes ahead while it copies other tensors.
    """

    def __init__(self, shape, dtype, read, location=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.read = read
        self.location = location

    def prefetch(self, reader=None):
        """Asks the kernel to start reading this tensor into the page cache,
        unless `reader` (a `_FileReader`) will read it around the cache."""
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
            location=(path, data_start + begin, end - begin),
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
        # In file order, so that the disk reads sequentially (the layers of a
        # stacked tensor are consecutive).
        table = sorted(table, key=lambda r: _file_position(tensors[r.source]))
        total = sum(_nbytes(v) for v in variables.values())
        show = progress if progress is not None else total > 2**30
        # Two workers read and convert the next tensors while this thread
        # hands finished ones to their variables; at most `window` tensors
        # are in flight beside the model.
        window = 3
        with (
            tqdm.tqdm(
                total=total, unit="B", unit_scale=True, desc="loading", disable=not show
            ) as bar,
            concurrent.futures.ThreadPoolExecutor(2) as workers,
            contextlib.ExitStack() as stack,
        ):
            reader = stack.enter_context(contextlib.closing(_FileReader()))
            pending = collections.deque()
            prefetched = set()
            for rule in table + [None] * window:
                if rule is not None:
                    if rule.source not in prefetched:
                        # Kernel readahead hint (skipped for direct reads).
                        tensors[rule.source].prefetch(reader)
                        prefetched.add(rule.source)
                    variable = variables[rule.target]
                    pending.append(
                        (
                            variable,
                            workers.submit(
                                _device_value, rule, tensors[rule.source], variable, reader
                            ),
                        )
                    )
                if len(pending) > window or (rule is None and pending):
                    variable, future = pending.popleft()
                    variable._initialize(future.result())
                    bar.update(_nbytes(variable))
    except OSError as error:
        raise _unreadable(source_name, error) from error
    finally:
        forget_pending_initialization(model.variables)
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
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        for problem in dict.fromkeys(problems):
            lines.append(f"  mis-shaped: {problem}")
        lines.append(
            "  Check that the file is a complete PaliGemma 2 checkpoint and "
            "that any config overrides match it."
        )
        raise CheckpointError("\n".join(lines))


class _FileReader:
    """Positional reads through one descriptor per file, shared by threads.

    `os.preadv` needs no seek, so the two reader threads share a descriptor
    without a lock around each read; the file is opened once per load rather
    than once per tensor.

    Reads of `_DIRECT_MIN_BYTES` or more bypass the page cache (`O_DIRECT`)
    where the file system allows it: the disk writes straight into the
    buffer that becomes the variable, instead of into page-cache pages that
    are then copied. A cold 6 GB read into fresh memory took 3.7-4.6 s that
    way against 8.6-9.5 s through the cache (2-core VM), and the host does
    not hold a second, cached copy of the checkpoint beside the model. A
    file system that refuses `O_DIRECT` gets ordinary reads.
    """

    def __init__(self):
        self.descriptors = {}
        self.direct_descriptors = {}  # path -> O_DIRECT descriptor, or None
        self.lock = threading.Lock()

    def _descriptor(self, path):
        with self.lock:
            if path not in self.descriptors:
                descriptor = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self.descriptors[path] = descriptor
            return self.descriptors[path]

    def _direct_descriptor(self, path):
        if not hasattr(os, "O_DIRECT"):
            return None
        with self.lock:
            if path not in self.direct_descriptors:
                try:
                    self.direct_descriptors[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    self.direct_descriptors[path] = None
            return self.direct_descriptors[path]

    def reads_directly(self, path, nbytes):
        """Whether a read of `nbytes` from `path` would bypass the page cache."""
        return nbytes >= _DIRECT_MIN_BYTES and self._direct_descriptor(path) is not None

    def read_array(self, path, offset, dtype, shape):
        """`shape` x `dtype` from byte `offset` of `path`, in a new 64-byte-aligned array."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self.reads_directly(path, nbytes):
            try:
                buffer = self._read_direct(path, offset, nbytes)
                return buffer.view(dtype).reshape(shape)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                # Alignment rules this file system has and we did not meet:
                # ordinary reads for this file from now on.
                with self.lock:
                    self.direct_descriptors[path] = None
        buffer = _host_buffer(nbytes)
        self.read_into(path, offset, buffer)
        return buffer.view(dtype).reshape(shape)

    def read_into(self, path, offset, buffer):
        descriptor = self._descriptor(path)
        target = memoryview(buffer).cast("B")
        done = 0
        while done < len(target):
            count = os.preadv(descriptor, [target[done:]], offset + done)
            if not count:
                raise OSError(f"{path} ended while reading {len(target)} bytes at {offset}")
            done += count

    def _read_direct(self, path, offset, nbytes):
        # O_DIRECT wants the file offset, the length and the buffer address
        # aligned to the device's block size (4096 covers the usual 512 and
        # 4096): read the aligned span around the tensor into a page-aligned
        # map, then move the tensor's bytes down to its start, in place.
        descriptor = self._direct_descriptor(path)
        begin = offset - offset % _DIRECT_ALIGNMENT
        skip = offset - begin
        length = -(-(skip + nbytes) // _DIRECT_ALIGNMENT) * _DIRECT_ALIGNMENT
        storage = mmap.mmap(-1, length)
        target = memoryview(storage)
        done = 0
        try:
            while done < skip + nbytes:
                count = os.preadv(descriptor, [target[done:]], begin + done)
                if not count:
                    raise OSError(f"{path} ended while reading {nbytes} bytes at {offset}")
                done += count
        finally:
            target.release()
        buffer = np.frombuffer(storage, np.uint8)
        if skip:
            ctypes.memmove(buffer.ctypes.data, buffer.ctypes.data + skip, nbytes)
        return buffer[:nbytes]

    def close(self):
        for descriptor in [*self.descriptors.values(), *self.direct_descriptors.values()]:
            if descriptor is not None:
                os.close(descriptor)
        self.descriptors.clear()
        self.direct_descriptors.clear()


_DIRECT_MIN_BYTES = 1 << 20
_DIRECT_ALIGNMENT = 4096


def _file_position(tensor):
    return tensor.location[:2] if tensor.location else ("", 0)


def _device_value(rule, tensor, variable, reader):
    """The converted tensor, ready for Keras' first-value path (`_initialize`).

    The bytes needed are read (`_FileReader`, no memory map) into a fresh
    64-byte-aligned host buffer. Without a distribution, `jax.device_put`
    adopts it without a copy on CPU and copies it once to an accelerator;
    transposes and dtype casts then run on the device, where XLA does them
    far faster than numpy does on bfloat16. Under a `keras.distribution`,
    the converted, contiguous host array goes to Keras, which
    `jax.device_put`s it with the variable's sharding, so that each device
    receives only its shard.
    """
    dtype = np.dtype(variable.dtype)
    raw = tensor.read()
    value = rule.convert(raw)
    if keras.distribution.distribution() is not None:
        if tensor.location is not None and _maps_file(raw):
            if value.flags.c_contiguous:
                value = _aligned_copy(value, raw, tensor, reader)
            else:
                value = rule.convert(_aligned_copy(raw, raw, tensor, reader))
        return np.ascontiguousarray(np.asarray(value, dtype=dtype))
    if value.flags.c_contiguous:
        value = jax.device_put(_aligned_copy(value, raw, tensor, reader))
    else:
        value = rule.convert(jax.device_put(_aligned_copy(raw, raw, tensor, reader)))
    if value.dtype != dtype:
        value = value.astype(dtype)
    return value.block_until_ready()


def _aligned_copy(view, raw, tensor, reader):
    """`view` (a C-contiguous view into `raw`) in a new 64-byte-aligned array.

    Read straight from the file when `raw` maps a known file region.
    """
    nbytes = view.size * view.dtype.itemsize
    if tensor.location is None or not _maps_file(raw) or nbytes == 0:
        out = _host_buffer(nbytes).view(view.dtype).reshape(view.shape)
        np.copyto(out, view)
        return out
    path, offset, _ = tensor.location
    offset += view.ctypes.data - raw.ctypes.data
    return reader.read_array(path, offset, view.dtype, view.shape)


def _host_buffer(nbytes):
    """`nbytes` of fresh, 64-byte-aligned host memory.

    Large buffers are anonymous memory maps (page-aligned) rather than
    numpy's allocator, which asks the kernel for transparent huge pages:
    where the kernel then compacts memory on the first touch (THP defrag
    "madvise", common on VMs), touching 6 GiB took 4-15 s against 3-4 s
    without (measured on the 2-core VM).
    """
    if nbytes < _SMALL_BUFFER:
        storage = np.empty(nbytes + 64, np.uint8)
        start = (-storage.ctypes.data) % 64
        return storage[start : start + nbytes]
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


_SMALL_BUFFER = 1 << 20


def _maps_file(array):
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base if isinstance(array.base, np.ndarray) else None
    return False


def forget_pending_initialization(model_variables):
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
