"""Waiting for the kernel without fixed sleeps: kobject uevents over netlink.

A hot-plugged PCI device or a new VFIO group announces itself with a uevent;
the hook wakes on it and looks again. Every wait is bounded, and all of them
together by the hook's one deadline: kata-agent kills a prestart hook 10 s after
starting it, so the budget counts from the process's start, not from ours.
"""

from __future__ import annotations

import os
import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from kata_vfio.types import StrPath, Wakeups

    T = TypeVar("T")

NETLINK_KOBJECT_UEVENT = 15
KERNEL_EVENTS_GROUP = 1


class UeventWakeups:
    """Wakes on every kernel uevent (device add/bind, vfio group creation)."""

    def __init__(self) -> None:
        # _socket, the C module behind `socket`: socket.py costs the hook `enum`'s import
        import _socket

        self._sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        self._sock.bind((0, KERNEL_EVENTS_GROUP))
        self._sock.setblocking(False)

    def wait(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._sock], [], [], max(timeout, 0))
        if not ready:
            return False
        try:
            while self._sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        self._sock.close()


class PollWakeups:
    """Fallback where no netlink socket can be had: re-check at a short interval."""

    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval

    def wait(self, timeout: float) -> bool:
        time.sleep(max(min(self._interval, timeout), 0))
        return True

    def close(self) -> None:
        pass


def open_wakeups() -> Wakeups:
    try:
        return UeventWakeups()
    except OSError:
        return PollWakeups()


def wait_for(check: Callable[[], T | None], wakeups: Wakeups, timeout: float) -> T | None:
    """Call `check` now and after each wake-up until it returns non-None or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        wakeups.wait(left)


def process_started(proc: StrPath) -> float | None:
    """When this process started, on the time.monotonic() scale; None if /proc cannot say.

    /proc/self/stat field 22 is the start in clock ticks since boot, /proc/uptime the
    seconds since boot: their difference is what Python's start-up already spent (a
    large share of the budget in a guest without KVM)."""
    from kata_vfio_hook.claims import start_ticks

    ticks = start_ticks(proc, "self")
    try:
        with open(os.path.join(proc, "uptime"), encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if ticks is None:
        return None
    age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - max(age, 0.0)


class Deadline:
    """The hook's whole budget: HOOK_DEADLINE seconds from `started`."""

    def __init__(self, seconds: float, started: float) -> None:
        self.at = started + seconds

    def left(self) -> float:
        return max(self.at - time.monotonic(), 0.0)
