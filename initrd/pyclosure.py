"""Which files a set of Python imports needs, for putting into a guest image.

Runs the target interpreter with -I -S (as the hook runs), imports the names,
and lists every loaded module's file: the standard library keeps its path,
kata-vfio's packages go under /usr/lib/kata-vfio.
"""

from __future__ import annotations

import json
from pathlib import Path

from kata_vfio.run import run

GUEST_LIB = "/usr/lib/kata-vfio"
# Every module of these packages goes in (the hook imports some lazily, inside the
# functions that need them), plus the standard-library modules those lazy imports name.
HOOK_PACKAGES = ("kata_vfio", "kata_vfio_hook")
HOOK_IMPORTS = (
    "threading",
    "subprocess",
    "select",
    "socket",
    "_socket",
    "_thread",
    "_json",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.aliases",
)

_LISTER = """
import importlib, json, pkgutil, sys
sys.path[:0] = json.loads(sys.argv[1])
for name in json.loads(sys.argv[3]):
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(info.name)
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
files = {}
for name, mod in list(sys.modules.items()):
    path = getattr(mod, "__file__", None)
    if path:
        files[name] = path
print(json.dumps(files))
"""


def closure(
    python: str, package_root: Path, imports: tuple[str, ...], packages: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """(source, destination) for every file the imports load: each named module, every
    module of each named package, and everything those import."""
    # -B: importing must not leave __pycache__ behind in the package root
    out = run(
        [
            python,
            "-B",
            "-I",
            "-S",
            "-c",
            _LISTER,
            json.dumps([str(package_root)]),
            json.dumps(list(imports)),
            json.dumps(list(packages)),
        ],
        what="listing the Python modules the hook imports",
    )
    pairs = set()
    for path in json.loads(out.stdout).values():
        if path.endswith(".so"):  # extension modules: the libraries they link, too
            pairs.update((lib, lib) for lib in shared_libs(path))
        src = Path(path).resolve()
        if src.is_relative_to(package_root.resolve()):
            dst = Path(GUEST_LIB) / src.relative_to(package_root.resolve())
        else:
            dst = src
        pairs.add((str(src), str(dst)))
    return sorted(pairs)


def shared_libs(binary: str) -> list[str]:
    """Absolute paths of the shared libraries `binary` links, as ldd resolves them."""
    out = run(["ldd", binary], what=f"listing the libraries of {binary}", check=False).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1:
            path = parts[parts.index("=>") + 1]
            if path.startswith("/"):
                libs.append(path)
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs
