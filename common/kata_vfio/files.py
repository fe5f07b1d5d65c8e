"""Reading untrusted files with bounds, and writing files so that a reader sees the
whole old content or the whole new one, never a short one.

A bare ``os.write`` may write less than asked (a nearly full filesystem, a signal):
`write_fully` loops until everything is written or the kernel says why not.
"""

from __future__ import annotations

import os
import stat
import time

from kata_vfio.errors import KataVfioError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kata_vfio.types import StrPath


def write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # the kernel promises an error instead, but never loop forever
            raise OSError(28, "No space left on device")
        view = view[written:]


def write_atomically(
    path: StrPath,
    data: bytes,
    mode: int = 0o644,
    *,
    durable: bool = True,
    sync_directory: bool = True,
) -> None:
    """Temp file beside `path`, written fully, checked, then renamed over it: a reader,
    or a process killed at any step, sees the old content or the new, never a mix.

    `durable` also fsyncs the file and its directory, so the new content survives a
    power loss too: for files that outlive the boot (configuration, the ledger's
    journal). A container's config.json or the ledger's per-container markers belong
    to this boot only (after a crash their containers are gone whatever they say), and
    `kata-vfio create` should not pay two disk flushes each for them.
    `sync_directory=False` (with `durable`) fsyncs the file but not the rename: after a
    power loss the name holds the old content or the new, whole, never an empty file.
    Mode and owner of an existing file are kept. On any failure the temp file is
    removed and `path` is left exactly as it was.
    """
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    parent, name = os.path.split(os.fspath(path))
    # a name only this process uses (tempfile would cost the hook ~5 ms of imports)
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, (st.st_mode & 0o7777) if st else mode)
            if st is not None and os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            write_fully(fd, data)
            if durable:
                os.fsync(fd)
            size = os.fstat(fd).st_size
            if size != len(data):
                raise OSError(5, f"wrote {size} of {len(data)} bytes")
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable or not sync_directory:
        return
    dir_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UnsafeFileError(KataVfioError):
    """A file that must be a regular file of sane size is not."""


def read_regular(path: StrPath, limit: int, what: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    Opened non-blocking so a FIFO cannot hang us; checked with fstat before reading;
    read with a bound so /dev/zero or a huge file cannot exhaust memory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(
                f"{what} {path} is not a regular file",
                "it must be a plain file written by the container engine",
            )
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnsafeFileError(
            f"{what} {path} is larger than {limit} bytes",
            "this is not a file the container engine wrote",
        )
    return data


class edited:  # a class, not contextlib: the hook's start-up
    """Read-modify-write of kata-vfio's state, the one shape of the ledger's journal and
    its files, the hook's claims and the persistent binds.

    ``with edited(lock, read, write) as value:`` holds `lock` (a context manager; None when
    the caller holds the lock already) for the whole block, hands out ``read()`` to change
    in place and, when the block ends without an exception, calls ``write(value)`` still
    under the lock. With `snapshot` (e.g. ``dict``, ``list``), a copy of what was read is
    kept and `write` runs only when the value differs from it; without, `write` always
    runs (a writer that compares for itself). On an exception nothing is written."""

    def __init__(
        self,
        lock: Any,
        read: Callable[[], Any],
        write: Callable[[Any], None],
        *,
        snapshot: Callable[[Any], Any] | None = None,
    ) -> None:
        self._lock = lock
        self._read = read
        self._write = write
        self._snapshot = snapshot

    def __enter__(self) -> Any:
        if self._lock is not None:
            self._lock.__enter__()
        try:
            self._value = self._read()
            self._before = self._snapshot(self._value) if self._snapshot else None
        except BaseException as exc:
            if self._lock is not None:
                self._lock.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self._value

    def __exit__(self, kind: object, *rest: Any) -> None:
        try:
            if kind is None and (self._snapshot is None or self._value != self._before):
                self._write(self._value)
        finally:
            if self._lock is not None:
                self._lock.__exit__(kind, *rest)


class file_lock:  # a class, not contextlib: the hook's start-up
    """flock(2) on `path` (created, with its directory, if missing) for a block; closing
    the file ends it (so does the process's death). `wait(fd, path)` takes the lock when
    waiting must be bounded or reported; without it, flock waits as long as it takes."""

    def __init__(
        self, path: str, wait: Callable[[int, str], None] | None = None, *, dir_mode: int = 0o755
    ) -> None:
        self._path = path
        self._wait = wait
        self._dir_mode = dir_mode

    def __enter__(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self._path) or ".", mode=self._dir_mode, exist_ok=True)
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if self._wait is None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            else:
                self._wait(self._fd, self._path)
        except BaseException:
            os.close(self._fd)
            raise

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
