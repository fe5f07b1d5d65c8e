#!/usr/bin/env python3
"""`make install` / `make uninstall`: kata-vfio on a node, from its wheel.

    install.py install --wheel W --doctools D [--destdir R] [--prefix /usr/local] ...
    install.py uninstall [--destdir R] [--prefix /usr/local]
    install.py build-requirements      # the `build` extra of pyproject.toml, one a line

The package and its PyPI dependencies go into a private directory,
PREFIX/lib/kata-vfio/python, with `pip install --target`: a plain directory of files, so
it can be written under DESTDIR and used from wherever it ends up (a venv cannot: its
scripts and pyvenv.cfg name the path it was made at). PREFIX/bin gets small launchers
that run the interpreter isolated (-I -S: no site-packages of the system, no PYTHONPATH)
with that directory first on sys.path, found relative to the launcher's own real path.
The launchers are real files in PREFIX/bin, so the register commands, which name the
commands beside the running one, register PREFIX/bin/kata-vfio and
PREFIX/bin/containerd-shim-kata-vfio-v2.

Also: the man page and bash/zsh completions of kata-vfio-ctl, generated from its argparse
parser by argparse-manpage and shtab (the `build` extra); the dracut module; every unit in
systemd/; config.toml with the defaults commented out, only when there is none;
a logrotate snippet for the log file. Everything written is listed in
PREFIX/lib/kata-vfio/installed.txt, which uninstall removes exactly (config.toml only
when it is still the file install wrote).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "installed.txt"
PAYLOAD = "python"
# name on PATH -> the module whose main() it runs
COMMANDS = {
    "kata-vfio-ctl": "kata_vfio_ctl.main",
    "kata-vfio": "kata_vfio_runtime.main",
    "containerd-shim-kata-vfio-v2": "kata_vfio_runtime.shim",
}
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path", ".target")

LAUNCHER = """#!{python} -IS
# {name}: installed by kata-vfio's make install. Runs the package installed in
# {payload_rel} (relative to this file's real directory), isolated from the system's
# site-packages and PYTHONPATH.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), {payload_rel!r}))
from {module} import main

sys.exit(main())
"""

LOGROTATE = """# kata-vfio's log (log_file in {config}): JSON lines appended by every
# kata-vfio command; the device plugin keeps it open, hence copytruncate.
{log_file} {{
    weekly
    rotate 8
    maxsize 50M
    compress
    delaycompress
    missingok
    notifempty
    copytruncate
}}
"""

# run with the installed payload and the doc tools on sys.path: writes the man page and
# the completion scripts of the installed kata-vfio-ctl's own parser
_DOCS = """
import json, sys
man, bash, zsh, version = json.loads(sys.argv[1])
from argparse_manpage.manpage import Manpage
import shtab
from kata_vfio_ctl.parser import build_parser
parser = build_parser()
data = {"project_name": "kata-vfio", "version": version, "manual_title": "kata-vfio manual",
        "manual_section": 1}
open(man, "w").write(str(Manpage(parser, data)))
open(bash, "w").write(shtab.complete(parser, shell="bash"))
parser = build_parser()
open(zsh, "w").write(shtab.complete(parser, shell="zsh"))
"""

# config.toml with every scalar setting at its default, commented out, described by the
# schema: generated from the installed package, so it cannot disagree with it
_CONFIG = """
import json, sys
from importlib.resources import files
from kata_vfio_host.settings import Settings
schema = json.loads(files("kata_vfio_host").joinpath("config-schema.json").read_text())
defaults = Settings()
lines = ["# kata-vfio configuration. Every setting below is at its default; uncomment to",
         "# change one. Validated against kata_vfio_host/config-schema.json.", ""]
for key, spec in schema["properties"].items():
    value = getattr(defaults, key, None)
    if not isinstance(value, (str, bool, int, float)):
        continue
    if spec.get("description"):
        lines.append("# " + spec["description"])
    lines.append(f"# {key} = {json.dumps(value)}")
