"""The ledger's locks: flock(2) on lock files, re-entrant per thread, group locks in
ascending group order (a lower one taken out of order is waited for only so long)."""

from __future__ import annotations

import fcntl
import os
import time
from _thread import get_ident

from kata_vfio.errors import DeviceError
from kata_vfio_host.lockwait import flock_bounded

_HELD: set[tuple[int, str]] = set()  # (thread, lock path) this process holds now
_OUT_OF_ORDER_WAIT = 10.0  # seconds a lock taken out of group order may be waited for


def _group_number(path: str) -> int | None:
    name = os.path.basename(path)
    return int(name[6:]) if name.startswith("group-") and name[6:].isdigit() else None


class Locks:
    """flock(2) on lock files, taken in the order given, released in reverse when the
    block ends (or the process dies). Re-entrant per thread: a path this thread holds
    already is skipped (flock on a second open file would wait for ourselves).

    Group locks are always taken in ascending group order, also across nested blocks:
    a thread that holds group 7's lock and needs group 3's would deadlock with one that
    holds 3 and waits for 7. Callers take every lock they need up front; should a nested
    block still ask for a lower group than one it holds, it never waits blindly: it tries
    for up to 10 s and then fails with one line instead of deadlocking."""

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._fds: list[tuple[int, tuple[int, str]]] = []

    def __enter__(self) -> None:
        thread = get_ident()
        try:
            made = None
            for path in self._paths:
                key = (thread, path)
                if key in _HELD:
                    continue
                if os.path.dirname(path) != made:  # once for a bind's 32 group locks
                    made = os.path.dirname(path)
                    os.makedirs(made, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                number = _group_number(path)
                highest = (
                    None
                    if number is None
                    else max(
                        (
                            n
                            for t, p in _HELD
                            if t == thread and os.path.dirname(p) == made
                            if (n := _group_number(p)) is not None
                        ),
                        default=None,
                    )
                )
                try:
                    if highest is not None and number is not None and number < highest:
                        _flock_out_of_order(fd, number, highest)
                    else:
                        flock_bounded(fd, path)  # says what it waits for, gives up after a bound
                except BaseException:
                    os.close(fd)
                    raise
                self._fds.append((fd, key))
                _HELD.add(key)
        except BaseException:
            self._release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._release()

    def release(self) -> None:
        """End the block early (what `with` does at its end; a second call does nothing)."""
        self._release()

    def _release(self) -> None:
        while self._fds:
            fd, key = self._fds.pop()
            _HELD.discard(key)
            os.close(fd)


def _flock_out_of_order(fd: int, number: int, highest: int) -> None:
    deadline = time.monotonic() + _OUT_OF_ORDER_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DeviceError(
                    f"IOMMU group {number}'s lock is held by another process "
                    f"while this one holds group {highest}'s",
                    "try again; locks are taken in group order",
                ) from None
            time.sleep(0.01)
