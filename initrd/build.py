#!/usr/bin/env python3
"""`make initrd`: a dracut initrd with the kata-vfio guest hook, for Kata guests.

Uses the system's dracut with a private module directory (the system's modules
plus a generated copy of initrd/90kata-vfio, the same one `make install-dracut-module`
writes), so nothing under /usr/lib/dracut is changed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dracut_module import MODULE_NAME, install_module  # noqa: E402

from kata_vfio.boundary import guarded, step  # noqa: E402
from kata_vfio.run import run  # noqa: E402

SYSTEM_DRACUT = Path("/usr/lib/dracut")


def dracut_base(work: Path, module: Path) -> Path:
    """A dracutbasedir that is the system's plus our module."""
    base = work / "dracut"
    (base / "modules.d").mkdir(parents=True)
    for entry in SYSTEM_DRACUT.iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(entry)
    for system_module in (SYSTEM_DRACUT / "modules.d").iterdir():
        (base / "modules.d" / system_module.name).symlink_to(system_module)
    (base / "modules.d" / MODULE_NAME).symlink_to(module)
    return base


def build(kver: str, output: Path, with_hook: bool = True, extra_modules: str = "") -> None:
    with tempfile.TemporaryDirectory(prefix="kata-vfio-initrd.") as tmp:
        work = Path(tmp)
        with step("generating the kata-vfio dracut module"):
            module = install_module(work / "generated")
        env = {**os.environ, "dracutbasedir": str(dracut_base(work, module))}
        modules = "base" + (" kata-vfio" if with_hook else "") + extra_modules
        output.parent.mkdir(parents=True, exist_ok=True)
        run(
            [
                "dracut",
                "--force",
                "--quiet",
                "--no-hostonly",
                "--no-hostonly-cmdline",
                "--no-early-microcode",
                "--reproducible",
                "--modules",
                modules,
                "--tmpdir",
                str(work),
                "--kver",
                kver,
                str(output),
            ],
            what=f"building {output} with dracut",
            env=env,
            timeout=900,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kver", required=True, help="kernel version, e.g. 6.1.0-28-amd64")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--without-hook",
        action="store_true",
        help="the same image without the kata-vfio module (size comparison)",
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    args = parser.parse_args()
    if not Path(f"/lib/modules/{args.kver}").is_dir():
        print(
            f"build.py: no modules for kernel {args.kver}; install linux-image-{args.kver}",
            file=sys.stderr,
        )
        return 1

    def body() -> int:
        build(args.kver, args.output, with_hook=not args.without_hook)
        print(f"{args.output}: {args.output.stat().st_size / 1e6:.1f} MB")
        return 0

    return guarded("build.py", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
