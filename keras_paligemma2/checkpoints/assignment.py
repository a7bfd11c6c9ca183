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
import mmap
import os
import threading
from typing import Callable

import jax
import keras
import numpy as np
import tqdm

from keras_paligemma2.layers.projections import quantizes_layer
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.keras_internals import base_kernel
from keras_paligemma2.utils.keras_internals import forget_pending_initialization
from keras_paligemma2.utils.keras_internals import initialize_variable
from keras_paligemma2.utils.tensor_files import CheckpointError
from keras_paligemma2.utils.tensor_files import unreadable_checkpoint


@dataclasses.dataclass(frozen=True)
class Rule:
    """Our variable `target` (a Keras variable path) comes from `source`."""

    target: str
    source: str
    convert: Callable[[np.ndarray], np.ndarray] = lambda x: x


def float_values(backbone, format_name):
    """Our variable path -> its float NumPy value, read when asked; a LoRA
    layer's kernel comes merged, as `merge_lora` merges it (the model is left
    unchanged). For writing checkpoints of formats without integer kernels.

    Args:
        backbone: a float `PaliGemma2Backbone` (a quantised one is an InputError).
        format_name: str, the format being written, for the error message.
    """
    quantised = [layer.path for layer in backbone._flatten_layers() if layer.quantization_mode]
    if quantised:
        raise InputError(
            f"{format_name} checkpoints hold float weights; {quantised[0]} and "
            f"{len(quantised) - 1} more layers are quantised: export the float model, then "
            "quantise where you load it."
        )
    variables = {v.path: v for v in backbone.weights}
    adapted = {
        layer.path + "/kernel": layer
        for layer in backbone._flatten_layers()
        if getattr(layer, "lora_enabled", False)
    }

    def value(path):
        if path in adapted:
            # Keras' `kernel` property: base + (A @ B) * alpha / rank.
            return np.asarray(adapted[path].kernel).astype(variables[path].dtype)
        return np.asarray(variables[path].value)

    return value


def layer_slice(index):
    """Selects one layer of a tensor stacked along a leading layer axis.

    Args:
        index: int, the layer's 0-based index on the leading axis.

    Returns:
        A function from an array (L, ...) to its row `index` (...).
    """
    return lambda x: x[index]


def load_model(
    cls,
    config,
    rules,
    tensors,
    source_name,
    ignored=(),
    progress=None,
    quantization=None,
    quantize_vision=False,
):
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
        quantization: None, "int8" or "int4": each projection kernel that
            `projections.is_quantized` names is quantised by its layer's own
            Keras `quantize` as soon as it is filled, and its float value
            dropped: the host holds the quantised model and at most the
            tensors in flight, never the float model.
        quantize_vision: bool; with `quantization`, the ViT's kernels too.
    """
    with keras.StatelessScope(initialize_variables=False):
        model = cls(**config)
    variables = {v.path: v for v in model.variables}
    to_quantize = _layers_to_quantize(model, quantization, quantize_vision)
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
                    initialize_variable(variable, future.result())
                    bar.update(_nbytes(variable))
                    layer = to_quantize.pop(variable.path, None)
                    if layer is not None:
                        layer.quantize(quantization)
                        # The float kernel, replaced: off Keras' list of
                        # variables to initialise too, which would keep it.
                        forget_pending_initialization([variables.pop(variable.path)])
                    variable = future = layer = None  # nothing keeps the float value
    except OSError as error:
        raise unreadable_checkpoint(source_name, error) from error
    finally:
        forget_pending_initialization(model.variables)
    return model


def _layers_to_quantize(model, mode, quantize_vision):
    """{float kernel path: its layer} for the layers `mode` quantises."""
    if mode is None:
        return {}
    return {
        base_kernel(layer).path: layer
        for layer in model._flatten_layers()
        if quantizes_layer(layer, quantize_vision)
    }


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
