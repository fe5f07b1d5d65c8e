"""Registering kata-vfio with containerd (its CRI plugin) and with CRI-O.

Both engines start the shim wrapper `containerd-shim-kata-vfio-v2`, which edits the
spec and execs Kata's shim. containerd maps the runtime type `io.containerd.kata-vfio.v2`
to that binary (or to `runtime_path`); CRI-O runs `runtime_path` for `runtime_type = "vm"`
and requires the `containerd-shim-` prefix in its name.

containerd: one `kata-vfio` table in /etc/containerd/config.toml, edited with tomlkit so
comments and other runtimes survive, and `unregister_containerd` takes out exactly what
`register_containerd` put in (a file it created is removed again). Where the runtimes
live depends on the config's `version`: 1 and 2 are containerd 1.x (`cri`,
`io.containerd.grpc.v1.cri`), 3 is containerd 2.x (`io.containerd.cri.v1.runtime`).
CRI-O: a drop-in of our own, /etc/crio/crio.conf.d/50-kata-vfio.conf.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_vfio.errors import ConfigError, UsageError

CONTAINERD_CONF = Path("/etc/containerd/config.toml")
CRIO_DROPIN = Path("/etc/crio/crio.conf.d/50-kata-vfio.conf")
RUNTIME_NAME = "kata-vfio"
SHIM_RUNTIME_TYPE = "io.containerd.kata-vfio.v2"
SHIM_BINARY = "containerd-shim-kata-vfio-v2"
SHIM_PREFIX = "containerd-shim-"
# What users may ask the wrapper for; io.kata-vfio.manifest is the wrapper's own
# output (it strips forged ones), so it is not listed. CRI-O copies pod annotations into
# the OCI spec anyway; allowed_annotations gates the ones CRI-O itself acts on, so this
# list states intent and keeps working if CRI-O ever filters more.
USER_ANNOTATIONS = ("io.kata-vfio.devices", "io.kata-vfio.select", "io.kata-vfio.vf-config")
ANNOTATION_GLOB = "io.kata-vfio.*"
# containerd config version -> the plugin whose `containerd.runtimes` holds runtimes
CRI_PLUGINS = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
# A key we add to a file that had none is marked, so that unregister knows it is ours.
ADDED_MARK = "# added by kata-vfio-ctl"
CREATED_HEADER = ("# Created by kata-vfio-ctl containerd-register; "
                  "kata-vfio-ctl containerd-unregister removes this file again.\n")


@dataclass(frozen=True)
class ShimRuntime:
    """What an engine needs to start kata-vfio's shim wrapper."""

    shim_path: str | None = None    # absolute path; None: containerd finds it on its PATH
    kata_config: str | None = None  # the Kata configuration.toml the shim should use


def default_shim_path() -> str:
    """The shim wrapper installed beside this kata-vfio-ctl (a venv's bin, /usr/bin …)."""
    return str(Path(sys.argv[0]).resolve().with_name(SHIM_BINARY))


def check_shim_path(path: str, *, require_prefix: bool) -> None:
    """An engine execs this path itself: absolute, executable, named as it demands."""
    if not os.path.isabs(path):
        raise UsageError(f"shim path {path!r} is not absolute",
                         f"give the full path of {SHIM_BINARY}")
    if require_prefix and not os.path.basename(path).startswith(SHIM_PREFIX):
        raise UsageError(
            f"CRI-O only runs shims named {SHIM_PREFIX}*, not {os.path.basename(path)!r}",
            f"point --shim-path at {SHIM_BINARY} (a symlink with that name will do)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise ConfigError(f"{path} is not an executable file",
                          f"install kata-vfio so that {SHIM_BINARY} exists, or pass "
                          "--shim-path")


# --- containerd ----------------------------------------------------------------------


def containerd_binary_version(binary: str = "containerd") -> tuple[int, int]:
    """(major, minor) from `containerd --version`, e.g. "containerd github.com/containerd/
    containerd 1.6.20~ds1 …" or "… containerd/v2 v2.0.0 …"."""
    from kata_vfio.run import run

    out = run([binary, "--version"], what="asking containerd for its version",
              hint="pass --config-version 2 (containerd 1.6/1.7) or 3 (containerd 2.x)").stdout
    match = re.search(r"(?<![\w.])v?(\d+)\.(\d+)\.\d+", out)
    if match is None:
        raise ConfigError(f"cannot read a version in {out.strip()!r}",
                          "pass --config-version 2 (containerd 1.6/1.7) or 3 (containerd 2.x)")
    return int(match.group(1)), int(match.group(2))


