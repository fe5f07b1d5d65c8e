"""structlog set-up for the host side: JSON lines to the configured log file.

Only imported on create and by kata-vfio-ctl: structlog costs tens of ms to import.
"""

from __future__ import annotations

from typing import Any

import structlog


def file_logger(path: str | None, **context: Any) -> Any:
    """A bound structlog logger writing JSON lines to `path` (None or unwritable: nowhere)."""
    stream: Any
    try:
        stream = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
    except OSError:
        stream = None
    factory: Any = (structlog.WriteLoggerFactory(file=stream) if stream
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
