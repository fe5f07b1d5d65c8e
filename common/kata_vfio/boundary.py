"""One error boundary for every entry point (kata-vfio, kata-vfio-ctl, the hook, the shim).

Below an entry point everything raises. Here a failure becomes one line that makes
sense on its own (runtimes show a hook's last stderr line inside their own error):
what went wrong, the step that was under way, the path involved, what to do.
Tracebacks only with ``--debug`` or ``KATA_VFIO_DEBUG=1``. Standard library only:
the hook and the runtime's passthrough path import this.
"""

from __future__ import annotations

import os
import sys

from kata_vfio.defaults import DEBUG_ENV
from kata_vfio.errors import KataVfioError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_steps: list[str] = []


class step:
    """Name what is under way, so an unexpected failure can say where it happened.
    (A class, not contextlib: this module is on the lean paths.)"""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        _steps.append(self.name)

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        _steps.pop()
        if exc is not None and getattr(exc, "kata_vfio_step", None) is None:
            try:  # the innermost step names it
                exc.kata_vfio_step = self.name  # type: ignore[attr-defined]
            except AttributeError:
                pass


def step_of(exc: BaseException) -> str | None:
    found = getattr(exc, "kata_vfio_step", None)
    return found if isinstance(found, str) else (_steps[-1] if _steps else None)


def debug_wanted(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


def describe(exc: BaseException, during: str | None = None) -> tuple[str, int]:
    """(one line, exit code) for any exception."""
    during = f" while {during}" if during else ""
    if isinstance(exc, KataVfioError):
        return exc.one_line(), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted{during}", 130
    if isinstance(exc, OSError):
        path = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            path = f"{path} -> {exc.filename2}"
        reason = exc.strerror or type(exc).__name__
        return (
            f"{reason}{': ' + str(path) if path else ''}{during}; "
            f"check that path (permissions, free space, does it exist?)"
        ), 1
    if isinstance(exc, UnicodeError):
        return (
            f"unreadable text{during} ({exc}); the file or attribute holds bytes that are not text"
        ), 1
    return (
        f"internal error{during}: {exc!r}{_where(exc)} "
        f"(set {DEBUG_ENV}=1 for a traceback, and report it)"
    ), 70


def guarded(
    prog: str,
    body: Callable[[], int],
    *,
    debug: bool = False,
    report: Callable[[str], None] | None = None,
) -> int:
    """Run an entry point's body; turn any failure into `prog: <one line>` and an exit code.

    `report` gets the line too (the runtime log podman reads, the hook's own log).
    A closed stdout (``| head``) ends the program quietly.
    """
    _steps.clear()
    try:
        return body()
    except BrokenPipeError:
        # the reader went away: say nothing, and keep Python from complaining at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except SystemExit:
        raise
    except BaseException as exc:
        if debug_wanted(debug):
            raise
        line, code = describe(exc, step_of(exc))
        if report is not None:
            try:
                report(line)
            except Exception:  # reporting must not hide the error itself
                pass
        try:
            print(f"{prog}: {line}", file=sys.stderr)
        except OSError:
            pass
        return code
