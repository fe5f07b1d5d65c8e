"""/etc/kata-vfio/config.toml: loading and validation (create path and host tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_vfio.errors import ConfigError
from kata_vfio_wrapper.fastpath import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    DEFAULT_RUNTIME,
    DEFAULT_STATE_DIR,
    config_path,
    write_cache,
)


@dataclass(frozen=True)
class Settings:
    runtime: str = DEFAULT_RUNTIME
    guest_hook_path: str = "/usr/share/oci/hooks"
    annotations: dict[str, str] = field(default_factory=dict)
    log_file: str = "/var/log/kata-vfio.log"
    sysfs: str = "/sys"
    state_dir: str = DEFAULT_STATE_DIR
    autobind_allow: tuple[str, ...] = ()
    hotplug_timeout: float = 5.0

    @property
    def sysfs_path(self) -> Path:
        return Path(self.sysfs)


def load_settings(path: str | None = None) -> Settings:
    """Parse and validate the config file; missing default file means defaults."""
    path = path or config_path()
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
    settings = Settings(
        runtime=data.get("runtime", Settings.runtime),
        guest_hook_path=data.get("guest_hook_path", Settings.guest_hook_path),
        annotations=dict(data.get("annotations", {})),
        log_file=data.get("log_file", Settings.log_file),
        sysfs=data.get("sysfs", Settings.sysfs),
        state_dir=data.get("state_dir", Settings.state_dir),
        autobind_allow=tuple(autobind.get("allow", ())),
        hotplug_timeout=float(data.get("hotplug_timeout", Settings.hotplug_timeout)),
    )
    write_cache(path, settings.runtime, settings.state_dir)
    return settings


def _validate(data: dict[str, Any], path: str) -> None:
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parent / "config-schema.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data),
                    key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: {where}: {err.message}",
                          "see the configuration section of the kata-vfio README")