def config_version(doc: Any, conf: Path, containerd: str = "containerd") -> int:
    """The config format containerd will read `conf` as.

    A file with a `version` says so. A file with settings but no `version` is read as
    version 1 by every containerd. An empty or missing file takes the format of the
    installed containerd: 2 for 1.x, 3 for 2.x.
    """
    if "version" in doc:
        version = doc["version"]
        if not isinstance(version, int) or version not in CRI_PLUGINS:
            raise ConfigError(f"{conf}: unknown config version {version!r}",
                              "containerd 1.x writes version = 2, containerd 2.x version = 3")
        return int(version)
    if len(doc):
        return 1
    major, _ = containerd_binary_version(containerd)
    return 3 if major >= 2 else 2


def _load(conf: Path) -> Any:
    import tomlkit

    try:
        return tomlkit.parse(conf.read_text(encoding="utf-8"))
    except Exception as exc:
        raise ConfigError(f"{conf} is not valid TOML: {exc}", "fix it by hand first") from None


def _save(conf: Path, text: str) -> None:
    from kata_vfio.files import write_atomically

    conf.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(conf, text.encode())


def _runtimes_path(version: int) -> tuple[str, ...]:
    return ("plugins", CRI_PLUGINS[version], "containerd", "runtimes")


def _indents(runtimes: Any) -> tuple[str, str]:
    """Header and key indentation of a sibling runtime, so ours lines up with it."""
    import tomlkit.items

    for _, item in runtimes.value.body:
        if isinstance(item, tomlkit.items.Table) and not item.is_super_table():
            keys = [v for _, v in item.value.body
                    if not isinstance(v, (tomlkit.items.Whitespace, tomlkit.items.Table))]
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
    return table


def wanted_runtime(runtime: ShimRuntime) -> dict[str, Any]:
    """Our runtime table as plain values (what containerd will read)."""
    return _runtime_table(runtime, "", "").unwrap()  # type: ignore[no-any-return]


def register_containerd(conf: Path, runtime: ShimRuntime, *, version: int | None = None,
                        containerd: str = "containerd") -> bool:
    """Add (or update) the kata-vfio runtime; True when the file changed."""
    import tomlkit

    created = not conf.exists()
    doc = tomlkit.document() if created else _load(conf)
    before = tomlkit.dumps(doc)
    if version is None:
        version = config_version(doc, conf, containerd)
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
        if not isinstance(node, dict):
            raise ConfigError(f"{conf}: {'.'.join(_runtimes_path(version))} is not a table",
                              "fix the file by hand first")
    if RUNTIME_NAME in node:
        if node[RUNTIME_NAME].unwrap() == wanted_runtime(runtime):
            return False
        del node[RUNTIME_NAME]
    head, body = _indents(node)
    node.add(RUNTIME_NAME, _runtime_table(runtime, head, body))
    # tomlkit puts a blank line before a new table when the text before it has none;
    # on the next parse that line belongs to the table before ours, and unregister
    # could not take it out again. Ours starts at its header and ends with a blank line.
    node[RUNTIME_NAME].trivia.indent = head
    text = tomlkit.dumps(doc)
    if text.endswith("\n\n") and not before.endswith("\n\n"):
        text = text.rstrip("\n") + "\n"  # ours came last: no blank line at the end
    if text == before:
        return False
    _save(conf, text)
    return True


def unregister_containerd(conf: Path) -> bool:
    """Remove the kata-vfio runtime and whatever register added around it; True when changed.

    Tables that only existed to hold it (implicit super-tables) go with it, a `version`
    key marked as ours goes when nothing else is left, and a file register created is
    removed once it is back to its header.
    """
    import tomlkit

    if not conf.exists():
        return False
    doc = _load(conf)
    found = _find_runtime(doc)
    if found is None:
        return False
    version, chain = found
    del chain[-1][RUNTIME_NAME]
    keys = _runtimes_path(version)
    for depth in range(len(keys), 0, -1):
        table = chain[depth]
        if len(table) or not table.is_super_table():
            break
        del chain[depth - 1][keys[depth - 1]]
    version_item: Any = doc.item("version") if "version" in doc else None
    if list(doc) == ["version"] and version_item.trivia.comment == ADDED_MARK:
        doc.remove("version")
    text = tomlkit.dumps(doc)
    if text == CREATED_HEADER:
        conf.unlink()
    else:
        _save(conf, text)
    return True


