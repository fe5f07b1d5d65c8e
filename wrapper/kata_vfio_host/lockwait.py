"""Waiting for a held ledger lock without hanging silently.

`flock_bounded` first tries the lock without blocking (the common case costs one
syscall more than a plain flock). When another process holds it, it polls: after
NOTICE_AFTER seconds it tells `notice` (kata-vfio-ctl: stderr; the wrappers: nobody,
their stderr belongs to the container) which lock it waits for and which process
holds it (from /proc/locks, when the kernel says), and after the bound (seconds in
KATA_VFIO_LOCK_TIMEOUT, default 30) it gives up with one line.
Standard library only: create takes these locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from kata_vfio.errors import KataVfioError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

TIMEOUT_ENV = "KATA_VFIO_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
NOTICE_AFTER = 1.0
# who hears "waiting for ...": kata-vfio-ctl sets it; None stays silent
notice: Callable[[str], None] | None = None


class LockTimeout(KataVfioError):
    """Another process held a ledger lock longer than the bound."""


def lock_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise KataVfioError(
            f"{TIMEOUT_ENV}={text[:20]!r} is not a number of seconds",
            f"set it to e.g. 60, or unset it for {DEFAULT_TIMEOUT:g}",
        )
    return value


def lock_holder(fd: int, proc: str = "/proc") -> str:
    """'pid N (command)' of the process holding the flock on fd's file, or ''."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(f"{proc}/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters carry "->" first
        if len(fields) < 6 or fields[1] == "->" or fields[1] != "FLOCK":
            continue
        if fields[5] != wanted or not fields[4].isdigit() or int(fields[4]) == os.getpid():
            continue
        try:
            with open(f"{proc}/{fields[4]}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            # one line: arguments may hold newlines
            command = " ".join(" ".join(a.decode(errors="replace") for a in argv).split())[:80]
        except OSError:
            command = ""
        return f"pid {fields[4]}" + (f" ({command})" if command else "")
    return ""


def flock_bounded(fd: int, path: str) -> None:
    """flock(fd, LOCK_EX), saying what it waits for and giving up after the bound."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
    bound = lock_timeout()
    start = time.monotonic()
    told = False
    pause = 0.005
    while True:
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        waited = time.monotonic() - start
        if waited >= bound:
            holder = lock_holder(fd)
            raise LockTimeout(
                f"gave up after {bound:g} s waiting for the lock {path}, held by "
                f"{holder or 'another process'}",
                "let that command finish (or stop it) and try again; "
                f"{TIMEOUT_ENV}=SECONDS waits longer",
            )
        if not told and waited >= NOTICE_AFTER and notice is not None:
            told = True
            holder = lock_holder(fd)
            notice(
                f"waiting for the lock {path}, held by {holder or 'another process'} "
                f"(giving up after {bound:g} s)"
            )
