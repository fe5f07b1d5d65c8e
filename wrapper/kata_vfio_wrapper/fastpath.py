"""The inner runtime's path for passthrough verbs, standard library only.

Passthrough verbs (state, kill, delete ...) run for every container operation and
must not pay for tomllib and jsonschema. Loading a valid config leaves a tiny
text cache keyed by the file's inode, size and mtime; passthrough reads that.
"""

from __future__ import annotations

import os

from kata_vfio.errors import ConfigError

DEFAULT_CONFIG = "/etc/kata-vfio/config.toml"
DEFAULT_RUNTIME = "kata-runtime"
DEFAULT_STATE_DIR = "/var/lib/kata-vfio"
CONFIG_ENV = "KATA_VFIO_CONFIG"
CACHE_DIR = "/run/kata-vfio/settings-cache"
_CACHE_TAG = "kata-vfio settings cache v2"


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


def write_cache(path: str, runtime: str, state_dir: str) -> None:
    key = _stat_key(path)
    if key is None or "\n" in runtime + state_dir:
        return
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        tmp = _cache_file(path) + f".{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{_CACHE_TAG}\n{key}\n{runtime}\n{state_dir}\n")
        os.replace(tmp, _cache_file(path))
    except OSError:
        pass  # no cache: every passthrough verb parses the file, slower but correct


def passthrough_settings() -> tuple[str, str]:
    """The inner runtime's path and the state directory, as cheaply as possible
    (standard library, no TOML parsing when the cache is fresh)."""
    path = config_path()
    key = _stat_key(path)
    if key is None and path == DEFAULT_CONFIG:
        return resolve_runtime(DEFAULT_RUNTIME, "the built-in default"), DEFAULT_STATE_DIR
    try:
        with open(_cache_file(path), encoding="utf-8") as f:
            tag, cached_key, runtime, state_dir = f.read().split("\n")[:4]
        if tag == _CACHE_TAG and cached_key == key:
            return resolve_runtime(runtime, path), state_dir
    except (OSError, ValueError):
        pass
    from kata_vfio_wrapper.settings import load_settings

    settings = load_settings(path)
    return resolve_runtime(settings.runtime, path), settings.state_dir
