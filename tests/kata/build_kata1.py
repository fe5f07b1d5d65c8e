#!/usr/bin/env python3
"""Build Kata Containers 1.x (runtime, agent, shim, proxy) from the source tarball.

Offline, GOPATH mode, with Debian's golang-go (LAB.md section 4):
    GOPATH=<dir>/go GO111MODULE=off GOPROXY=off
    runtime: make SKIP_GO_VERSION_CHECK=1   agent: make STATIC=1 INIT=yes
    shim: make                               proxy: make
    runtime: make SKIP_GO_VERSION_CHECK=1 containerd-shim-v2   (our main package, see below)

The output goes to <cache>/kata1-<first 16 hex of the tarball's sha256>/, where <cache> is
$KATA_VFIO_CACHE (default: <repo>/build), so a CI job can keep it across clean clones. When
every output already exists for that hash the build is skipped; a step whose outputs
exist is skipped too (a cache from before the shim v2 step only gets the shim built).
Prints a JSON summary (paths and build seconds) on stdout as its last line.

Usage: build_kata1.py [--tarball F] [--cache DIR] [--jobs N] [--no-apt] [--print NAME]
(--print kata-agent: print only that output's path, e.g. for KATA_AGENT=$(...) in make)
"""

from __future__ import annotations

import argparse
import contextlib
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
# The shim v2 binary. The Kata 1.x tarball has its library (runtime/containerd-shim-v2/)
# and the Makefile target `containerd-shim-v2`, which builds $(CLI_DIR)/containerd-shim-kata-v2/,
# but it lacks that directory (the binary's main package). Ours, tests/kata/shimv2/main.go, is
# copied there under the name below (a name older versions of this script do not look for).
SHIMV2 = "containerd-shim-kata-v2"
SHIMV2_OUT = "runtime/containerd-shim-kata-v2"
SHIMV2_MAIN_SRC = Path(__file__).resolve().parent / "shimv2" / "main.go"
SHIMV2_MAIN_DEST = "runtime/cli/containerd-shim-kata-v2/kata-vfio-main.go"
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
    result[SHIMV2] = base / SHIMV2_OUT
    return result


def steps(out: Path) -> list[tuple[str, str, list[str], list[str]]]:
    """(step name, directory under kata-containers/, make arguments, outputs it makes)."""
    result = []
    for comp in COMPONENTS:
        args = list(MAKE_ARGS[comp])
        names = [n for n, rel in OUTPUTS.items() if rel.startswith(comp + "/")]
        if comp == "runtime":
            args += ["runtime", "netmon"]  # `all` also builds the shim v2: a step of its own
        result.append((comp, comp, args, names))
    result.append(("shimv2", "runtime", [*MAKE_ARGS["runtime"], "containerd-shim-v2"],
                   [SHIMV2]))
    return result


def shimv2_main_current(out: Path) -> bool:
    dest = out / "go" / KC / SHIMV2_MAIN_DEST
    return dest.is_file() and dest.read_bytes() == SHIMV2_MAIN_SRC.read_bytes()


def place_shimv2_main(out: Path) -> None:
    """Put our main package where the Makefile's SHIMV2 target builds from; a changed
    main.go makes the built shim stale."""
    if shimv2_main_current(out):
        return
    dest = out / "go" / KC / SHIMV2_MAIN_DEST
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(SHIMV2_MAIN_SRC.read_bytes())
    with contextlib.suppress(FileNotFoundError):
        outputs(out)[SHIMV2].unlink()


def complete(out: Path) -> bool:
    return (out / "done.json").is_file() and shimv2_main_current(out) and \
        all(p.is_file() for p in outputs(out).values())


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
        # where it is now (a cache directory may have been moved or copied)
        cached["dir"] = str(out)
        cached["outputs"] = {k: str(v) for k, v in outputs(out).items()}
        return cached
    if apt:
        ensure_apt()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    unpack(tarball, out)
    place_shimv2_main(out)
    env = go_env(out)
    jobs = jobs or os.cpu_count() or 1
    previous: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        previous = json.loads((out / "done.json").read_text())
    times: dict[str, float] = dict(previous.get("component_seconds") or {})
    paths = outputs(out)
    for step, comp, args, made in steps(out):
        if all(paths[n].is_file() for n in made):
            continue  # built by an earlier run for this tarball
        t = time.monotonic()
        cmd = ["make", f"-j{jobs}", *args]
        print(f"[kata1] {step}: {' '.join(cmd)}", file=log, flush=True)
        with (out / f"build-{step}.log").open("w") as lf:
            r = subprocess.run(cmd, cwd=out / "go" / KC / comp, env=env, stdout=lf,
                               stderr=subprocess.STDOUT)
        times[step] = round(time.monotonic() - t, 1)
        if r.returncode != 0:
            tail = (out / f"build-{step}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building kata 1.x {step} failed (exit {r.returncode}):\n{tail}")
    missing = [str(p) for p in outputs(out).values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"kata 1.x build produced no {missing}")
    go_version = subprocess.run(["go", "version"], env=env, capture_output=True,
                                text=True).stdout.strip()
    info: dict[str, Any] = {
        "dir": str(out),
        "tarball": str(tarball),
        "go": go_version,
        "seconds": round(sum(times.values()), 1),
        "this_run_seconds": round(time.monotonic() - t0, 1),
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
