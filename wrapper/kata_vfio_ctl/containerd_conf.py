"""Registering kata-vfio with containerd (its CRI plugin): /etc/containerd/config.toml.

One `kata-vfio` table in /etc/containerd/config.toml, its header marked as
ours, edited with tomlkit so comments and other runtimes survive (or appended with its full
name where the tables above it are dotted keys); each edit is checked before it is written,
and `unregister_containerd` takes out exactly the marked table (a file register created is
removed again). Where the runtimes
live depends on the config's `version`: 1 and 2 are containerd 1.x (`cri`,
`io.containerd.grpc.v1.cri`), 3 is containerd 2.x (`io.containerd.cri.v1.runtime`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from kata_vfio.errors import ConfigError
from kata_vfio_ctl.engine_shim import RUNTIME_NAME, ShimRuntime
from kata_vfio_ctl.textfile import without_empty_tables

CONTAINERD_CONF = Path("/etc/containerd/config.toml")
SHIM_RUNTIME_TYPE = "io.containerd.kata-vfio.v2"
ANNOTATION_GLOB = "io.kata-vfio.*"
# containerd config version -> the plugin whose `containerd.runtimes` holds runtimes
CRI_PLUGINS = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
# What register adds (our runtime table's header, a `version` key) carries this mark, so
# unregister takes out only what is ours, never an admin's own kata-vfio runtime.
ADDED_MARK = "# added by kata-vfio-ctl"
CREATED_HEADER = (
    "# Created by kata-vfio-ctl containerd-register; "
    "kata-vfio-ctl containerd-unregister removes this file again.\n"
)


def containerd_binary_version(binary: str = "containerd") -> tuple[int, int]:
    """(major, minor) from `containerd --version`, e.g. "containerd github.com/containerd/
    containerd 1.6.20~ds1 …" or "… containerd/v2 v2.0.0 …"."""
    from kata_vfio.run import run

    out = run(
        [binary, "--version"],
        what="asking containerd for its version",
        hint="pass --config-version 2 (containerd 1.6/1.7) or 3 (containerd 2.x)",
    ).stdout
    match = re.search(r"(?<![\w.])v?(\d+)\.(\d+)\.\d+", out)
    if match is None:
        raise ConfigError(
            f"cannot read a version in {out.strip()!r}",
            "pass --config-version 2 (containerd 1.6/1.7) or 3 (containerd 2.x)",
        )
    return int(match.group(1)), int(match.group(2))


