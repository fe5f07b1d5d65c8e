"""The settings cache: what passthrough verbs need, without parsing config.toml.

Passthrough verbs (state, kill, delete ...) run for every container operation and
must not pay for tomllib and jsonschema. Loading a valid config (settings.py)
leaves a tiny cache keyed by the very bytes it parsed; passthrough reads the file
(bounded, never blocking on a FIFO) and takes the cache only for the same content. (Keyed
by inode, size and mtime, a file saved while a verb loaded it could leave the old values
cached for the new file.) The import chain is one way: defaults -> cache -> settings.
"""

from __future__ import annotations

import os

from kata_vfio.defaults import CONFIG_ENV, DEFAULT_CONFIG, SETTINGS_CACHE_DIR
from kata_vfio.errors import ConfigError
from kata_vfio.files import UnsafeFileError, read_regular

CACHE_DIR = SETTINGS_CACHE_DIR
_CACHE_TAG = "kata-vfio settings cache v5"
CONFIG_LIMIT = 1 << 20  # a config.toml is a few hundred bytes; a bigger file is a mistake


def read_config(path: str) -> bytes:
    """config.toml's bytes: a regular file of at most CONFIG_LIMIT, opened so that a FIFO
    or a device cannot hang or flood the verb. FileNotFoundError passes through."""
    try:
        return read_regular(path, CONFIG_LIMIT, "config file")
    except UnsafeFileError as exc:
        raise ConfigError(exc.message, "point it at a plain TOML file, as in the README") from None


def config_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def which(name: str) -> str | None:
    """shutil.which without importing shutil (and re) on the passthrough path."""
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    for directory in (os.environ.get("PATH") or os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def resolve_runtime(runtime: str, source: str) -> str:
    found = which(runtime)
    if found is None:
        raise ConfigError(
            f"inner runtime {runtime!r} not found (from {source})",
            f'install it, or set runtime = "/path/to/runtime" in {config_path()}',
        )
    return found


def _cache_file(path: str) -> str:
    return os.path.join(CACHE_DIR, os.path.abspath(path).replace("/", "%"))


def write_cache(
    path: str, raw: bytes, runtime: str, state_dir: str, shim: str, full: str = ""
) -> None:
    """Remember a valid load of `path` whose content was `raw`: the values passthrough
    verbs need on their own lines (no JSON: `json` imports `re`), then `full`, the create
    path's whole validated settings as JSON, then `raw` itself, the key (a config.toml is
    a few hundred bytes: comparing them costs less than importing a hash module)."""
    if "\n" in runtime + state_dir + shim + full:
        return
    head = f"{_CACHE_TAG}\n{runtime}\n{state_dir}\n{shim}\n{full}\n{len(raw)}\n"
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        tmp = _cache_file(path) + f".{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(head.encode() + raw)
        os.replace(tmp, _cache_file(path))
    except (OSError, UnicodeEncodeError):
        pass  # no cache: every verb parses the file, slower but correct


def read_cache(path: str) -> list[str] | None:
    """[runtime, state_dir, shim, full settings JSON] as the last valid load of `path`
    left them; None when its content changed since, or there is no cache (or the file
    cannot be read: the caller's full load then says why)."""
    try:
        raw = read_config(path)
        with open(_cache_file(path), "rb") as f:
            cached = f.read()
    except (OSError, ConfigError):
        return None
    parts = cached.split(b"\n", 6)
    if (
        len(parts) < 7
        or parts[0] != _CACHE_TAG.encode()
        or parts[6] != raw
        or parts[5] != str(len(raw)).encode()
    ):
        return None
    try:
        return [x.decode() for x in parts[1:5]]
    except UnicodeDecodeError:
        return None