def _find_runtime(doc: Any) -> tuple[int, list[Any]] | None:
    """The config version whose runtimes table holds ours, and the tables down to it."""
    for version in CRI_PLUGINS:
        chain = [doc]
        for key in _runtimes_path(version):
            nxt = chain[-1].get(key)
            if not isinstance(nxt, dict):
                break
            chain.append(nxt)
        else:
            if RUNTIME_NAME in chain[-1]:
                return version, chain
    return None


def registered_containerd(conf: Path) -> dict[str, Any] | None:
    """The kata-vfio runtime table as containerd reads it, or None (doctor, tests)."""
    import tomllib

    if not conf.exists():
        return None
    data = tomllib.loads(conf.read_text(encoding="utf-8"))
    for version in CRI_PLUGINS:
        node: Any = data
        for key in _runtimes_path(version):
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and RUNTIME_NAME in node:
            return dict(node[RUNTIME_NAME])
    return None


# --- CRI-O ---------------------------------------------------------------------------


def crio_dropin_text(runtime: ShimRuntime) -> str:
    """The drop-in CRI-O reads after crio.conf; all of it is ours."""
    import json

    if runtime.shim_path is None:
        raise UsageError("CRI-O needs the shim's absolute path", "pass --shim-path")
    # JSON strings are valid TOML basic strings (the same escapes)
    lines = [
        "# kata-vfio: VFIO devices in Kata containers. Written by kata-vfio-ctl",
        "# crio-register; kata-vfio-ctl crio-unregister removes this file.",
        f"[crio.runtime.runtimes.{RUNTIME_NAME}]",
        'runtime_type = "vm"',
        f"runtime_path = {json.dumps(runtime.shim_path)}",
    ]
    if runtime.kata_config:
        lines.append(f"runtime_config_path = {json.dumps(runtime.kata_config)}")
    lines += [
        "privileged_without_host_devices = true",
        "allowed_annotations = [" + ", ".join(json.dumps(a) for a in USER_ANNOTATIONS) + "]",
    ]
    return "\n".join(lines) + "\n"


def register_crio(dropin: Path, runtime: ShimRuntime) -> bool:
    """Write the drop-in; True when it changed."""
    if runtime.shim_path is None:
        raise UsageError("CRI-O needs the shim's absolute path", "pass --shim-path")
    check_shim_path(runtime.shim_path, require_prefix=True)
    text = crio_dropin_text(runtime)
    if dropin.exists() and dropin.read_text(encoding="utf-8") == text:
        return False
    _save(dropin, text)
    return True


def unregister_crio(dropin: Path) -> bool:
    try:
        dropin.unlink()
    except FileNotFoundError:
        return False
    return True


# --- the command line ----------------------------------------------------------------


def _shim_runtime(args: argparse.Namespace, *, crio: bool) -> ShimRuntime:
    shim = args.shim_path
    if shim is None and (crio or os.path.exists(default_shim_path())):
        shim = default_shim_path()
    if shim is not None:
        check_shim_path(shim, require_prefix=crio)
    kata = str(Path(args.kata_config).absolute()) if args.kata_config else None
    return ShimRuntime(shim_path=shim, kata_config=kata)


def cmd_containerd_register(args: argparse.Namespace) -> int:
    runtime = _shim_runtime(args, crio=False)
    changed = register_containerd(Path(args.conf), runtime, version=args.config_version)
    print(f"{args.conf}: {'registered' if changed else 'already registered'} runtime "
          f"{RUNTIME_NAME} ({SHIM_RUNTIME_TYPE}); restart containerd to use it")
    return 0


def cmd_containerd_unregister(args: argparse.Namespace) -> int:
    changed = unregister_containerd(Path(args.conf))
    print(f"{args.conf}: {'removed' if changed else 'not registered:'} {RUNTIME_NAME}")
    return 0


