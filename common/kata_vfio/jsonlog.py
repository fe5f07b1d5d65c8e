"""JSON-lines event log for the guest hook and the runtime wrappers, standard library only.

The host tools log through structlog; the hook and the wrappers cannot afford its
import (~100 ms here against a budget of a few Python start-ups), so they write
records of the same shape themselves: timestamp, level, event, bound context.
"""

from __future__ import annotations

import os
import time

from kata_vfio.jsoncodec import dumps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import StrPath


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


class JsonLog:
    """Appends one JSON object per line. Logging never decides the outcome of a verb: a
    line that cannot be written (no such directory, a full filesystem, EIO) is dropped and
    counted in `JsonLog.dropped`, never raised; the wrappers cannot say more (a shim's
    `start` output is containerd's address, a hook's stderr the container's error)."""

    dropped = 0  # lines dropped by this process, every logger together

    def __init__(self, path: StrPath | None, context: dict[str, Any] | None = None) -> None:
        self._path = path
        self._context = dict(context or {})

    def bind(self, **context: Any) -> JsonLog:
        return JsonLog(self._path, {**self._context, **context})

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self._path is None:
            return
        record = {
            "timestamp": _timestamp(),
            "level": level,
            "event": event,
            **self._context,
            **fields,
        }
        line = dumps(record, compact=True, default=str) + "\n"
        data = line.encode()
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
        except OSError:
            JsonLog.dropped += 1
            return
        try:
            if os.write(fd, data) != len(data):  # a short write: the rest would interleave
                JsonLog.dropped += 1
        except OSError:
            JsonLog.dropped += 1
        finally:
            os.close(fd)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


def wrapper_log(path: str | None, **context: Any) -> JsonLog:
    """The runtime and shim wrappers' event log: the same JSON-lines records the host
    tools write with structlog, without structlog's import (~100 ms here, with asyncio),
    which a container create cannot afford."""
    return JsonLog(path or None, context)
