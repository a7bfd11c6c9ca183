"""Writing files and presets without ever leaving a half-written or lost one."""

import contextlib
import os
import shutil
import tempfile

# Weight files above this many GB are split into shards (keras-hub's default
# is 10 GB, more than some file systems and upload tools take at once).
DEFAULT_MAX_SHARD_SIZE_GB = 2


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Yields a file object open on a temporary file beside `path`, which
    replaces `path` (flushed and synced) only if the block succeeds; on any
    error it is removed and `path` is left as it was."""
    path = os.path.abspath(os.fspath(path))
    handle, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(path)
    )
    try:
        # mkstemp makes it private (0600); give it what open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(handle, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path):
    """Yields a fresh directory beside `path` that replaces `path` on success.

    On any error the new directory is removed and `path`, if it existed, is
    left as it was. On success an existing `path` is moved aside, the new
    directory renamed into place, and only then the old one deleted.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        os.chmod(staging, 0o777 & ~_umask())  # as os.makedirs would, not mkdtemp's 0700
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if os.path.lexists(path):
        previous = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(previous)
        os.rename(path, previous)
    os.rename(staging, path)
    if previous is not None:
        if os.path.isdir(previous) and not os.path.islink(previous):
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.remove(previous)


def write_safetensors(path, tensors):
    """Writes `{name: array}` as a `.safetensors` file, atomically.

    Written to a temporary file beside `path`, flushed, then renamed over
    it: an interrupted write leaves any previous file untouched.
    """
    import json

    import numpy as np

    from keras_paligemma2.checkpoints.common import SAFETENSORS_DTYPES

    codes = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset, arrays = {}, 0, []
    for name, value in tensors.items():
        array = np.asarray(value)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray makes 0-d 1-d)
        if array.dtype not in codes:
            raise ValueError(f"Cannot store {name!r} of dtype {array.dtype} in safetensors.")
        header[name] = {
            "dtype": codes[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned
    with atomic_file(path) as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in arrays:
            f.write(array.reshape(-1).view(np.uint8).data)


def _by_path(variables):
    if isinstance(variables, dict):
        return variables
    named = {}
    for variable in variables:
        if variable.path in named:
            raise ValueError(f"Two variables share the path {variable.path!r}.")
        named[variable.path] = variable
    return named


def write_state(path, variables):
    """Saves Keras variables (a list, keyed by path, or a {key: variable}
    dict) to a `.safetensors` file, atomically."""
    import keras

    named = _by_path(variables)
    write_safetensors(path, {k: keras.ops.convert_to_numpy(v.value) for k, v in named.items()})


def read_state(path, variables, strict=True):
    """Assigns the values saved by `write_state` to `variables`, by key.

    With `strict`, a variable missing from the file, a saved value with no
    variable, or a shape mismatch is an error naming them all; nothing is
    assigned unless everything matches.
    """
    from keras_paligemma2.checkpoints.common import CheckpointError
    from keras_paligemma2.checkpoints.common import read_safetensors_lazily

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