def cmd_crio_register(args: argparse.Namespace) -> int:
    changed = register_crio(Path(args.dropin), _shim_runtime(args, crio=True))
    print(f"{args.dropin}: {'written' if changed else 'already up to date'}; "
          "restart CRI-O to use it")
    return 0


def cmd_crio_unregister(args: argparse.Namespace) -> int:
    print(f"{args.dropin}: {'removed' if unregister_crio(Path(args.dropin)) else 'absent'}")
    return 0


def add_install_options(p: argparse.ArgumentParser, *, install: bool) -> None:
    """`install`/`uninstall --containerd [CONFIG] --crio [DROPIN]`."""
    p.add_argument("--containerd", nargs="?", const=str(CONTAINERD_CONF), metavar="CONFIG",
                   help=f"also (un)register with containerd (default: {CONTAINERD_CONF})")
    p.add_argument("--crio", nargs="?", const=str(CRIO_DROPIN), metavar="DROPIN",
                   help=f"also (un)register with CRI-O (default: {CRIO_DROPIN})")
    if install:
        p.add_argument("--shim-path", metavar="PATH",
                       help=f"absolute path of {SHIM_BINARY} (default: beside kata-vfio-ctl)")


def install_engines(args: argparse.Namespace, kata_config: str | None) -> list[str]:
    """Register with the engines `install` was asked for; one line of news each.

    `kata_config` is the Kata configuration the shim should use (ConfigPath /
    runtime_config_path), e.g. the kata-vfio configuration install wrote.
    """
    news = []
    if args.containerd:
        runtime = _shim_runtime(argparse.Namespace(shim_path=args.shim_path,
                                                   kata_config=kata_config), crio=False)
        changed = register_containerd(Path(args.containerd), runtime)
        news.append(f"{args.containerd}: "
                    f"{'registered' if changed else 'already registered'} {RUNTIME_NAME}")
    if args.crio:
        runtime = _shim_runtime(argparse.Namespace(shim_path=args.shim_path,
                                                   kata_config=kata_config), crio=True)
        changed = register_crio(Path(args.crio), runtime)
        news.append(f"{args.crio}: {'written' if changed else 'already up to date'}")
    return news


def uninstall_engines(args: argparse.Namespace) -> list[str]:
    news = []
    if args.containerd:
        removed = unregister_containerd(Path(args.containerd))
        news.append(f"{args.containerd}: {'removed' if removed else 'not registered:'} "
                    f"{RUNTIME_NAME}")
    if args.crio:
        news.append(f"{args.crio}: {'removed' if unregister_crio(Path(args.crio)) else 'absent'}")
    return news


def add_shim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shim-path", metavar="PATH",
                   help=f"absolute path of {SHIM_BINARY} (default: beside kata-vfio-ctl)")
    p.add_argument("--kata-config", metavar="PATH",
                   help="Kata configuration.toml the shim uses (default: Kata's own search)")


def add_parsers(sub: Any) -> None:
    """containerd-register/-unregister, crio-register/-unregister."""
    p = sub.add_parser("containerd-register",
                       help=f"add the {RUNTIME_NAME} runtime to containerd's config.toml")
    p.add_argument("--conf", default=str(CONTAINERD_CONF))
    p.add_argument("--config-version", type=int, choices=sorted(CRI_PLUGINS),
                   help="config format when the file does not say (default: from "
                        "`containerd --version`: 2 for 1.x, 3 for 2.x)")
    add_shim_options(p)
    p.set_defaults(func=cmd_containerd_register)

    p = sub.add_parser("containerd-unregister", help="remove it again, exactly")
    p.add_argument("--conf", default=str(CONTAINERD_CONF))
    p.set_defaults(func=cmd_containerd_unregister)

    p = sub.add_parser("crio-register", help=f"write the CRI-O drop-in {CRIO_DROPIN.name}")
    p.add_argument("--dropin", default=str(CRIO_DROPIN))
    add_shim_options(p)
    p.set_defaults(func=cmd_crio_register)

    p = sub.add_parser("crio-unregister", help="remove the CRI-O drop-in")
    p.add_argument("--dropin", default=str(CRIO_DROPIN))
    p.set_defaults(func=cmd_crio_unregister)