lines += ["", "# [autobind]", '# allow = ["0000:03:*.*", "15b3:101e"]   # default: nothing', ""]
print("\\n".join(lines), end="")
"""


class InstallError(Exception):
    pass


class Layout:
    """Where each part goes: final paths (what the node sees) and staged paths (under
    DESTDIR, what this run writes)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.destdir = args.destdir or ""
        self.prefix = Path(args.prefix)
        self.bindir = self.prefix / "bin"
        self.pkglib = self.prefix / "lib/kata-vfio"
        self.payload = self.pkglib / PAYLOAD
        self.mandir = self.prefix / "share/man"
        self.bash_completions = self.prefix / "share/bash-completion/completions"
        self.zsh_functions = self.prefix / "share/zsh/site-functions"
        self.sysconfdir = Path(args.sysconfdir)
        self.config = self.sysconfdir / "kata-vfio/config.toml"
        self.logrotate = self.sysconfdir / "logrotate.d/kata-vfio"
        self.unitdir = Path(args.unitdir) if args.unitdir else self.prefix / "lib/systemd/system"
        self.dracut_modules = Path(args.dracut_modules_dir)
        self.manifest = self.pkglib / MANIFEST

    def staged(self, path: Path) -> Path:
        """`path` under DESTDIR (the path itself without one)."""
        if not self.destdir:
            return path
        return Path(self.destdir) / path.relative_to("/")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(f".{path.name}.new")
    fresh.write_text(text)
    fresh.chmod(mode)
    os.replace(fresh, path)


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise InstallError(f"{what} failed (exit {done.returncode}): {tail[0]}")


def _read_manifest(path: Path) -> list[tuple[str, ...]]:
    if not path.exists():
        return []
    return [tuple(line.split("\t")) for line in path.read_text().splitlines() if line]


def _payload(layout: Layout, wheel: Path, python: str) -> None:
    """The wheel and its dependencies into PREFIX/lib/kata-vfio/python, replaced whole."""
    target = layout.staged(layout.payload)
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=".python.", dir=target.parent))
    try:
        _run(
            [
                python,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-warn-script-location",
                "--root-user-action=ignore",
                "--target",
                str(fresh),
                str(wheel),
            ],
            f"pip install of {wheel.name} into {layout.payload}",
        )
        shutil.rmtree(fresh / "bin", ignore_errors=True)  # pip's scripts: the launchers serve
        fresh.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.rename(fresh, target)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def _launchers(layout: Layout, python: str) -> list[Path]:
    rel = os.path.relpath(layout.payload, layout.bindir)
    written = []
    for name, module in COMMANDS.items():
        path = layout.bindir / name
        _write(
            layout.staged(path),
            LAUNCHER.format(python=python, name=name, module=module, payload_rel=rel),
            0o755,
        )
        written.append(path)
    return written


def _docs(layout: Layout, python: str, doctools: Path, version: str) -> list[Path]:
    man = layout.mandir / "man1/kata-vfio-ctl.1"
    bash = layout.bash_completions / "kata-vfio-ctl"
    zsh = layout.zsh_functions / "_kata-vfio-ctl"
    for path in (man, bash, zsh):
        layout.staged(path).parent.mkdir(parents=True, exist_ok=True)
    paths = [str(layout.staged(p)) for p in (man, bash, zsh)]
    boot = (
        f"import sys; sys.path[:0] = {[str(layout.staged(layout.payload)), str(doctools)]!r}"
        "\n" + _DOCS
    )
    _run(
        [python, "-I", "-S", "-c", boot, json.dumps([*paths, version])],
        "generating the man page and completions (argparse-manpage, shtab)",
    )
    for path in paths:
        os.chmod(path, 0o644)
    return [man, bash, zsh]


def _config_text(layout: Layout, python: str) -> str:
    boot = f"import sys; sys.path[:0] = {[str(layout.staged(layout.payload))]!r}\n" + _CONFIG
    done = subprocess.run([python, "-I", "-S", "-c", boot], capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError(
            "generating config.toml failed: "
            + (done.stderr.strip().splitlines() or ["no output"])[-1]
        )
    return done.stdout


def _dracut_module(layout: Layout, python: str) -> Path:
    target = layout.dracut_modules / "90kata-vfio"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(layout.staged(layout.payload)),
    }
    _run(
        [
            python,
            str(REPO / "initrd/dracut_module.py"),
            "--modules-dir",
            str(layout.staged(layout.dracut_modules)),
        ],
        "writing the dracut module",
        env,
    )
    return target


def _units(layout: Layout) -> list[Path]:
    """Every unit in systemd/, with @BINDIR@ (or /usr/local/bin) pointing at PREFIX/bin."""
    written = []
    source = REPO / "systemd"
    for unit in sorted(source.iterdir()) if source.is_dir() else []:
        if not unit.name.endswith(UNIT_SUFFIXES):
            continue
        text = (
            unit.read_text()
            .replace("@BINDIR@", str(layout.bindir))
            .replace("@SYSCONFDIR@", str(layout.sysconfdir))
            .replace("/usr/local/bin/kata-vfio", f"{layout.bindir}/kata-vfio")
        )
        path = layout.unitdir / unit.name
        _write(layout.staged(path), text)
        written.append(path)
    return written


