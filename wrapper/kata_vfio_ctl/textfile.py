"""The files the installers read and edit, taken in whatever form they were found.

An admin's configuration may end its lines with CRLF, lack a final newline, or be a
symbolic link into another directory. The installers edit a normalised text (LF, one final
newline) and write it back in the form found, to the file the link points at, so that an
install followed by an uninstall gives back the very bytes that were there. Every read is
bounded and non-blocking (`kata_vfio.files.read_regular`): a FIFO, a device or a huge file
is one line, never a hang.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kata_vfio.errors import ConfigError
from kata_vfio.value import Value

CONF_LIMIT = 1 << 20  # configuration files are kilobytes; Kata's shipped one is ~30 KiB


class FoundFile(Value):
    """A file as found: its bytes (None: there is none) and the form to write back in."""

    path: Path  # as the user named it
    target: Path  # where its bytes live: `path` with symbolic links resolved
    raw: bytes | None
    crlf: bool = False
    final_newline: bool = True
    text: str = ""  # LF line ends and a final newline: what the editors work on

    @property
    def exists(self) -> bool:
        return self.raw is not None

    def render(self, text: str) -> bytes:
        """Edited (normalised) text back in the form the file had."""
        if not self.final_newline and text.endswith("\n"):
            text = text[:-1]
        if self.crlf:
            text = text.replace("\n", "\r\n")
        return text.encode("utf-8")

    def save(self, text: str, mode: int = 0o644) -> None:
        """Write `text` (normalised) to the target: a link stays a link."""
        from kata_vfio.files import write_atomically

        self.target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.target, self.render(text), mode)


def read_bytes(path: Path, what: str, limit: int = CONF_LIMIT) -> bytes | None:
    """The bytes of `path` (None when there is no file), bounded, never blocking."""
    from kata_vfio.files import UnsafeFileError, read_regular

    try:
        return read_regular(path, limit, what)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise ConfigError(
                f"{what} {path} is a symbolic link to "
                f"{os.path.realpath(path)}, which does not exist",
                "fix or remove the link first",
            ) from None
        return None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory", "name the file itself") from None
    except UnsafeFileError as exc:
        raise ConfigError(exc.message, "name a plain text file") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} {path}: {exc.strerror}", "check the path and its permissions"
        ) from None


def read_found(path: Path, what: str, limit: int = CONF_LIMIT) -> FoundFile:
    target = Path(os.path.realpath(path))
    raw = read_bytes(path, what, limit)
    if raw is None:
        return FoundFile(Path(path), target, None)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {exc.start})",
            "TOML files are UTF-8: fix the file first",
        ) from None
    crlf = "\r\n" in text and text.count("\r\n") == text.count("\n")
    if crlf:
        text = text.replace("\r\n", "\n")
    final = not text or text.endswith("\n")
    return FoundFile(Path(path), target, raw, crlf, final, text if final else text + "\n")


def read_text(path: Path, what: str, limit: int = CONF_LIMIT) -> str:
    """The normalised text of a file that must exist (doctor, derived files)."""
    found = read_found(path, what, limit)
    if not found.exists:
        raise ConfigError(f"{what} {path} does not exist", "check the path")
    return found.text


def without_empty_tables(data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the tables that are empty (or hold only empty tables): what an
    installer compares before and after an edit, since taking our entry out may leave
    its empty parent table behind."""
    out = {}
    for key, item in data.items():
        kept = without_empty_tables(item) if isinstance(item, dict) else item
        if kept or not isinstance(item, dict):
            out[key] = kept
    return out
