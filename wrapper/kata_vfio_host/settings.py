"""/etc/kata-vfio/config.toml: loading and validation (create path and host tools).

A valid load is remembered in the settings cache (cache.py), so later calls skip
tomllib and jsonschema until the file changes.
"""

from __future__ import annotations

import os

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
from kata_vfio.value import Value, as_dict, build
from kata_vfio_host.cache import config_path, read_cache, read_config, write_cache

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

GUEST_HOOK = "hook"
GUEST_AGENT = "agent"


class Settings(Value, init=False):
    """The validated configuration; read-only once made."""

    runtime: str
    shim: str
    guest_hook_path: str
    annotations: dict[str, str]
    log_file: str
    sysfs: str
    state_dir: str
    autobind_allow: tuple[str, ...]
    hotplug_timeout: float
    # VFIO containers get RLIMIT_MEMLOCK unlimited (DPDK) ...
    raise_memlock: bool
    # ... and a tmpfs on /run/dpdk unless /run is mounted
    dpdk_run_tmpfs: bool
    # Kata >= 2: how the guest gets its devices ("hook": this project's guest hook
    # with Kata's vfio_mode = "guest-kernel"; "agent": Kata's vfio_mode = "vfio") and
    # the configuration file `kata-vfio-ctl install` generated. Empty: Kata 1.x, where
    # the wrapper adds the guest_hook_path annotation instead of
    # io.katacontainers.config_path.
    guest: str
    kata_config_path: str
    # [[device_plugin.resource]] tables, checked at load: name, select (a string or
    # None), devices (a list of address globs), cdi (bool)
    device_plugin_resources: tuple[dict[str, Any], ...]

    def __new__(
        cls,
        *,
        runtime: str = DEFAULT_RUNTIME,
        shim: str = DEFAULT_SHIM,
        guest_hook_path: str = DEFAULT_GUEST_HOOK_PATH,
        annotations: dict[str, str] | None = None,
        log_file: str = DEFAULT_LOG_FILE,
        sysfs: str = DEFAULT_SYSFS,
        state_dir: str = DEFAULT_STATE_DIR,
        autobind_allow: tuple[str, ...] = (),
        hotplug_timeout: float = HOTPLUG_TIMEOUT_DEFAULT,
        raise_memlock: bool = True,
        dpdk_run_tmpfs: bool = True,
        guest: str = GUEST_HOOK,
        kata_config_path: str = "",
        device_plugin_resources: tuple[dict[str, Any], ...] = (),
    ) -> Settings:
        return build(
            cls,
            (
                runtime,
                shim,
                guest_hook_path,
                dict(annotations or {}),
                log_file,
                sysfs,
                state_dir,
                tuple(autobind_allow),
                hotplug_timeout,
                raise_memlock,
                dpdk_run_tmpfs,
                guest,
                kata_config_path,
                tuple(device_plugin_resources),
            ),
        )

    def as_dict(self) -> dict[str, Any]:
        return as_dict(self)

    __hash__ = None  # type: ignore[assignment]  # its dicts: compared, never hashed

    def __repr__(self) -> str:
        return f"Settings({self.as_dict()!r})"


