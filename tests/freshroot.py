"""A fresh Debian root, as a new node or a newcomer's machine starts: debootstrap minbase
with only the packages asked for, cached as a tarball under $KATA_VFIO_CACHE by suite and
package list, then commands run inside it (a private mount namespace with /proc, /sys and
/dev, pivot_root into it): every mount goes with the namespace when the command ends.

The root's apt sources, apt settings, keyrings and CA certificates are the host's own,
copied in at run time; no archive host is named here.

    python3 tests/freshroot.py make ROOT [--suite bookworm] PACKAGE...   # unpack a root
    python3 tests/freshroot.py run [--sys-rw] ROOT -- COMMAND...           # run in it

A newcomer's `make demo` from scratch (README, "Develop"), the cache private to the root:

    python3 tests/freshroot.py make R python3 python3-venv python3-pip make git ca-certificates
    git clone . R/root/kata-vfio
    python3 tests/freshroot.py run --sys-rw R -- bash -c 'cd /root/kata-vfio && time make demo'
    rm -rf --one-file-system R
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SUITE = "bookworm"
# what a command in the root sees: the root's own PATH and nothing of the caller's venv;
# the caller's pip and proxy settings (they are the host's configuration, like /etc/apt)
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
PASSED_ENV_PREFIXES = (
    "PIP_",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)
HOST_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class FreshRootError(Exception):
    pass


def _deb822(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
            continue
        if line[0].isspace() and current:
            last = next(reversed(current))
            current[last] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        current[key.strip().lower()] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def host_sources(etc_apt: Path = Path("/etc/apt")) -> list[tuple[str, str, list[str], str]]:
    """The host's enabled apt sources: (uri, suite, components, signed-by) for each deb."""
    found: list[tuple[str, str, list[str], str]] = []
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            signed = ""
            if words and words[0].startswith("["):
                options = []
                while words:
                    options.append(words.pop(0))
                    if options[-1].endswith("]"):
                        break
                for opt in " ".join(options).strip("[]").split():
                    if opt.startswith("signed-by="):
                        signed = opt.split("=", 1)[1]
            if len(words) >= 2:
                found.append((words[0], words[1], words[2:], signed))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in _deb822(path.read_text()):
            if (
                "deb" not in stanza.get("types", "").split()
                or stanza.get("enabled", "yes").lower() == "no"
            ):
                continue
            for uri in stanza.get("uris", "").split():
                for suite in stanza.get("suites", "").split():
                    found.append(
                        (
                            uri,
                            suite,
                            stanza.get("components", "").split(),
                            stanza.get("signed-by", ""),
                        )
                    )
    return found


def host_mirror(suite: str = SUITE) -> str:
    """The archive the host takes `suite` from (what debootstrap needs)."""
    for uri, name, components, _ in host_sources():
        if name == suite and "main" in components:
            return uri
    raise FreshRootError(
        f"the host's apt sources have no {suite} main: debootstrap needs an "
        "archive; add one to /etc/apt/sources.list.d"
    )


def cache_dir() -> Path:
    base = os.environ.get("KATA_VFIO_CACHE") or str(
        Path(__file__).resolve().parent.parent / "build"
    )
    return Path(base) / "freshroot"


