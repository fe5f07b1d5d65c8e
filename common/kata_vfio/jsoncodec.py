"""JSON for the once-per-container processes (``kata-vfio create``, the guest hook),
through CPython's own C codec without importing the `json` package.

`import json` costs about as much as a bare interpreter start: json.decoder, json.scanner
and json.encoder import `re` (and with it `enum`) and compile five regular expressions,
all for the pure-Python fallbacks that CPython never uses when its `_json` accelerator is
there. These functions drive that accelerator directly and give what json.loads and
json.dumps give for the same input; without `_json` (another interpreter) they are json's.
Errors are ValueErrors, as json's are.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

_WHITESPACE = " \t\n\r"


def _accelerator() -> ModuleType | None:
    """CPython's `_json`; None on an interpreter without it (typed so, for mypy's
    reachability of the fallbacks)."""
    try:
        import _json
    except ImportError:  # pragma: no cover - CPython always has it
        return None
    return _json


_json = _accelerator()


class _Context:
    """What the C scanner reads from json.JSONDecoder: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity, as json.loads takes them


_scan: Callable[[str, int], tuple[Any, int]] | None = (
    _json.make_scanner(_Context()) if _json is not None else None
)


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"line {line} column {column} (char {pos})"


def loads(data: str | bytes) -> Any:
    """json.loads for text, or bytes in UTF-8 (with or without a BOM, as json takes them;
    json's UTF-16/32 detection is left out: OCI files are UTF-8)."""
    if isinstance(data, (bytes, bytearray)):
        # not the utf-8-sig codec: one more encodings module to load (and ship in the VM)
        text = (data[3:] if data[:3] == b"\xef\xbb\xbf" else data).decode("utf-8")
    elif data.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)")
    else:
        text = data
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"Expecting value: {_where(text, stop.value)}") from None
    except SystemError:
        # CPython before 3.11.4 (bookworm's 3.11.2): the scanner raises its JSONDecodeError
        # only when json.decoder is already imported, else it fails without an exception.
        # Only bad input gets here, so json's own parse gives the message.
        import json

        return json.loads(text)
    if text[end:].strip(_WHITESPACE):
        end = len(text) - len(text[end:].lstrip(_WHITESPACE))
        raise ValueError(f"Extra data: {_where(text, end)}")
    return value


def _refuse(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(
    obj: object, *, compact: bool = False, default: Callable[[Any], Any] | None = None
) -> str:
    """json.dumps(obj) (ASCII, circular references refused); `compact` is
    separators=(",", ":"); `default` as json's."""
    items, keys = (",", ":") if compact else (", ", ": ")
    if _json is None:  # pragma: no cover
        import json

        return json.dumps(obj, separators=(items, keys), default=default)
    encode = _json.make_encoder(
        {}, default or _refuse, _json.encode_basestring_ascii, None, keys, items, False, False, True
    )
    return "".join(encode(obj, 0))
