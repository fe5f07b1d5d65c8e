"""Waiting for the kernel without fixed sleeps: kobject uevents over netlink.

A hot-plugged PCI device or a new VFIO group announces itself with a uevent;
the hook wakes on it and looks again. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

NETLINK_KOBJECT_UEVENT = 15
KERNEL_EVENTS_GROUP = 1

T = TypeVar("T")


class Wakeups(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block until something may have changed (True) or `timeout` passed (False)."""

    def close(self) -> None: ...


class UeventWakeups:
    """Wakes on every kernel uevent (device add/bind, vfio group creation)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
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
