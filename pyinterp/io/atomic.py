"""Files written whole or not at all: every file pyinterp writes goes through this module.

A file is written under a temporary name in its directory, flushed and fsynced, checked (every byte the
writer wrote reached the file: C writers such as ``ndarray.tofile`` can lose a full disk's error), and
only then renamed over the destination (``os.replace``, atomic on POSIX and Windows). Any failure removes the
temporary file and leaves the destination as it was. Inside :func:`together`, the renames wait for the end of
the block, so a command that writes several files writes all of them or none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from pathlib import Path
from typing import IO, Iterator

from pyinterp.errors import PyinterpError

_state = threading.local()  # .pending: the (temporary, destination) pairs of this thread's together() block


def _reserve(path: Path) -> Path:
    """A new, empty file next to ``path`` (created with the permissions an ordinary ``open`` would give)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def check_complete(f: IO) -> None:
    """Flush and fsync the open file ``f`` and check that it holds every byte written to it (its size is its
    position: the file is written front to back); an OSError otherwise."""
    f.flush()
    raw = getattr(f, "buffer", f)
    os.fsync(raw.fileno())
    size, position = os.fstat(raw.fileno()).st_size, raw.tell()
    if size != position:
        raise OSError(errno.EIO, f"only {size} of {position} bytes reached the file")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, wait: bool = True) -> Iterator[Path]:
    """Yields a temporary path for a writer that opens files itself; when the block ends normally the file is
    fsynced and renamed to ``path``: at the end of the enclosing :func:`together` block, if any and ``wait``
    (False: at once, for a cache that later steps read). On any error the temporary file is removed and
    ``path`` is untouched."""
    path = Path(path)
    tmp = _reserve(path)
    try:
        yield tmp
        _fsync(tmp)
        pending = getattr(_state, "pending", None)
        if pending is None or not wait:
            os.replace(tmp, path)
        else:
            pending.append((tmp, path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", wait: bool = True, **kwargs) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` that writes the whole file or nothing (see :func:`atomic_path`; ``wait``
    False: renamed at once, even inside :func:`together`, for files a long run keeps consistent as it goes)."""
    with atomic_path(path, wait) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            check_complete(f)


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Within the block, files written with :func:`atomic_write` or :func:`atomic_path` appear only when the
    block ends without an error, all of them; on an error none does. Nested blocks join the outer one."""
    if getattr(_state, "pending", None) is not None:
        yield
        return
    _state.pending = pending = []
    try:
        yield
        while pending:
            tmp, path = pending[0]
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise PyinterpError(f"cannot write {path}: {e.strerror or e}") from None
            pending.pop(0)
    finally:
        _state.pending = None
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