def tarball(suite: str, packages: list[str]) -> Path:
    """The cached root of `suite` with `packages` (debootstrap minbase), made when absent."""
    wanted = sorted(set(packages))
    key = hashlib.sha256(f"{suite}\n{' '.join(wanted)}\nminbase".encode()).hexdigest()[:16]
    path = cache_dir() / f"{suite}-minbase-{key}.tar"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".debootstrap.", dir=path.parent))
    try:
        root = work / "root"
        done = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(wanted)}",
                suite,
                str(root),
                host_mirror(suite),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise FreshRootError(
                f"debootstrap {suite} failed (exit {done.returncode}): " + " | ".join(tail)
            )
        # what debootstrap downloaded is not part of a node
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True)
        fresh = work / "root.tar"
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "--xattrs", "-cf", str(fresh), "."],
            check=True,
        )
        os.replace(fresh, path)
        (path.parent / f"{path.name}.packages").write_text("\n".join(wanted) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _copy_host_file(host: Path, root: Path) -> None:
    target = root / str(host).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    shutil.copy2(host, target, follow_symlinks=True)


def copy_host_config(root: Path) -> None:
    """The host's apt sources and settings, the keyrings they name, the CA certificates
    it trusts, its resolver and pip settings: the root reaches what the host reaches."""
    etc_apt = Path("/etc/apt")
    for old in (root / "etc/apt/sources.list", *(root / "etc/apt/sources.list.d").glob("*")):
        if old.is_file():
            old.unlink()
    files = [
        p
        for p in (
            etc_apt / "sources.list",
            *etc_apt.glob("sources.list.d/*.list"),
            *etc_apt.glob("sources.list.d/*.sources"),
            *etc_apt.glob("apt.conf.d/*"),
            *etc_apt.glob("trusted.gpg.d/*"),
            *etc_apt.glob("keyrings/*"),
            etc_apt / "trusted.gpg",
        )
        if p.is_file()
    ]
    files += [Path(s) for *_, s in host_sources() if s.startswith("/") and Path(s).is_file()]
    certs = Path("/usr/local/share/ca-certificates")
    files += [p for p in certs.rglob("*") if p.is_file()] if certs.is_dir() else []
    files += [
        p
        for p in (
            Path("/etc/ssl/certs/ca-certificates.crt"),
            Path("/etc/resolv.conf"),
            Path("/etc/hosts"),
            Path("/etc/pip.conf"),
        )
        if p.is_file()
    ]
    for path in files:
        _copy_host_file(path, root)


def unpack(tar: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-C", str(root), "--numeric-owner", "--xattrs", "-xf", str(tar)], check=True
    )
    copy_host_config(root)


def make_root(root: Path, packages: list[str], suite: str = SUITE) -> Path:
    """A fresh `suite` root at `root` with `packages`; returns the tarball it came from."""
    tar = tarball(suite, packages)
    unpack(tar, root)
    return tar


# in a private mount namespace: the root bound on itself (a machine's / is a mount point:
# podman's layer unpacking remounts it), proc, the host's /sys (read-only unless sys_rw)
# and /dev, a tmpfs on /run, then pivot_root, not chroot: the namespace's own root is the
# fresh root, so a command that enters a mount namespace (nsenter -m, setns) lands in the
# fresh root as on a machine, not in the host's /; the mounts end with the namespace
_ENTER = """set -e
root=$1; shift
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
[ "$FRESHROOT_SYS" = rw ] || mount -o remount,bind,ro "$root/sys"
mount --rbind /dev "$root/dev"
mkdir -p "$root/dev/pts" "$root/run" "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
mkdir -p "$root/run/freshroot-host"
cd "$root"
pivot_root . run/freshroot-host
umount -l /run/freshroot-host
rmdir /run/freshroot-host
exec chroot / "$@"
"""


def root_env(**extra: str) -> dict[str, str]:
    passed = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}
    return {**ROOT_ENV, **passed, **extra}


def run_in_root(
    root: Path,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str = "/",
    timeout: float = 600,
    capture: bool = True,
    sys_rw: bool = False,
) -> subprocess.CompletedProcess[str]:
    """argv inside `root` (cwd inside the root), with `env` (default: root_env())."""
    env = dict(env if env is not None else root_env())
    # read by _ENTER's shell, which the chroot's command then inherits
    env["FRESHROOT_SYS"] = "rw" if sys_rw else "ro"
    script = f'cd {cwd!r} 2>/dev/null || cd /; exec "$@"'
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            _ENTER,
            "enter",
            str(root),
            "/bin/sh",
            "-c",
            script,
            "in-root",
            *argv,
        ],
        capture_output=capture,
        text=True,
        env=env,
        timeout=timeout,
    )


def mounts_under(root: Path) -> list[str]:
    """The host's mount points at or below `root` (none once every command ended)."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="unpack a fresh root (debootstrap when not cached)")
    p.add_argument("root")
    p.add_argument("--suite", default=SUITE)
    p.add_argument("packages", nargs="+")
    p = sub.add_parser("run", help="run a command in a root")
    p.add_argument("root")
    p.add_argument("--sys-rw", action="store_true", help="/sys writable (podman's cgroups)")
    p.add_argument("argv", nargs="+")
    args = parser.parse_args()
    try:
        if args.command == "make":
            print(make_root(Path(args.root), args.packages, args.suite))
            return 0
        done = run_in_root(
            Path(args.root), args.argv, capture=False, timeout=24 * 3600, sys_rw=args.sys_rw
        )
        return done.returncode
    except FreshRootError as exc:
        print(f"freshroot.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
