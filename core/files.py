"""Files replaced atomically and durably: a reader finds the old content or the new, never
part of one, and a crash after the write returned cannot bring the old one back.

Every write goes to a temporary name beside the target (same directory, so the same
filesystem): ``.{name}.{32 random hex}.tmp``, hidden and unique to its writer, so that
several threads, processes or instances of a fleet sharing a folder may write the same
target at once; the last rename wins and each version is whole. The temporary file is
fsynced, renamed onto the target, and the directory fsynced (the rename itself is then
on disk too). A write that fails removes its temporary file; only a process killed
mid-write leaves one, which a folder's own sweeper may remove by that name.

Blocking I/O: call from a worker thread when on an event loop.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "fsync_directory", "replace_durably"]


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring); the directory
    must exist. Raises ``OSError`` when the disk fails (``path`` is then as it was, unless
    only the final sync of the directory failed)."""
    with atomic_path(path) as temporary, open(temporary, "xb") as handle:
        handle.write(data)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write (a streamed copy, a
    download, a library that saves to a path); when the block ends, what it wrote there
    replaces ``path`` atomically. A block that leaves no file there (a download that found
    nothing) leaves ``path`` as it was; one that raises leaves it as it was too, and its
    temporary file is removed before the error propagates. Raises ``OSError`` from the
    sync or the rename."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield temporary
        if os.path.lexists(temporary):
            replace_durably(temporary, path)
    finally:
        # gone after a rename, except when it and the target were already one file (a
        # hard link): the rename then does nothing
        temporary.unlink(missing_ok=True)


def replace_durably(temporary: Path, target: Path) -> None:
    """Fsync the complete file ``temporary`` (beside ``target``), rename it onto ``target``,
    fsync their directory. For a writer that names its temporary files itself; removing
    one that this raises for is the caller's part. Raises ``OSError``."""
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the data first: a crash never leaves the name over less
    finally:
        os.close(descriptor)
    os.replace(temporary, target)
    fsync_directory(target.parent)


def fsync_directory(path: Path, *, strict: bool = False) -> None:
    """Fsync the directory ``path``, so that renames and creations in it are on disk.
    Raises ``OSError``; except with ``strict``, not for a filesystem that cannot sync a
    directory at all (``EINVAL``, ``ENOTSUP``, ``EBADF``: the rename is done and
    visible, so the write has not failed). ``strict`` is for a caller whose guarantee
    needs the sync itself (a checkpoint that must survive a crash)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    except OSError as exc:
        # some filesystems cannot sync a directory at all (as PostgreSQL's fsync_fname
        # tolerates): the rename is done and visible, so the write has not failed
        if strict or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)
