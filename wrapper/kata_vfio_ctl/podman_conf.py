"""Registering kata-vfio as a podman runtime in /etc/containers/containers.conf.

Edited with tomlkit so comments and every other setting survive. Never the
distribution's /usr/share/containers/containers.conf. podman keys runtime
features by the runtime's basename, and setting runtime_supports_json/kvm replaces
podman's default list, so the defaults are written out with our name added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit

from kata_vfio.errors import ConfigError

CONTAINERS_CONF = Path("/etc/containers/containers.conf")
RUNTIME_NAME = "kata-vfio"
# podman 4.x defaults, from containers/common pkg/config/default.go
DEFAULT_SUPPORTS_JSON = ["crun", "runc", "kata", "runsc", "youki", "krun"]
DEFAULT_SUPPORTS_KVM = ["kata", "kata-runtime", "kata-qemu", "kata-fc", "krun"]
FEATURE_LISTS = {"runtime_supports_json": DEFAULT_SUPPORTS_JSON,
                 "runtime_supports_kvm": DEFAULT_SUPPORTS_KVM}


def _refuse_distribution_file(conf: Path) -> None:
    if str(conf.resolve()).startswith("/usr/share/"):
        raise ConfigError(f"{conf} belongs to the distribution and is replaced on upgrade",
                          "register in /etc/containers/containers.conf instead")


def _load(conf: Path) -> Any:
    try:
        return tomlkit.parse(conf.read_text(encoding="utf-8")) if conf.exists() else \
            tomlkit.document()
    except Exception as exc:
        raise ConfigError(f"{conf} is not valid TOML: {exc}", "fix it by hand first") from None


def _save(conf: Path, doc: Any) -> None:
    from kata_vfio.files import write_atomically

    conf.parent.mkdir(parents=True, exist_ok=True)
    if not conf.exists():
        conf.write_text("")
    write_atomically(conf, tomlkit.dumps(doc).encode())


def register(conf: Path, runtime_path: str, name: str = RUNTIME_NAME) -> bool:
    """Add the runtime and its feature entries; True when the file changed."""
    _refuse_distribution_file(conf)
    doc = _load(conf)
    before = tomlkit.dumps(doc)
    if "engine" not in doc:
        doc["engine"] = tomlkit.table()
    engine = doc["engine"]
    if "runtimes" not in engine:
        engine["runtimes"] = tomlkit.table()
    if engine["runtimes"].get(name) != [runtime_path]:
        engine["runtimes"][name] = [runtime_path]
    for key, default in FEATURE_LISTS.items():
        if key not in engine:
            engine[key] = [*default, name]
        elif name not in engine[key]:
            engine[key].append(name)
    if tomlkit.dumps(doc) == before:
        return False
    _save(conf, doc)
    return True


def unregister(conf: Path, name: str = RUNTIME_NAME) -> bool:
    """Remove what `register` added (podman's default names stay); True when changed."""
    _refuse_distribution_file(conf)
    if not conf.exists():
        return False
    doc = _load(conf)
    engine = doc.get("engine")
    if engine is None:
        return False
    changed = False
    runtimes = engine.get("runtimes")
    if runtimes is not None and name in runtimes:
        del runtimes[name]
        changed = True
    for key in FEATURE_LISTS:
        entries = engine.get(key)
        if entries is not None and name in entries:
            entries.remove(name)
            changed = True
    if changed:
        _save(conf, doc)
    return changed
