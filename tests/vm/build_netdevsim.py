#!/usr/bin/env python3
"""Build the kernel's netdevsim driver as an out-of-tree module for the guest kernel.

Debian's kernel is built without CONFIG_NETDEVSIM, but Debian ships the kernel's own
source (linux-source-<series>, /usr/src/linux-source-<series>.tar.xz) and the headers
of each kernel (linux-headers-<KVER>). netdevsim is the kernel's simulated NIC: its PF
takes `ip link set … vf N mac … vlan …` over rtnetlink, which the VF-settings test needs
(there is no SR-IOV NIC here). A test dependency, like the Kata builds: its source is
taken out of Debian's tarball into the cache at build time, never into the project.

    tar -xJf /usr/src/linux-source-6.1.tar.xz linux-source-6.1/drivers/net/netdevsim
    make -C /usr/src/linux-headers-$KVER M=<that dir> CONFIG_NETDEVSIM=m modules

The headers' own .config decides the optional parts (bpf, ipsec, psample), as for the
in-tree build. The source, headers and image packages must all be of one version. The
module goes to <cache>/netdevsim-<16 hex>/netdevsim.ko, <cache> = $KATA_VFIO_CACHE
(default <repo>/build), the hex a hash of the kernel version and the three packages'
versions: a kernel update builds anew, a second run finds it done.
Prints a JSON summary (path, version magic, dependencies, seconds) as its last line.

Usage: build_netdevsim.py [--kver KVER] [--cache DIR] [--no-apt] [--print ko]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]
# Metapackages: they follow Debian's kernel updates (the Makefile's APT_PACKAGES has them)
APT_PACKAGES = ("linux-headers-amd64", "linux-source", "build-essential", "xz-utils")
SUBDIR = "drivers/net/netdevsim"
# Part of the cache key: a change to how the module is built builds it again
RECIPE = f"tar {SUBDIR}; make M=… CONFIG_NETDEVSIM=m modules; strip --strip-debug"


class BuildError(Exception):
    """Why no module can be built, in one line that says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("KATA_VFIO_CACHE") or REPO / "build")


