"""The settings cache: what passthrough verbs need, without parsing config.toml.

Passthrough verbs (state, kill, delete ...) run for every container operation and
must not pay for tomllib and jsonschema. Loading a valid config (settings.py)
leaves a tiny text cache keyed by the file's inode, size and mtime; passthrough
reads that. The import chain is one way: defaults -> cache -> settings.
"""

from __future__ import annotations

import os

from kata_vfio.defaults import CONFIG_ENV, DEFAULT_CONFIG, SETTINGS_CACHE_DIR
from kata_vfio.errors import ConfigError

CACHE_DIR = SETTINGS_CACHE_DIR
_CACHE_TAG = "kata-vfio settings cache v4"


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
            f"install it, or set runtime = \"/path/to/runtime\" in {config_path()}",
        )
    return found


def _cache_file(path: str) -> str:
    return os.path.join(CACHE_DIR, os.path.abspath(path).replace("/", "%"))


def _stat_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def write_cache(path: str, runtime: str, state_dir: str, shim: str, full: str = "") -> None:
    """Remember a valid load of `path`: the values passthrough verbs need on their own
    lines (no JSON: `json` imports `re`), then `full`, the create path's whole
    validated settings as JSON."""
    key = _stat_key(path)
    if key is None or "\n" in runtime + state_dir + shim + full:
        return
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        tmp = _cache_file(path) + f".{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{_CACHE_TAG}\n{key}\n{runtime}\n{state_dir}\n{shim}\n{full}\n")
        os.replace(tmp, _cache_file(path))
    except OSError:
        pass  # no cache: every verb parses the file, slower but correct


def read_cache(path: str) -> list[str] | None:
    """[runtime, state_dir, shim, full settings JSON] as the last valid load of `path`
    left them; None when the file changed since, or there is no cache."""
    key = _stat_key(path)
    if key is None:
        return None
    try:
        with open(_cache_file(path), encoding="utf-8") as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    if len(lines) < 6 or lines[0] != _CACHE_TAG or lines[1] != key:
        return None
    return lines[2:6]
