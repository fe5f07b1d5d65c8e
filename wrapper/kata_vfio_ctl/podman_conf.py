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
from kata_vfio_ctl.textfile import without_empty_tables

CONTAINERS_CONF = Path("/etc/containers/containers.conf")
RUNTIME_NAME = "kata-vfio"
# podman 4.x defaults, from containers/common pkg/config/default.go
DEFAULT_SUPPORTS_JSON = ["crun", "runc", "kata", "runsc", "youki", "krun"]
DEFAULT_SUPPORTS_KVM = ["kata", "kata-runtime", "kata-qemu", "kata-fc", "krun"]
FEATURE_LISTS = {
    "runtime_supports_json": DEFAULT_SUPPORTS_JSON,
    "runtime_supports_kvm": DEFAULT_SUPPORTS_KVM,
}


def _refuse_distribution_file(conf: Path) -> None:
    if str(conf.resolve()).startswith("/usr/share/"):
        raise ConfigError(
            f"{conf} belongs to the distribution and is replaced on upgrade",
            "register in /etc/containers/containers.conf instead",
        )


# What register adds carries this mark (a comment on its line), so that unregister takes
# out only what is ours: never an admin's own kata-vfio runtime, never a file pointed at
# by mistake. The runtime's mark also names the feature lists register appended it to.
MARK = "# added by kata-vfio-ctl"
LISTED = ", listed in "
CREATED_HEADER = (
    "# Created by kata-vfio-ctl podman-register; "
    "kata-vfio-ctl podman-unregister removes this file again.\n"
)


def _read(conf: Path) -> Any:
    from kata_vfio_ctl.textfile import read_found

    return read_found(conf, "containers.conf")


def _parse(conf: Path, text: str) -> Any:
    import tomllib

    try:
        tomllib.loads(text)  # what podman reads is TOML 1.0; tomlkit is laxer
        return tomlkit.parse(text)
    except Exception as exc:
        raise ConfigError(f"{conf} is not valid TOML: {exc}", "fix it by hand first") from None


def _marked(item: Any) -> bool:
    return bool(item is not None and item.trivia.comment.startswith(MARK))


def _item(table: Any, key: str) -> Any:
    try:
        return table.item(key) if key in table else None
    except AttributeError:  # a table tomlkit pieces together from dotted keys
        return None


def _add_table(parent: Any, key: str) -> None:
    table = tomlkit.table()
    table.comment(MARK)
    parent.add(key, table)
    # tomlkit would open a new table with a blank line, which on the next parse belongs to
    # what stands before it: unregister could not take it out again
    parent[key].trivia.indent = ""


def _add(conf: Path, text: str, runtime_path: str, name: str, created: bool) -> str:
    doc = tomlkit.parse(text)
    if created:
        doc.add(tomlkit.comment(CREATED_HEADER[2:].rstrip("\n")))
    if "engine" not in doc:
        _add_table(doc, "engine")
    engine = doc["engine"]
    listed = []
    for key, default in FEATURE_LISTS.items():  # keys before the sub-table: see _add_table
        if key not in engine:
            item = tomlkit.item([*default, name])
            item.comment(MARK)
            engine[key] = item
        elif not isinstance(engine[key], list):
            raise ConfigError(f"{conf}: engine.{key} is not a list", "fix the file by hand first")
        elif name not in engine[key]:
            engine[key].append(name)
            listed.append(key)
    if "runtimes" not in engine:
        _add_table(engine, "runtimes")
    item = tomlkit.item([runtime_path])
    item.comment(MARK + (LISTED + ", ".join(listed) if listed else ""))
    engine["runtimes"][name] = item
    return tomlkit.dumps(doc)


def _take_out(text: str, name: str) -> str | None:
    """`text` without what register added; None when it holds nothing of ours."""
    doc = tomlkit.parse(text)
    engine: Any = doc.get("engine")
    runtimes: Any = engine.get("runtimes") if isinstance(engine, dict) else None
    ours: Any = _item(runtimes, name) if isinstance(runtimes, dict) else None
    if not _marked(ours):
        return None
    comment = ours.trivia.comment
    listed = comment.split(LISTED, 1)[1].split(", ") if LISTED in comment else []
    del runtimes[name]
    for key in FEATURE_LISTS:
        if _marked(_item(engine, key)):
            del engine[key]
        elif key in listed and name in (engine.get(key) or []):
            engine[key].remove(name)
    if not runtimes and _marked(runtimes):
        del engine["runtimes"]
    if not engine and _marked(engine):
        del doc["engine"]
    return tomlkit.dumps(doc)