def _from_cache(path: str) -> Settings | None:
    cached = read_cache(path)
    if cached is None or not cached[3]:
        return None
    from kata_vfio.jsoncodec import loads

    try:
        data = loads(cached[3])
        data["autobind_allow"] = tuple(data["autobind_allow"])
        data["device_plugin_resources"] = tuple(data.get("device_plugin_resources", ()))
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
        raw = read_config(path)
    except FileNotFoundError:
        if path == DEFAULT_CONFIG:
            return Settings()
        raise ConfigError(
            f"config file {path} does not exist", f"create it or unset {CONFIG_ENV}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}", "check its permissions"
        ) from None
    import math
    import tomllib

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the syntax") from None
    _validate(data, path)
    timeout = data.get("hotplug_timeout", HOTPLUG_TIMEOUT_DEFAULT)
    if isinstance(timeout, float) and math.isnan(timeout):  # NaN passes both schema bounds
        raise ConfigError(
            f"{path}: hotplug_timeout: nan is not a number of seconds",
            f"write a number from 0 to {HOTPLUG_TIMEOUT_MAX}",
        )
    autobind = data.get("autobind", {})
    from kata_vfio_host.allowlist import parse_allow_list

    parse_allow_list(tuple(autobind.get("allow", ())))  # refuse a loose pattern at load
    resources = data.get("device_plugin", {}).get("resource", [])
    if resources:
        resources = _device_plugin_resources(resources, path)
    settings = Settings(
        runtime=data.get("runtime", DEFAULT_RUNTIME),
        shim=data.get("shim", DEFAULT_SHIM),
        guest_hook_path=data.get("guest_hook_path", DEFAULT_GUEST_HOOK_PATH),
        annotations=dict(data.get("annotations", {})),
        log_file=data.get("log_file", DEFAULT_LOG_FILE),
        sysfs=data.get("sysfs", DEFAULT_SYSFS),
        state_dir=data.get("state_dir", DEFAULT_STATE_DIR),
        autobind_allow=tuple(autobind.get("allow", ())),
        hotplug_timeout=float(data.get("hotplug_timeout", HOTPLUG_TIMEOUT_DEFAULT)),
        raise_memlock=bool(data.get("raise_memlock", True)),
        dpdk_run_tmpfs=bool(data.get("dpdk_run_tmpfs", True)),
        guest=data.get("guest", GUEST_HOOK),
        kata_config_path=data.get("kata_config_path", ""),
        device_plugin_resources=tuple(resources),
    )
    from kata_vfio.jsoncodec import dumps

    write_cache(
        path, raw, settings.runtime, settings.state_dir, settings.shim, dumps(settings.as_dict())
    )
    return settings


def _validate(data: dict[str, Any], path: str) -> None:
    import json

    import jsonschema

    with open(os.path.join(os.path.dirname(__file__), "config-schema.json"), "rb") as f:
        schema = json.loads(f.read())
    # the bound lives in defaults.py, shared with the manifest parser and the hook
    schema["properties"]["hotplug_timeout"]["maximum"] = HOTPLUG_TIMEOUT_MAX
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(data),
        key=lambda e: list(e.absolute_path),
    )
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ConfigError(
            f"{path}: {where}: {err.message}",
            "see the configuration section of the kata-vfio README",
        )


def _device_plugin_resources(tables: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """[[device_plugin.resource]], each checked with the parsers the plugin uses: select by
    io.kata-vfio.select's (one request, no count), devices by [autobind] allow's (address
    globs only)."""
    from kata_vfio.errors import KataVfioError
    from kata_vfio_host.allocate import parse_select
    from kata_vfio_host.allowlist import parse_rule

    seen: set[str] = set()
    resources = []
    for index, table in enumerate(tables):
        name = table["name"]
        where = f"{path}: device_plugin.resource[{index}] ({name})"
        if name in seen:
            raise ConfigError(
                f"{where}: the name is used twice",
                "give each [[device_plugin.resource]] its own name",
            )
        seen.add(name)
        select, devices = table.get("select"), list(table.get("devices", ()))
        if select is None and not devices:
            raise ConfigError(
                f"{where}: neither select nor devices says which devices",
                'add select = "VENDOR:DEVICE[:CLASS]" or devices = [ADDRESS_GLOB]',
            )
        if select is not None:
            try:
                requests = parse_select(select)
            except KataVfioError as exc:
                raise ConfigError(
                    f"{where}: select {select!r}: {exc.message}",
                    "write VENDOR:DEVICE[:CLASS], e.g. 1b36:0010 or ::0108",
                ) from None
            if len(requests) != 1 or _has_count(select):
                raise ConfigError(
                    f"{where}: select {select!r} is not one VENDOR:DEVICE[:CLASS]",
                    "one kind per resource, without a count (the kubelet counts)",
                )
        for pattern in devices:
            try:
                rule = parse_rule(pattern)
            except KataVfioError:
                rule = None
            if rule is None or rule.address_glob is None:
                raise ConfigError(
                    f"{where}: devices: {pattern!r} is not a PCI address glob",
                    'write e.g. "0000:3b:*.*" or "0000:03:00.?"',
                )
        resources.append(
            {
                "name": name,
                "select": select,
                "devices": devices,
                "cdi": bool(table.get("cdi", False)),
            }
        )
    return resources


def _has_count(select: str) -> bool:
    head, star, tail = select.strip().rpartition("*")
    return bool(star) and tail.isdigit() and bool(head)
