"""How both wrappers end: decide under the error boundary, then hand the process over.

`decide` returns the program to exec with the caller's very argv (same pid, stdin and
fds), or an exit code when the wrapper finished the job itself. Standard library only.
"""

from __future__ import annotations

import os

from kata_vfio.boundary import guarded

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from kata_vfio.types import ExecFn


def hand_over(
    prog: str,
    argv: list[str],
    decide: Callable[[], str | int],
    exec_fn: ExecFn | None = None,
    report: Callable[[str], None] | None = None,
) -> int:
    outcome: list[str | int] = []

    def body() -> int:
        outcome.append(decide())
        return 0

    code = guarded(prog, body, report=report)
    if not outcome:
        return code
    target = outcome[0]
    if isinstance(target, int):
        return target
    (exec_fn or os.execv)(target, [target, *argv[1:]])
    return 127  # not reached with os.execv: it replaces this process or raises
