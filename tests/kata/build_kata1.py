#!/usr/bin/env python3
"""Build Kata Containers 1.x (runtime, agent, shim, proxy) from the source tarball.

Offline, GOPATH mode, with Debian's golang-go (LAB.md section 4):
    GOPATH=<dir>/go GO111MODULE=off GOPROXY=off
    runtime: make SKIP_GO_VERSION_CHECK=1   agent: make STATIC=1 INIT=yes
    shim: make                               proxy: make

The output goes to <cache>/kata1-<first 16 hex of the tarball's sha256>/, where <cache> is
$KATA_VFIO_CACHE (default: <repo>/build), so a CI job can keep it across clean clones. When
every output already exists for that hash the build is skipped. Prints a JSON summary
(paths and build seconds) on stdout as its last line.

Usage: build_kata1.py [--tarball F] [--cache DIR] [--jobs N] [--no-apt] [--print NAME]
(--print kata-agent: print only that output's path, e.g. for KATA_AGENT=$(...) in make)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TARBALL = REPO.parent / "shared" / "third_party" / "kata-1.x-src.tar.gz"
KC = "src/github.com/kata-containers"
COMPONENTS = ("runtime", "agent", "shim", "proxy")
APT_PACKAGES = ("golang-go", "build-essential")

# Relative to <out>/go/src/github.com/kata-containers
OUTPUTS = {
    "kata-runtime": "runtime/kata-runtime",
    "configuration-qemu.toml": "runtime/cli/config/configuration-qemu.toml",
    "kata-agent": "agent/kata-agent",
    "kata-shim": "shim/kata-shim",
    "kata-proxy": "proxy/kata-proxy",
}
# Built when its source is in the tarball: the stored 1.x tarball lacks
# runtime/cli/containerd-shim-kata-v2/ (main.go), so `make` in runtime/ fails on that target.
SHIMV2 = ("containerd-shim-kata-v2", "runtime/containerd-shim-kata-v2",
          "runtime/cli/containerd-shim-kata-v2/main.go")
MAKE_ARGS = {
    "runtime": ["SKIP_GO_VERSION_CHECK=1"],
    "agent": ["STATIC=1", "INIT=yes"],
    "shim": [],
    "proxy": [],
}


def cache_root() -> Path:
    return Path(os.environ.get("KATA_VFIO_CACHE") or REPO / "build")


def default_tarball() -> Path:
    return Path(os.environ.get("KATA_VFIO_KATA1_TARBALL") or DEFAULT_TARBALL)


def sha256_16(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def build_dir(tarball: Path, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / f"kata1-{sha256_16(tarball)}"


def outputs(out: Path) -> dict[str, Path]:
    base = out / "go" / KC
    result = {name: base / rel for name, rel in OUTPUTS.items()}
    if (base / SHIMV2[2]).is_file():
        result[SHIMV2[0]] = base / SHIMV2[1]
    return result


def make_args(out: Path, comp: str) -> list[str]:
    args = list(MAKE_ARGS[comp])
    if comp == "runtime" and not (out / "go" / KC / SHIMV2[2]).is_file():
        args += ["runtime", "netmon"]  # everything of `all` but the shim v2
    return args


def complete(out: Path) -> bool:
    return (out / "done.json").is_file() and all(p.is_file() for p in outputs(out).values())


def ensure_apt() -> None:
    missing = []
    for pkg in APT_PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", pkg],
                           capture_output=True, text=True)
        if not r.stdout.startswith("ii"):
            missing.append(pkg)
    if missing:
        print(f"installing Debian packages: {' '.join(missing)}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       check=True, env=env)


def go_env(out: Path) -> dict[str, str]:
    gopath = out / "go"
    env = dict(os.environ)
    env.update(GOPATH=str(gopath), GO111MODULE="off", GOPROXY="off", GOFLAGS="",
               GOCACHE=str(out / "gocache"), CGO_ENABLED=env.get("CGO_ENABLED", "1"))
    # the runtime's Makefile stamps `git rev-parse HEAD` into its version: keep git from
    # finding the repository the cache directory may sit in
    env["GIT_CEILING_DIRECTORIES"] = str(out)
    env["PATH"] = f"/usr/lib/go/bin:{gopath / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def unpack(tarball: Path, out: Path) -> None:
    dest = out / "go" / KC
    if all((dest / c / "Makefile").is_file() for c in COMPONENTS):
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tf:
        if hasattr(tarfile, "tar_filter"):  # Python >= 3.11.4
            tf.extractall(dest, filter="tar")
        else:
            tf.extractall(dest)


def build(tarball: Path, cache: Path | None = None, jobs: int | None = None,
          apt: bool = True, log: TextIO = sys.stderr) -> dict[str, Any]:
    out = build_dir(tarball, cache)
    if complete(out):
        cached: dict[str, Any] = json.loads((out / "done.json").read_text())
        cached["cached"] = True
        return cached
    if apt:
        ensure_apt()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    unpack(tarball, out)
    env = go_env(out)
    jobs = jobs or os.cpu_count() or 1
    times: dict[str, float] = {}
    for comp in COMPONENTS:
        t = time.monotonic()
        cmd = ["make", f"-j{jobs}", *make_args(out, comp)]
        print(f"[kata1] {comp}: {' '.join(cmd)}", file=log, flush=True)
        with (out / f"build-{comp}.log").open("w") as lf:
            r = subprocess.run(cmd, cwd=out / "go" / KC / comp, env=env, stdout=lf,
                               stderr=subprocess.STDOUT)
        times[comp] = round(time.monotonic() - t, 1)
        if r.returncode != 0:
            tail = (out / f"build-{comp}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building kata 1.x {comp} failed (exit {r.returncode}):\n{tail}")
    missing = [str(p) for p in outputs(out).values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"kata 1.x build produced no {missing}")
    go_version = subprocess.run(["go", "version"], env=env, capture_output=True,
                                text=True).stdout.strip()
    info: dict[str, Any] = {
        "dir": str(out),
        "tarball": str(tarball),
        "go": go_version,
        "seconds": round(time.monotonic() - t0, 1),
        "component_seconds": times,
        "outputs": {k: str(v) for k, v in outputs(out).items()},
    }
    (out / "done.json").write_text(json.dumps(info, indent=1) + "\n")
    # outputs are cached by tarball hash, never rebuilt incrementally: the Go build cache
    # is dead weight in a CI cache
    shutil.rmtree(out / "gocache", ignore_errors=True)
    info["cached"] = False
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tarball", type=Path, default=default_tarball())
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache root (default $KATA_VFIO_CACHE or <repo>/build)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--no-apt", action="store_true", help="do not install Debian packages")
    ap.add_argument("--print", dest="print_name", metavar="NAME",
                    help="print only the path of output NAME (kata-agent, kata-runtime, ...)")
    args = ap.parse_args(argv)
    if not args.tarball.is_file():
        print(f"no Kata 1.x source tarball at {args.tarball}", file=sys.stderr)
        return 2
    try:
        info = build(args.tarball, args.cache, args.jobs, apt=not args.no_apt)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(e, file=sys.stderr)
        return 1
    if args.print_name:
        if args.print_name not in info["outputs"]:
            print(f"no output {args.print_name!r}; have {sorted(info['outputs'])}",
                  file=sys.stderr)
            return 2
        print(info["outputs"][args.print_name])
    else:
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
