"""Writing files and directories without ever leaving a half-written or lost one."""

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
    error it is removed and `path` is left as it was.

    Args:
        path: str or path-like, the file to write; its directory must exist.
        mode: str, a write mode for `open` (default "wb"; "w" for text).
    """
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

    Args:
        path: str or path-like, the directory to write; its parent is created if needed.
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
