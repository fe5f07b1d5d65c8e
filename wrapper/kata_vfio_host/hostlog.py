"""structlog set-up for the host side: JSON lines to the configured log file.

Only imported on create and by kata-vfio-ctl: structlog costs tens of ms to import.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
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
            print(
                f"kata-vfio-ctl: warning: cannot write the log {self.path} ({why}); "
                "going on without it",
                file=self._warn,
            )

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


# syslog priorities, as journald reads them from a "<N>" prefix on a stream line
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def journal_stream(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Is `stream` connected to the journal? systemd sets JOURNAL_STREAM to the
    "device:inode" of the stdout/stderr it connected; a stream redirected since (a
    shell's 2>file, a child's pipe) is not the journal's any more."""
    import os

    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(dev and ino) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def journal_line(event: Mapping[str, Any]) -> str:
    """`<N>tool: event key=value ...`: one line journald files at priority N, values
    as JSON so a reader sees the text, not a Python repr."""
    import json

    fields = {k: v for k, v in event.items() if k not in ("event", "level", "timestamp", "tool")}
    words = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
    return (
        f"<{PRIORITY.get(str(event.get('level')), 6)}>{event.get('tool', 'kata-vfio')}: "
        f"{event.get('event')}" + (f" {words}" if words else "")
    )


class _ToJournal:
    """A structlog processor: each event also to the journal's stream, passed on as is."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        try:
            print(journal_line(event), file=self.stream, flush=True)
        except (OSError, ValueError):
            pass  # logging never decides the outcome
        return event


def file_logger(
    path: str | None, *, warn: TextIO | None = None, journal: TextIO | None = None, **context: Any
) -> Any:
    """A bound structlog logger writing JSON lines to `path` (None: nowhere). A log that
    cannot be written drops its lines (DroppingFile); `warn`: where to say so once.
    `journal`: a stream that, when systemd connected it to the journal (JOURNAL_STREAM),
    also gets each event as a `<priority>` line."""
    stream: Any = None
    if path:
        try:
            opened: TextIO | None = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError:
            opened = None
        stream = DroppingFile(path, opened, warn)
    factory: Any = (
        structlog.WriteLoggerFactory(file=stream)
        if stream is not None
        else structlog.ReturnLoggerFactory()
    )
    logger = structlog.wrap_logger(
        factory(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([_ToJournal(journal)] if journal is not None and journal_stream(journal) else []),
            structlog.processors.JSONRenderer(default=str),
        ],
    )
    return logger.bind(**context)
