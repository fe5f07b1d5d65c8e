#!/usr/bin/env python3
"""Make the kata-vfio dracut module self-contained, so the system's dracut can use it.

    make install-dracut-module [DRACUT_MODULES_DIR=/usr/lib/dracut/modules.d]

writes ``<modules.d>/90kata-vfio`` with everything its ``install()`` needs beside it:

    module-setup.sh   the module itself (check / depends / installkernel / install)
    kata-vfio-hook    the hook's launcher, a real file in the image (kata-agent skips symlinks)
    pylib/            the kata_vfio and kata_vfio_hook packages, for /usr/lib/kata-vfio
    pyc/              bytecode for every one of those .py files (unchecked-hash pycs):
                      the hook's first run in each VM, the one Kata pays for, compiles nothing
    files.tsv         "source<TAB>destination": exactly the standard-library files the hook
                      imports (absolute paths on this host), pylib/ and pyc/ (relative paths)
    python            the interpreter to install as /usr/bin/python3

`make initrd` (build.py) generates the same thing into a temporary copy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pyclosure import GUEST_LIB, HOOK_IMPORTS, HOOK_PACKAGES, closure  # noqa: E402

MODULE_NAME = "90kata-vfio"
MODULE_SOURCE = HERE / MODULE_NAME
SYSTEM_MODULES = Path("/usr/lib/dracut/modules.d")
GUEST_PYTHON = "/usr/bin/python3.11"  # Debian bookworm's, the same in host and guest
PYLIB = "pylib"

LAUNCHER = f"""#!/usr/bin/python3 -IS
# kata-vfio guest prestart hook (installed by the kata-vfio dracut module)
import sys
sys.path.insert(0, "{GUEST_LIB}")
from kata_vfio_hook.main import main
sys.exit(main(sys.argv))
"""


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"dracut_module.py: package {name} is not importable; "
            "run it with the venv's python (make install-dracut-module)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def generate(moddir: Path, python: str = GUEST_PYTHON) -> None:
    """Fill `moddir` (holding module-setup.sh) with what install() reads."""
    pylib = moddir / PYLIB
    for name in HOOK_PACKAGES:
        shutil.copytree(
            package_dir(name), pylib / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    lines = []
    files = closure(python, pylib, HOOK_IMPORTS, HOOK_PACKAGES)
    for src, dst in files:
        source = Path(src)
        if source.is_relative_to(pylib.resolve()):  # copied beside the module: keep it movable
            source = source.relative_to(moddir.resolve())
        lines.append(f"{source}\t{dst}\n")
    for pyc, dst in compile_bytecode(python, moddir, files):
        lines.append(f"{pyc}\t{dst}\n")
    (moddir / "files.tsv").write_text("".join(lines))
    (moddir / "python").write_text(python + "\n")
    launcher = moddir / "kata-vfio-hook"
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)


_COMPILER = """
import json, py_compile, sys
for src, cfile, dfile in json.loads(sys.argv[1]):
    py_compile.compile(src, cfile=cfile, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def compile_bytecode(
    python: str, moddir: Path, files: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Unchecked-hash pycs, compiled by the guest's own interpreter, for every .py the hook
    imports: (pyc relative to moddir, its place in the image's __pycache__). Reproducible:
    no timestamps inside, and the interpreter never rewrites them."""
    from kata_vfio.run import run

    tag = run(
        [python, "-I", "-S", "-c", "import sys; print(sys.implementation.cache_tag)"],
        what="asking the guest python for its bytecode tag",
    ).stdout.strip()
    (moddir / "pyc").mkdir(exist_ok=True)
    jobs, pairs = [], []
    for n, (src, dst) in enumerate(sorted(f for f in files if f[0].endswith(".py"))):
        source = moddir / src if not src.startswith("/") else Path(src)
        where = Path(dst)
        cfile = f"pyc/{n:04d}-{where.stem}.{tag}.pyc"
        jobs.append((str(source), str(moddir / cfile), dst))
        pairs.append((cfile, str(where.parent / "__pycache__" / f"{where.stem}.{tag}.pyc")))
    run(
        [python, "-I", "-S", "-c", _COMPILER, json.dumps(jobs)],
        what="compiling the hook's bytecode",
    )
    return pairs


def install_module(modules_dir: Path, python: str = GUEST_PYTHON) -> Path:
    """Write <modules_dir>/90kata-vfio, generated; an older copy is replaced whole."""
    modules_dir.mkdir(parents=True, exist_ok=True)
    target = modules_dir / MODULE_NAME
    fresh = modules_dir / f".{MODULE_NAME}.new"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    shutil.copy2(MODULE_SOURCE / "module-setup.sh", fresh / "module-setup.sh")
    (fresh / "module-setup.sh").chmod(0o755)
    generate(fresh, python)
    fresh.chmod(0o755)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        old = modules_dir / f".{MODULE_NAME}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        shutil.rmtree(old)
    os.rename(fresh, target)
    return target


def main() -> int:
    from kata_vfio.boundary import guarded

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--modules-dir",
        type=Path,
        default=SYSTEM_MODULES,
        help="dracut's modules.d (default: %(default)s)",
    )
    parser.add_argument(
        "--python",
        default=GUEST_PYTHON,
        help="the interpreter the image gets (default: %(default)s)",
    )
    args = parser.parse_args()

    def body() -> int:
        target = install_module(args.modules_dir, args.python)
        print(
            f'{target}: installed; add it with add_dracutmodules+=" kata-vfio " '
            "in a dracut.conf.d file, or dracut --add kata-vfio"
        )
        return 0

    return guarded("dracut_module.py", body)


if __name__ == "__main__":
    sys.exit(main())