def config_version(data: Any, conf: Path, containerd: str = "containerd") -> int:
    """The config format containerd will read `conf` as.

    A file with a `version` says so. A file with settings but no `version` is read as
    version 1 by every containerd. An empty or missing file takes the format of the
    installed containerd: 2 for 1.x, 3 for 2.x.
    """
    if "version" in data:
        version = data["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version not in CRI_PLUGINS:
            raise ConfigError(
                f"{conf}: unknown config version {version!r}",
                "containerd 1.x writes version = 2, containerd 2.x version = 3",
            )
        return int(version)
    if len(data):
        return 1
    major, _ = containerd_binary_version(containerd)
    return 3 if major >= 2 else 2


def _read(conf: Path) -> Any:
    from kata_vfio_ctl.textfile import read_found

    return read_found(conf, "containerd config")


def _plain(conf: Path, text: str) -> dict[str, Any]:
    """What containerd reads: the file parsed strictly (tomllib, TOML 1.0)."""
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{conf} is not valid TOML: {exc}", "fix it by hand first") from None


def _runtimes_path(version: int) -> tuple[str, ...]:
    return ("plugins", CRI_PLUGINS[version], "containerd", "runtimes")


def _dotted(keys: tuple[str, ...]) -> str:
    return ".".join(k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else f'"{k}"' for k in keys)


def _runtimes(data: dict[str, Any], version: int, conf: Path) -> dict[str, Any] | None:
    node: Any = data
    path = _runtimes_path(version)
    for depth, key in enumerate(path):
        if key not in node:
            return None
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(
                f"{conf}: {_dotted(path[: depth + 1])} is not a table", "fix the file by hand first"
            )
    return node  # type: ignore[no-any-return]


def _indents(runtimes: Any) -> tuple[str, str]:
    """Header and key indentation of a sibling runtime, so ours lines up with it."""
    import tomlkit.items

    for _, item in runtimes.value.body:
        if isinstance(item, tomlkit.items.Table) and not item.is_super_table():
            keys = [
                v
                for _, v in item.value.body
                if not isinstance(v, (tomlkit.items.Whitespace, tomlkit.items.Table))
            ]
            head = item.trivia.indent.lstrip("\n")
            return head, keys[0].trivia.indent if keys else head + "  "
    return "", ""


def _indented(value: Any, indent: str) -> Any:
    import tomlkit

    item = tomlkit.item(value)
    item.trivia.indent = indent
    return item


def _runtime_table(runtime: ShimRuntime, head: str, body: str) -> Any:
    import tomlkit

    # tomlkit prefixes the indentation of a table to whatever is added to it, so the
    # indentation is set once everything is in (absolute, as it appears in the file)
    table = tomlkit.table()
    items: dict[str, Any] = {"runtime_type": SHIM_RUNTIME_TYPE}
    if runtime.shim_path:
        items["runtime_path"] = runtime.shim_path
    items["pod_annotations"] = [ANNOTATION_GLOB]
    items["container_annotations"] = [ANNOTATION_GLOB]
    items["privileged_without_host_devices"] = True
    for key, value in items.items():
        table.add(key, _indented(value, body))
    if runtime.kata_config:
        options = tomlkit.table()
        options.add("ConfigPath", _indented(runtime.kata_config, body + "  "))
        options.trivia.indent = body
        table.add(tomlkit.nl())
        table.add("options", options)
    table.add(tomlkit.nl())
    table.trivia.indent = head
    table.comment(ADDED_MARK)  # the header line says whose table this is
    return table


def wanted_runtime(runtime: ShimRuntime) -> dict[str, Any]:
    """Our runtime table as plain values (what containerd will read)."""
    return _runtime_table(runtime, "", "").unwrap()  # type: ignore[no-any-return]


def _insert_nested(base: str, version: int, runtime: ShimRuntime, created: bool) -> str:
    """Ours beside its sibling runtimes, through tomlkit (the usual layouts)."""
    import tomlkit

    doc = tomlkit.parse(base)
    if "version" not in doc and version != 1:
        # without `version` containerd would read the file as version 1
        if created:
            doc.add(tomlkit.comment(CREATED_HEADER[2:].rstrip("\n")))
        marked = tomlkit.item(version)
        marked.comment(ADDED_MARK)
        doc.add("version", marked)
    node = doc
    for key in _runtimes_path(version):
        if key not in node:
            node.add(key, tomlkit.table(is_super_table=True))
            node[key].trivia.indent = ""  # see below: no blank line outside our table
        node = node[key]
    head, body = _indents(node)
    node.add(RUNTIME_NAME, _runtime_table(runtime, head, body))
    # tomlkit puts a blank line before a new table when the text before it has none;
    # on the next parse that line belongs to the table before ours, and unregister
    # could not take it out again. Ours starts at its header and ends with a blank line.
    node[RUNTIME_NAME].trivia.indent = head
    text = tomlkit.dumps(doc)
    if text.endswith("\n\n") and not base.endswith("\n\n"):
        text = text.rstrip("\n") + "\n"  # ours came last: no blank line at the end
    return text


def _append_table(base: str, version: int, runtime: ShimRuntime, created: bool) -> str:
    """Ours as one table with its full name at the end of the file: for layouts that
    define the tables above it with dotted keys (TOML lets a [header] add a sub-table to a
    table made of dotted keys; containerd reads it)."""
    if _plain(Path("-"), base).get("version") is None and version != 1:
        raise ValueError("the file names no config version")
    block = _insert_nested("", 1, runtime, created=False)
    # _insert_nested wrote it for version 1's path: name the version's own
    old = f"[{_dotted(_runtimes_path(1))}.{RUNTIME_NAME}"
    new = f"[{_dotted(_runtimes_path(version))}.{RUNTIME_NAME}"
    return base + block.replace(old, new)


def _header_path(line: str) -> tuple[str, ...] | None:
    """The table a header line opens, as its keys; None for any other line."""
    import tomllib

    if not line.lstrip().startswith("[") or line.lstrip().startswith("[["):
        return None
    try:
        node: Any = tomllib.loads(line)
    except tomllib.TOMLDecodeError:
        return None
    keys = []
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        keys.append(key)
    return tuple(keys) if node == {} else None


OURS = tuple((*_runtimes_path(v), RUNTIME_NAME) for v in CRI_PLUGINS)


def _our_blocks(text: str) -> list[tuple[int, int]]:
    """Line ranges of the runtime tables register added: from a header marked as ours
    up to the next table that is not one of its own sub-tables."""
    lines = text.splitlines(keepends=True)
    blocks: list[tuple[int, int]] = []
    start: int | None = None
    ours: tuple[str, ...] = ()
    for i, line in enumerate(lines):
        path = _header_path(line) if line.lstrip().startswith("[") else None
        if path is None and not line.lstrip().startswith("[["):
            continue
        if start is not None and (path is None or path[: len(ours)] != ours):
            blocks.append((start, i))
            start = None
        if start is None and path in OURS and line.rstrip().endswith(ADDED_MARK):
            start, ours = i, path
    if start is not None:
        blocks.append((start, len(lines)))
    return blocks


def _take_out(text: str) -> str:
    """`text` without what register added: our tables, and a `version` marked as ours
    once nothing else is left."""
    import tomllib

    lines = text.splitlines(keepends=True)
    for start, end in reversed(_our_blocks(text)):
        del lines[start:end]
    text = "".join(lines)
    try:
        left = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return text
    if list(left) == ["version"]:
        text = re.sub(
            rf"(?m)^version[ \t]*=[ \t]*\d+[ \t]*{re.escape(ADDED_MARK)}[ \t]*\n", "", text
        )
    return text


def _without(data: dict[str, Any], version: int) -> dict[str, Any]:
    """Parsed config without our runtime, `version` and tables empty all the way down."""
    import copy

    data = copy.deepcopy(data)
    data.pop("version", None)
    node: Any = data
    for key in _runtimes_path(version):
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(RUNTIME_NAME, None)
    return without_empty_tables(data)


def _problem(base: str, new: str, version: int, runtime: ShimRuntime, back: str) -> str | None:
    """Why `new` is not `base` plus our runtime where containerd reads it, exactly
    reversible; None when it is."""
    import tomllib

    try:
        after = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        return f"the result would not be valid TOML: {exc}"
    node: Any = after
    for key in _runtimes_path(version):
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or node.get(RUNTIME_NAME) != wanted_runtime(runtime):
        return f"the runtime would not land in {_dotted(_runtimes_path(version))}"
    if after.get("version", version if version != 1 else None) not in (version, None):
        return "the config version would change"
    if _without(after, version) != _without(tomllib.loads(base), version):
        return "other settings would change"
    if _take_out(new) != back:
        return "it could not be taken out again exactly"
    return None


def register_containerd(
    conf: Path,
    runtime: ShimRuntime,
    *,
    version: int | None = None,
    containerd: str = "containerd",
    dry_run: bool = False,
) -> bool:
    """Add (or update) the kata-vfio runtime; True when the file changed.

    The result is checked before anything is written: our runtime where containerd reads
    it, every other setting as it was, and unregister's edit giving back these very
    bytes. A layout where that cannot be had is refused, and so is a `kata-vfio` runtime
    kata-vfio-ctl did not add (the admin's own: never replaced, never removed).
    """
    found = _read(conf)
    text = found.text
    data = _plain(conf, text)
    if version is None:
        version = config_version(data, conf, containerd)
    where = f"{_dotted(_runtimes_path(version))}.{RUNTIME_NAME}"
    runtimes = _runtimes(data, version, conf)
    base = text
    if runtimes is not None and RUNTIME_NAME in runtimes:
        if not _our_blocks(text):
            raise ConfigError(
                f"{conf} already has a {RUNTIME_NAME} runtime ([{where}]) that kata-vfio-ctl "
                "did not add; nothing was changed",
                "rename or remove that table and register again, or keep it as it is",
            )
        if runtimes[RUNTIME_NAME] == wanted_runtime(runtime):
            return False
        base = "".join(
            line
            for i, line in enumerate(text.splitlines(keepends=True))
            if not any(s <= i < e for s, e in _our_blocks(text))
        )
    back = CREATED_HEADER if not found.exists else _take_out(base)
    reasons = []
    for attempt in (_insert_nested, _append_table):
        try:
            new = attempt(base, version, runtime, not found.exists)
        except Exception as exc:  # tomlkit refuses some layouts (inline tables ...)
            if "Inline tables" in str(exc):
                reasons = [
                    "a table above it is written inline ({ ... }), and TOML lets "
                    "nobody add to an inline table"
                ]
                break
            reasons.append(str(exc))
            continue
        problem = _problem(base, new, version, runtime, back)
        if problem is None:
            if new == text:
                return False
            if not dry_run:
                found.save(new)
            return True
        reasons.append(problem)
    raise ConfigError(
        f"{conf}: cannot add [{where}] to this layout safely ({'; '.join(reasons)}); "
        "nothing was changed",
        f"write the tables above it as [..] headers, or add [{where}] by hand",
    )


def unregister_containerd(conf: Path) -> bool:
    """Take out what register added; True when the file changed. A `kata-vfio` runtime
    kata-vfio-ctl did not add is left alone (see `registered_containerd`); a file
    register created is removed once it is back to its header."""
    import tomllib

    found = _read(conf)
    if not found.exists or not _our_blocks(found.text):
        return False
    text = found.text
    new = _take_out(text)
    before = tomllib.loads(text)
    versions = [
        v
        for v in CRI_PLUGINS
        if (*_runtimes_path(v), RUNTIME_NAME)
        in {_header_path(text.splitlines()[s]) for s, _ in _our_blocks(text)}
    ]
    try:
        after = tomllib.loads(new)
        problem = None
        for version in versions:
            before = _without(before, version)
        if without_empty_tables({k: v for k, v in after.items() if k != "version"}) != before:
            problem = "other settings would change"
    except tomllib.TOMLDecodeError as exc:
        problem = f"the result would not be valid TOML: {exc}"
    if problem is not None:
        raise ConfigError(
            f"{conf}: cannot take the {RUNTIME_NAME} runtime out of this layout "
            f"safely ({problem}); nothing was changed",
            f"remove its [..runtimes.{RUNTIME_NAME}] table by hand",
        )
    if new == CREATED_HEADER and not os.path.islink(conf):
        conf.unlink()
    else:
        found.save(new)
    return True


def registered_containerd(conf: Path) -> dict[str, Any] | None:
    """The kata-vfio runtime table as containerd reads it, or None (doctor, tests)."""
    found = _read(conf)
    if not found.exists:
        return None
    data = _plain(conf, found.text)
    for version in CRI_PLUGINS:
        node: Any = data
        for key in _runtimes_path(version):
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and RUNTIME_NAME in node:
            return dict(node[RUNTIME_NAME])
    return None


def containerd_registration_is_ours(conf: Path) -> bool:
    found = _read(conf)
    return found.exists and bool(_our_blocks(found.text))