def install(args: argparse.Namespace) -> int:
    layout = Layout(args)
    python = args.python
    wheel = Path(args.wheel).resolve()
    version = wheel.name.split("-")[1]
    old = _read_manifest(layout.staged(layout.manifest))
    # the directories this install creates (and those an earlier one did): uninstall
    # removes them when empty, and never a directory that was there before
    targets = [
        layout.payload,
        layout.bindir,
        layout.mandir / "man1",
        layout.bash_completions,
        layout.zsh_functions,
        layout.dracut_modules,
        layout.unitdir,
        layout.config.parent,
        layout.logrotate.parent,
    ]
    created = {e[1] for e in old if e[0] == "dir"}
    for target in targets:
        for parent in (target, *target.parents):
            if layout.staged(parent).exists():
                break
            created.add(str(parent))
    entries: list[tuple[str, ...]] = [("tree", str(layout.payload))]
    _payload(layout, wheel, python)
    entries += [("file", str(p)) for p in _launchers(layout, python)]
    entries += [("file", str(p)) for p in _docs(layout, python, Path(args.doctools), version)]
    entries.append(("tree", str(_dracut_module(layout, python))))
    entries += [("file", str(p)) for p in _units(layout)]

    from_before = [e for e in old if e[0] == "config"]
    staged_config = layout.staged(layout.config)
    if not staged_config.exists():
        _write(staged_config, _config_text(layout, python))
        entries.append(("config", str(layout.config), _sha256(staged_config)))
        print(f"{layout.config}: written (every setting at its default)")
    else:
        # keep install's claim on a config.toml an earlier install wrote
        entries += [e for e in from_before if e[1] == str(layout.config)]
        print(f"{layout.config}: present, left as it is")
    sys.path.insert(0, str(layout.staged(layout.payload)))
    from kata_vfio.defaults import DEFAULT_LOG_FILE  # the installed package's own default

    _write(
        layout.staged(layout.logrotate),
        LOGROTATE.format(config=layout.config, log_file=DEFAULT_LOG_FILE),
    )
    entries.append(("file", str(layout.logrotate)))
    entries.append(("file", str(layout.manifest)))
    # deepest first, so that uninstall empties a directory before its parent
    entries += [("dir", d) for d in sorted(created, key=lambda d: (-d.count("/"), d))]
    _write(layout.staged(layout.manifest), "".join("\t".join(e) + "\n" for e in entries))
    print(
        f"installed kata-vfio {version}: {', '.join(COMMANDS)} in {layout.bindir}; "
        f"uninstall with: make uninstall PREFIX={layout.prefix}"
    )
    return 0


def uninstall(args: argparse.Namespace) -> int:
    layout = Layout(args)
    manifest = layout.staged(layout.manifest)
    entries = _read_manifest(manifest)
    if not entries:
        raise InstallError(
            f"no kata-vfio installed under {layout.prefix} ({layout.manifest} "
            "is missing): give the PREFIX (and DESTDIR) the install used"
        )
    for kind, final, *rest in entries:
        path = layout.staged(Path(final))
        if kind == "dir":
            try:
                path.rmdir()
            except OSError:  # not empty (something else put files there) or gone: leave it
                pass
        elif kind == "tree":
            shutil.rmtree(path, ignore_errors=True)
        elif kind == "config":
            if path.exists() and _sha256(path) != rest[0]:
                print(f"{final}: changed since install, kept")
                continue
            path.unlink(missing_ok=True)
        else:
            path.unlink(missing_ok=True)
    print(f"uninstalled kata-vfio from {layout.prefix}")
    return 0


def build_requirements(_: argparse.Namespace) -> int:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    print("\n".join(data["project"]["optional-dependencies"]["build"]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("install", install), ("uninstall", uninstall)):
        p = sub.add_parser(name)
        p.add_argument("--destdir", default="")
        p.add_argument("--prefix", default="/usr/local")
        p.add_argument("--sysconfdir", default="/etc")
        p.add_argument("--unitdir", default="", help="default: PREFIX/lib/systemd/system")
        p.add_argument("--dracut-modules-dir", default="/usr/lib/dracut/modules.d")
        p.add_argument("--python", default="/usr/bin/python3")
        if name == "install":
            p.add_argument("--wheel", required=True)
            p.add_argument(
                "--doctools",
                required=True,
                help="where the `build` extra is installed (pip --target)",
            )
        p.set_defaults(func=func)
    sub.add_parser("build-requirements").set_defaults(func=build_requirements)
    args = parser.parse_args()
    for name in ("destdir", "prefix", "sysconfdir", "unitdir", "dracut_modules_dir"):
        value = getattr(args, name, "")
        if value and not value.startswith("/"):
            print(
                f"install.py: {name.upper()} {value!r} is not an absolute path; give one",
                file=sys.stderr,
            )
            return 2
    try:
        code: int = args.func(args)
        return code
    except InstallError as exc:
        print(f"install.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