def _query(*args: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def installed_version(package: str) -> str | None:
    """The version of an installed package, None when it is not installed."""
    status = _query("-f=${db:Status-Abbrev}", package)
    return _query("-f=${Version}", package) if status.startswith("ii") else None


def default_kver() -> str:
    """The kernel Debian's linux-image-amd64 depends on (the Makefile's KVER)."""
    kver = os.environ.get("KATA_VFIO_KVER", "")
    if kver:
        return kver
    m = re.search(r"linux-image-(\d[^ ,]*)", _query("-f=${Depends}", "linux-image-amd64"))
    if m is None:
        raise BuildError("no guest kernel: install linux-image-amd64 (make deps) or give --kver")
    return m.group(1)


def series(kver: str) -> str:
    """6.1.0-56-amd64 -> 6.1: the linux-source-<series> package that holds its source."""
    m = re.match(r"(\d+\.\d+)", kver)
    if m is None:
        raise BuildError(f"{kver!r} is not a kernel version (like 6.1.0-56-amd64)")
    return m.group(1)


def source_tarball(kver: str) -> Path:
    return Path(f"/usr/src/linux-source-{series(kver)}.tar.xz")


def headers_dir(kver: str) -> Path:
    return Path(f"/usr/src/linux-headers-{kver}")


def inputs(kver: str) -> dict[str, str]:
    """What the module is built from; every mismatch is one line naming the fix."""
    image = installed_version(f"linux-image-{kver}")
    if image is None:
        raise BuildError(f"linux-image-{kver} is not installed: the guest kernel is missing")
    source_pkg = f"linux-source-{series(kver)}"
    source = installed_version(source_pkg)
    if source is None or not source_tarball(kver).is_file():
        raise BuildError(
            f"no {source_tarball(kver)}: install {source_pkg}={image} "
            "(make deps installs linux-source)"
        )
    if source != image:
        raise BuildError(
            f"{source_pkg} is {source} but the guest kernel linux-image-{kver} is "
            f"{image}: install {source_pkg}={image} or update the kernel"
        )
    headers = installed_version(f"linux-headers-{kver}")
    if headers is None or not (headers_dir(kver) / "Makefile").is_file():
        raise BuildError(
            f"no {headers_dir(kver)}: install linux-headers-{kver} (make deps "
            "installs linux-headers-amd64, which follows linux-image-amd64)"
        )
    if headers != image:
        raise BuildError(
            f"linux-headers-{kver} is {headers} but linux-image-{kver} is {image}: "
            f"install linux-headers-{kver}={image}"
        )
    return {"kver": kver, "image": image, "source": source, "headers": headers, "recipe": RECIPE}


def build_dir(key: dict[str, str], cache: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (cache or cache_root()) / f"netdevsim-{digest}"


def module_path(out: Path) -> Path:
    return out / "netdevsim.ko"


def complete(out: Path) -> bool:
    return (out / "done.json").is_file() and module_path(out).is_file()


def ensure_apt(log: TextIO) -> None:
    missing = [p for p in APT_PACKAGES if installed_version(p) is None]
    if missing:
        print(f"installing Debian packages: {' '.join(missing)}", file=log, flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True,
            env=env,
        )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """One build per output directory: a second test run waits, then finds it done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def modinfo(ko: Path, field: str) -> str:
    return subprocess.run(
        ["modinfo", "-F", field, str(ko)], capture_output=True, text=True, check=True
    ).stdout.strip()


def _compile(key: dict[str, str], out: Path, jobs: int, log: TextIO) -> float:
    kver = key["kver"]
    t0 = time.monotonic()
    top = f"linux-source-{series(kver)}"
    with tempfile.TemporaryDirectory(prefix="src.", dir=out) as tmp:
        print(
            f"[netdevsim] extracting {top}/{SUBDIR} from {source_tarball(kver)}",
            file=log,
            flush=True,
        )
        subprocess.run(
            ["tar", "-xJf", str(source_tarball(kver)), "-C", tmp, f"{top}/{SUBDIR}"], check=True
        )
        src = Path(tmp) / top / SUBDIR
        cmd = [
            "make",
            "-C",
            str(headers_dir(kver)),
            f"M={src}",
            "CONFIG_NETDEVSIM=m",
            f"-j{jobs}",
            "modules",
        ]
        print(f"[netdevsim] {' '.join(cmd)}", file=log, flush=True)
        with (out / "build.log").open("w") as lf:
            r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT)
        if r.returncode != 0 or not (src / "netdevsim.ko").is_file():
            tail = (out / "build.log").read_text(errors="replace")[-3000:]
            raise BuildError(
                f"building netdevsim for {kver} failed (exit {r.returncode}), "
                f"log {out / 'build.log'}:\n{tail}"
            )
        shutil.copy2(src / "netdevsim.ko", module_path(out))
    # as Debian's own modules: no debug info (5 MB less in every test guest's initrd)
    subprocess.run(["strip", "--strip-debug", str(module_path(out))], check=True)
    return round(time.monotonic() - t0, 1)


def build(
    kver: str | None = None,
    cache: Path | None = None,
    jobs: int | None = None,
    apt: bool = True,
    log: TextIO = sys.stderr,
) -> dict[str, Any]:
    kver = kver or default_kver()
    if apt:
        ensure_apt(log)
    key = inputs(kver)
    out = build_dir(key, cache)
    with locked(out):
        if complete(out):
            cached: dict[str, Any] = json.loads((out / "done.json").read_text())
            cached.update(cached=True, dir=str(out), ko=str(module_path(out)))
            return cached
        out.mkdir(parents=True, exist_ok=True)
        seconds = _compile(key, out, jobs or os.cpu_count() or 1, log)
        ko = module_path(out)
        vermagic = modinfo(ko, "vermagic")
        if vermagic.split()[:1] != [kver]:
            ko.unlink()
            raise BuildError(
                f"the module built for {kver} says it is for {vermagic!r}: "
                f"are /usr/src/linux-headers-{kver} damaged?"
            )
        info: dict[str, Any] = {
            **key,
            "dir": str(out),
            "ko": str(ko),
            "vermagic": vermagic,
            "depends": [d for d in modinfo(ko, "depends").split(",") if d],
            "seconds": seconds,
        }
        tmp = out / "done.json.tmp"
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, out / "done.json")
    info["cached"] = False
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--kver",
        default=None,
        help="default: $KATA_VFIO_KVER or the kernel linux-image-amd64 depends on",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache root (default $KATA_VFIO_CACHE or <repo>/build)",
    )
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--no-apt", action="store_true", help="do not install Debian packages")
    ap.add_argument(
        "--print", dest="print_name", choices=["ko"], help="print only the module's path"
    )
    args = ap.parse_args(argv)
    try:
        info = build(args.kver, args.cache, args.jobs, apt=not args.no_apt)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(e, file=sys.stderr)
        return 1
    print(info["ko"] if args.print_name else json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
