#!/usr/bin/env python3
"""`make initrd`: a dracut initrd with the kata-vfio guest hook, for Kata guests.

Uses the system's dracut with a private module directory (the system's modules
plus initrd/90kata-vfio), so nothing under /usr/lib/dracut is changed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pyclosure import GUEST_LIB, HOOK_IMPORTS, HOOK_PACKAGES, closure  # noqa: E402

SYSTEM_DRACUT = Path("/usr/lib/dracut")
GUEST_PYTHON = "/usr/bin/python3.11"  # Debian bookworm's, the same in host and guest

LAUNCHER = f"""#!/usr/bin/python3 -IS
# kata-vfio guest prestart hook (installed by the kata-vfio dracut module)
import sys
sys.path.insert(0, "{GUEST_LIB}")
from kata_vfio_hook.main import main
sys.exit(main(sys.argv))
"""


def dracut_base(work: Path) -> Path:
    """A dracutbasedir that is the system's plus our module."""
    base = work / "dracut"
    (base / "modules.d").mkdir(parents=True)
    for entry in SYSTEM_DRACUT.iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(entry)
    for module in (SYSTEM_DRACUT / "modules.d").iterdir():
        (base / "modules.d" / module.name).symlink_to(module)
    (base / "modules.d/90kata-vfio").symlink_to(HERE / "90kata-vfio")
    return base


def build(kver: str, output: Path, with_hook: bool = True, extra_modules: str = "") -> None:
    package_root = Path(sysconfig.get_paths()["purelib"])  # where pip installed kata-vfio
    with tempfile.TemporaryDirectory(prefix="kata-vfio-initrd.") as tmp:
        work = Path(tmp)
        filelist = work / "files.tsv"
        filelist.write_text("".join(f"{s}\t{d}\n" for s, d in
                                    closure(GUEST_PYTHON, package_root, HOOK_IMPORTS,
                                            HOOK_PACKAGES)))
        launcher = work / "kata-vfio-hook"
        launcher.write_text(LAUNCHER)
        launcher.chmod(0o755)
        env = {**os.environ, "dracutbasedir": str(dracut_base(work)),
               "KATA_VFIO_FILELIST": str(filelist), "KATA_VFIO_HOOK": str(launcher),
               "KATA_VFIO_PYTHON": GUEST_PYTHON}
        modules = "base" + (" kata-vfio" if with_hook else "") + extra_modules
        output.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["dracut", "--force", "--quiet", "--no-hostonly", "--no-hostonly-cmdline",
             "--no-early-microcode", "--reproducible", "--modules", modules,
             "--tmpdir", str(work), "--kver", kver, str(output)],
            env=env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kver", required=True, help="kernel version, e.g. 6.1.0-28-amd64")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--without-hook", action="store_true",
                        help="the same image without the kata-vfio module (size comparison)")
    args = parser.parse_args()
    if not Path(f"/lib/modules/{args.kver}").is_dir():
        print(f"build.py: no modules for kernel {args.kver}; install linux-image-{args.kver}",
              file=sys.stderr)
        return 1
    build(args.kver, args.output, with_hook=not args.without_hook)
    print(f"{args.output}: {args.output.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
