"""Kernel work on a few threads: binds and give-backs of many devices at once."""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `kata-vfio create` avoids importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from kata_vfio_host.ledger import Host

    _T = TypeVar("_T")
    _R = TypeVar("_R")


def _in_pool(items: list[_T], work: Callable[[Host, _T], _R], host: Host,
             threads: int, *, stop_on_error: bool = False) -> list[_R]:
    """work(host, item) for every item on up to `threads` threads; the results in the
    items' order. An exception other than what `work` handles is raised once all are done
    (`stop_on_error`: no item is started after the first one)."""
    if len(items) <= 1:
        return [work(host, item) for item in items]
    import threading

    results: dict[int, _R] = {}
    errors: list[BaseException] = []
    todo = list(reversed(range(len(items))))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo or (stop_on_error and errors):
                    return
                index = todo.pop()
            try:
                results[index] = work(host, items[index])
            except BaseException as exc:
                with lock:
                    errors.append(exc)

    pool = [threading.Thread(target=worker, daemon=True)
            for _ in range(min(len(items), threads))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(items))]
