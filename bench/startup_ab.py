#!/usr/bin/env python3
"""The guest hook's import cost, this tree against an earlier revision, side by side.

    bench/startup_ab.py 3746a10            # or any revision git knows
    bench/startup_ab.py 3746a10 --runs 500

The VM figure of `make bench` (hook(1) - rebind against a bare start, under TCG) moves by
10 % from one boot to the next, so it cannot show a change of a few hundred microseconds.
This does, on the host: each tree's `common/kata_vfio` and `hook/kata_vfio_hook` are laid
out as the initrd lays them out (one directory, unchecked-hash pycs from the guest's own
interpreter), and `python3 -I -S` imports what the hook imports — with no manifest (most
containers), for one NIC, one NVMe drive and several devices — in runs shuffled between the
trees, so both see the same machine noise. It prints each tree's median wall time and mean
CPU time (user + system, from wait4) and the difference. On a quiet machine two sets that
differ by nothing differ by up to ~0.15 ms at 300 runs: use 1000 for a figure to quote.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "initrd"))
from dracut_module import GUEST_PYTHON as PYTHON  # noqa: E402 (the guest's interpreter)

PACKAGES = ("common/kata_vfio", "hook/kata_vfio_hook")
# what the hook imports without a manifest (tests/project/test_lean_paths.py checks it),
# with one device and with several (give_devices's lazy imports included:
# tests/hook/test_hook_boundary.py records them); a module a tree does not have is left out
# for it (3746a10 had no kata_vfio.value nor kata_vfio.threads: its pool was in give.py)
NO_MANIFEST = ["kata_vfio_hook.main"]
ONE_NIC = [
    *NO_MANIFEST,
    *(f"kata_vfio.{m}" for m in ("value", "manifest", "pci", "rebind", "jsonlog", "files")),
    *(
        f"kata_vfio_hook.{m}"
        for m in ("give", "match", "vmdeps", "claims", "nodes", "cgroup", "events", "roots")
    ),
    "kata_vfio_hook.devfiles",
]
ONE_DRIVE = [*ONE_NIC, "kata_vfio.blockuse"]  # an NVMe drive: make bench's hook(1)
SEVERAL_DEVICES = [*ONE_DRIVE, "kata_vfio.threads"]


def lay_out(source: Path, lib: Path) -> None:
    """The initrd's layout of the two packages under `lib`, compiled by the guest's python."""
    for package in PACKAGES:
        shutil.copytree(
            source / package,
            lib / Path(package).name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi"),
        )
    # what the initrd's build does too: unchecked-hash pycs, by the guest's interpreter
    subprocess.run(
        [PYTHON, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", str(lib)],
        check=True,
    )


def revision_tree(revision: str, into: Path) -> Path:
    """`revision`'s two packages, by git archive (no checkout is touched)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision, *PACKAGES],
        capture_output=True,
        check=True,
    ).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def present(lib: Path, modules: list[str]) -> list[str]:
    return [m for m in modules if (lib / (m.replace(".", "/") + ".py")).exists()]


def one_run(lib: Path, modules: list[str]) -> tuple[float, float]:
    wanted = present(lib, modules)
    code = f"import sys; sys.path.insert(0, {str(lib)!r})" + (
        f"; import {', '.join(wanted)}" if wanted else ""
    )
    started = time.perf_counter()
    pid = os.posix_spawn(PYTHON, [PYTHON, "-I", "-S", "-c", code], {})
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"startup_ab.py: importing {modules} from {lib} failed")
    return wall, usage.ru_utime + usage.ru_stime


def compare(libs: dict[str, Path], modules: list[str], runs: int) -> dict[str, tuple[float, float]]:
    walls: dict[str, list[float]] = {name: [] for name in libs}
    cpus: dict[str, list[float]] = {name: [] for name in libs}
    names = list(libs)
    for _ in range(runs):
        random.shuffle(names)
        for name in names:
            wall, cpu = one_run(libs[name], modules)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return {
        name: (statistics.median(walls[name]) * 1e3, statistics.mean(cpus[name]) * 1e3)
        for name in libs
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="the revision to compare this tree with")
    parser.add_argument("--runs", type=int, default=300, help="runs per tree and set")
    args = parser.parse_args()
    if not os.access(PYTHON, os.X_OK):
        raise SystemExit(f"startup_ab.py: {PYTHON} (the guest's python) is not here")
    with tempfile.TemporaryDirectory(prefix="kata-vfio-startup.") as tmp:
        work = Path(tmp)
        then = revision_tree(args.revision, work / "then-src")
        libs = {args.revision: work / "then", "this tree": work / "now"}
        lay_out(then, libs[args.revision])
        lay_out(REPO, libs["this tree"])
        bare = compare({"bare": work}, [], args.runs)["bare"]
        print(f"bare python3 -I -S start: {bare[0]:.2f} ms wall, {bare[1]:.2f} ms CPU")
        for label, modules in (
            ("no manifest", NO_MANIFEST),
            ("one NIC", ONE_NIC),
            ("one NVMe drive", ONE_DRIVE),
            ("several devices", SEVERAL_DEVICES),
        ):
            result = compare(libs, modules, args.runs)
            (old_wall, old_cpu), (new_wall, new_cpu) = result.values()
            print(
                f"hook imports, {label}: {args.revision} {old_wall:.2f} ms wall "
                f"{old_cpu:.2f} ms CPU; this tree {new_wall:.2f} ms wall {new_cpu:.2f} ms CPU"
                f" -> {new_wall - old_wall:+.2f} ms wall, {new_cpu - old_cpu:+.2f} ms CPU"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