def _problem(base: str, new: str, runtime_path: str, name: str, back: str) -> str | None:
    import tomllib

    try:
        after, before = tomllib.loads(new), tomllib.loads(base)
    except tomllib.TOMLDecodeError as exc:
        return f"the result would not be valid TOML: {exc}"
    engine = after.get("engine") or {}
    if (engine.get("runtimes") or {}).get(name) != [runtime_path] or not all(
        name in (engine.get(key) or []) for key in FEATURE_LISTS
    ):
        return "the runtime would not land in [engine.runtimes]"
    del engine["runtimes"][name]
    old = before.get("engine") or {}
    for key in FEATURE_LISTS:
        if key not in old:
            del engine[key]
        elif name not in old[key]:
            engine[key].remove(name)
    if without_empty_tables(after) != without_empty_tables(before):
        return "other settings would change"
    if _take_out(new, name) != back:
        return "it could not be taken out again exactly"
    return None


def register(
    conf: Path, runtime_path: str, name: str = RUNTIME_NAME, *, dry_run: bool = False
) -> bool:
    """Add the runtime and its feature entries; True when the file changed.

    Checked before anything is written: the runtime where podman reads it, every other
    setting as it was, and unregister's edit giving back these very bytes; a layout where
    that cannot be had is refused. An admin's own `kata-vfio` runtime is never replaced.
    """
    _refuse_distribution_file(conf)
    found = _read(conf)
    text = found.text
    doc = _parse(conf, text)
    engine = doc.get("engine")
    runtimes = engine.get("runtimes") if isinstance(engine, dict) else None
    base = text
    if isinstance(runtimes, dict) and name in runtimes:
        mine = _marked(_item(runtimes, name))
        if runtimes[name] == [runtime_path] and (
            not mine or all(name in (engine.get(k) or []) for k in FEATURE_LISTS)
        ):
            return False
        if not mine:
            raise ConfigError(
                f"{conf} already has a runtime {name} = {runtimes[name].unwrap()!r} that "
                "kata-vfio-ctl did not add; nothing was changed",
                "rename or remove it and register again, or keep it as it is",
            )
        base = _take_out(text, name) or text
    back = CREATED_HEADER if not found.exists else base
    try:
        new = _add(conf, base, runtime_path, name, not found.exists)
        problem = _problem(base, new, runtime_path, name, back)
    except ConfigError:
        raise
    except Exception:  # tomlkit cannot edit some layouts (dotted keys out of order ...)
        problem = "[engine] is made of dotted keys or inline tables here"
    if problem is not None:
        raise ConfigError(
            f"{conf}: cannot add the {name} runtime to this layout safely "
            f"({problem}); nothing was changed",
            f"write [engine] and [engine.runtimes] as tables, or add {name} = "
            f'["{runtime_path}"] to [engine.runtimes] by hand',
        )
    if new == text:
        return False
    if not dry_run:
        found.save(new)
    return True


def unregister(conf: Path, name: str = RUNTIME_NAME) -> bool:
    """Remove what `register` added (podman's default names stay); True when changed.
    A runtime of that name kata-vfio-ctl did not add is left alone."""
    import os

    _refuse_distribution_file(conf)
    found = _read(conf)
    if not found.exists:
        return False
    _parse(conf, found.text)
    try:
        new = _take_out(found.text, name)
    except Exception:  # tomlkit cannot edit some layouts
        raise ConfigError(
            f"{conf}: cannot take the {name} runtime out of this layout safely; "
            "nothing was changed",
            f"remove {name} from [engine.runtimes] by hand",
        ) from None
    if new is None:
        return False
    if new == CREATED_HEADER and not os.path.islink(conf):
        conf.unlink()
    else:
        found.save(new)
    return True


def registered(conf: Path, name: str = RUNTIME_NAME) -> tuple[Any, bool]:
    """(the runtime's value or None, whether kata-vfio-ctl added it)."""
    found = _read(conf)
    if not found.exists:
        return None, False
    doc = _parse(conf, found.text)
    engine = doc.get("engine")
    runtimes = engine.get("runtimes") if isinstance(engine, dict) else None
    if not isinstance(runtimes, dict) or name not in runtimes:
        return None, False
    return runtimes[name].unwrap(), _marked(_item(runtimes, name))
