"""/etc/kata-vfio/config.toml: loading and validation (create path and host tools).

A valid load is remembered in the settings cache (cache.py), so later calls skip
tomllib and jsonschema until the file changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kata_vfio.defaults import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_GUEST_HOOK_PATH,
    DEFAULT_LOG_FILE,
    DEFAULT_RUNTIME,
    DEFAULT_SHIM,
    DEFAULT_STATE_DIR,
    DEFAULT_SYSFS,
    HOTPLUG_TIMEOUT_DEFAULT,
    HOTPLUG_TIMEOUT_MAX,
)
from kata_vfio.errors import ConfigError
from kata_vfio_host.cache import config_path, read_cache, write_cache

GUEST_HOOK = "hook"
GUEST_AGENT = "agent"


@dataclass(frozen=True)
class Settings:
    runtime: str = DEFAULT_RUNTIME
    shim: str = DEFAULT_SHIM
    guest_hook_path: str = DEFAULT_GUEST_HOOK_PATH
    annotations: dict[str, str] = field(default_factory=dict)
    log_file: str = DEFAULT_LOG_FILE
    sysfs: str = DEFAULT_SYSFS
    state_dir: str = DEFAULT_STATE_DIR
    autobind_allow: tuple[str, ...] = ()
    hotplug_timeout: float = HOTPLUG_TIMEOUT_DEFAULT
    raise_memlock: bool = True  # VFIO containers get RLIMIT_MEMLOCK unlimited (DPDK)
    dpdk_run_tmpfs: bool = True  # ... and a tmpfs on /run/dpdk unless /run is mounted
    # Kata >= 2: how the guest gets its devices ("hook": this project's guest hook with
    # Kata's vfio_mode = "guest-kernel"; "agent": Kata's vfio_mode = "vfio") and the
    # configuration file `kata-vfio-ctl install` generated. Empty: Kata 1.x, where the
    # wrapper adds the guest_hook_path annotation instead of io.katacontainers.config_path.
    guest: str = GUEST_HOOK
    kata_config_path: str = ""

    @property
    def sysfs_path(self) -> Path:
        return Path(self.sysfs)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


def _from_cache(path: str) -> Settings | None:
    cached = read_cache(path)
    if cached is None or not cached[3]:
        return None
    import json

    try:
        data = json.loads(cached[3])
        data["autobind_allow"] = tuple(data["autobind_allow"])
        return Settings(**data)
    except (ValueError, TypeError, KeyError):
        return None


def load_settings(path: str | None = None) -> Settings:
    """Parse and validate the config file; missing default file means defaults."""
    path = path or config_path()
    cached = _from_cache(path)
    if cached is not None:
        return cached
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        if path == DEFAULT_CONFIG:
            return Settings()
        raise ConfigError(f"config file {path} does not exist",
                          f"create it or unset {CONFIG_ENV}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}",
                          "check its permissions") from None
    import tomllib

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the syntax") from None
    _validate(data, path)
    autobind = data.get("autobind", {})
    from kata_vfio_host.allowlist import parse_allow_list

    parse_allow_list(tuple(autobind.get("allow", ())))  # refuse a loose pattern at load
    settings = Settings(
        runtime=data.get("runtime", Settings.runtime),
        shim=data.get("shim", Settings.shim),
        guest_hook_path=data.get("guest_hook_path", Settings.guest_hook_path),
        annotations=dict(data.get("annotations", {})),
        log_file=data.get("log_file", Settings.log_file),
        sysfs=data.get("sysfs", Settings.sysfs),
        state_dir=data.get("state_dir", Settings.state_dir),
        autobind_allow=tuple(autobind.get("allow", ())),
        hotplug_timeout=float(data.get("hotplug_timeout", Settings.hotplug_timeout)),
        raise_memlock=bool(data.get("raise_memlock", Settings.raise_memlock)),
        dpdk_run_tmpfs=bool(data.get("dpdk_run_tmpfs", Settings.dpdk_run_tmpfs)),
        guest=data.get("guest", Settings.guest),
        kata_config_path=data.get("kata_config_path", Settings.kata_config_path),
    )
    import json

    write_cache(path, settings.runtime, settings.state_dir, settings.shim,
                json.dumps(asdict(settings)))
    return settings


def _validate(data: dict[str, Any], path: str) -> None:
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parent / "config-schema.json").read_text())
    # the bound lives in defaults.py, shared with the manifest parser and the hook
    schema["properties"]["hotplug_timeout"]["maximum"] = HOTPLUG_TIMEOUT_MAX
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data),
                    key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: {where}: {err.message}",
                          "see the configuration section of the kata-vfio README")
