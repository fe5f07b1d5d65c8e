"""structlog set-up for the host side: JSON lines to the configured log file.

Only imported on create and by kata-vfio-ctl: structlog costs tens of ms to import.
"""

from __future__ import annotations

from typing import Any, TextIO

import structlog


class DroppingFile:
    """The log file as structlog writes it, except that a line it cannot write (a full
    filesystem, EIO) is dropped and counted instead of failing the command that logs it:
    logging never decides the outcome. The first drop is said once on stderr."""

    def __init__(self, path: str, stream: TextIO | None, warn: TextIO | None) -> None:
        self.path = path
        self.stream = stream
        self.dropped = 0
        self._warn = warn

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 and self._warn is not None:
            print(f"kata-vfio-ctl: warning: cannot write the log {self.path} ({why}); "
                  "going on without it", file=self._warn)

    def write(self, text: str) -> None:
        if self.stream is None:
            self._drop("cannot open it")
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError as exc:
            self._drop(exc.strerror or str(exc))
            try:  # drop what is still buffered: the next line must not carry it
                self.stream.close()
            except OSError:
                pass
            self.stream = None

    def flush(self) -> None:
        """Every write already flushed (or dropped)."""


def file_logger(path: str | None, *, warn: TextIO | None = None, **context: Any) -> Any:
    """A bound structlog logger writing JSON lines to `path` (None: nowhere). A log that
    cannot be written drops its lines (DroppingFile); `warn`: where to say so once."""
    stream: Any = None
    if path:
        try:
            opened: TextIO | None = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError:
            opened = None
        stream = DroppingFile(path, opened, warn)
    factory: Any = (structlog.WriteLoggerFactory(file=stream) if stream is not None
                    else structlog.ReturnLoggerFactory())
    logger = structlog.wrap_logger(
        factory(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(default=str),
        ],
    )
    return logger.bind(**context)
