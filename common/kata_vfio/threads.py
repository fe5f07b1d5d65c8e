"""The one thread pool: the host's binds and give-backs, the guest hook's binds.

What these threads do is mostly wait in the kernel (a driver's remove, a device waking from
D3hot), so a few threads overlap those waits. `_thread` (documented, low level), not
`threading` or `concurrent.futures`: those cost the hook functools, collections and more
at start-up, for threads that only wait on sysfs writes.
"""

from __future__ import annotations

import _thread

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the hook imports no typing (its start-up)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    _T = TypeVar("_T")
    _R = TypeVar("_R")


def in_threads(
    items: list[_T], work: Callable[[_T], _R], threads: int, *, stop_on_error: bool = False
) -> list[_R]:
    """work(item) for every item on up to `threads` threads, the calling thread one of
    them; the results in the items' order. An exception `work` raises is raised here once
    every started item is done (`stop_on_error`: no item is started after the first one)."""
    if len(items) <= 1 or threads <= 1:
        return [work(item) for item in items]
    results: dict[int, _R] = {}
    errors: list[BaseException] = []
    todo = list(reversed(range(len(items))))
    lock = _thread.allocate_lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo or (stop_on_error and errors):
                    return
                index = todo.pop()
            try:
                results[index] = work(items[index])
            except BaseException as exc:  # raised below, in the caller's thread
                with lock:
                    errors.append(exc)

    def helper(finished: _thread.LockType) -> None:
        try:
            worker()
        finally:
            finished.release()

    waits = []
    for _ in range(min(len(items), threads) - 1):
        finished = _thread.allocate_lock()
        finished.acquire()
        _thread.start_new_thread(helper, (finished,))
        waits.append(finished)
    try:
        worker()
    finally:
        for finished in waits:
            finished.acquire()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(items))]
