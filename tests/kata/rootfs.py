"""Container images built locally (no registry): busybox, and dpdk-testpmd with its libraries.

The images are plain root filesystems, tarred and given to `podman import`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BUSYBOX_APPLETS = (
    "sh",
    "cat",
    "stat",
    "sleep",
    "ls",
    "echo",
    "grep",
    "head",
    "tail",
    "mkdir",
    "ps",
    "kill",
    "timeout",
    "wc",
    "dd",
    "test",
    "[",
    "true",
    "false",
    "env",
    "mount",
    "readlink",
    "find",
    "sed",
)
PMD_DIR = "/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0"
# The only plugins EAL finds in the image (EAL dlopens every .so in its driver directory;
# fewer is faster under TCG): PCI bus, vdev bus, the e1000/e1000e PMD, the ring mempool.
DPDK_PLUGINS = ("librte_bus_pci", "librte_bus_vdev", "librte_net_e1000", "librte_mempool_ring")
DPDK_APT = ("dpdk", "dpdk-dev")


def ensure_dpdk() -> None:
    if shutil.which("dpdk-testpmd"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DPDK_APT],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _copy(src: str | Path, root: Path) -> None:
    """Copy `src` into `root` at the same path, following a chain of symlinks as symlinks."""
    src = Path(src)
    while True:
        src = Path(os.path.realpath(src.parent)) / src.name  # /lib/... -> /usr/lib/...
        dest = root / src.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            return
        if src.is_symlink():
            target = os.readlink(src)
            dest.symlink_to(target)
            src = src.parent / target
            continue
        shutil.copy2(src, dest)
        return


def _libraries(binary: str | Path) -> list[str]:
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    libs = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])  # the dynamic loader
    return libs


def busybox_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", root / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    for d in ("tmp", "run", "proc", "sys", "dev", "etc", "var"):
        (root / d).mkdir(exist_ok=True)
    if not (root / "var/run").is_symlink():
        (root / "var/run").symlink_to("../run")  # DPDK's runtime dir as root: /var/run/dpdk
    return root


def dpdk_rootfs(root: Path) -> Path:
    """busybox + /usr/bin/dpdk-testpmd, its libraries and the PMD plugins it needs."""
    ensure_dpdk()
    busybox_rootfs(root)
    testpmd = shutil.which("dpdk-testpmd") or "/usr/bin/dpdk-testpmd"
    # glibc dlopens libgcc_s for pthread_cancel (testpmd's exit): without it, SIGSEGV at exit
    todo = [testpmd, "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"]
    for name in DPDK_PLUGINS:
        todo.append(f"{PMD_DIR}/{name}.so")
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        _copy(path, root)
        todo.extend(_libraries(os.path.realpath(path)))
    # DPDK's runtime directory as root is /var/run/dpdk (/var/run -> ../run): under Kata 1.x
    # the rootfs is 9p, where its Unix socket cannot be bound; the kata-vfio wrapper mounts
    # a tmpfs there for VFIO containers, so the image needs nothing special
    # merged /usr as on the host: the loader is asked for as /lib64/ld-linux-x86-64.so.2
    for link in ("lib64", "lib"):
        if not (root / link).exists() and (root / "usr" / link).is_dir():
            (root / link).symlink_to(f"usr/{link}")
    return root


def import_image(podman: list[str], env: dict[str, str], root: Path, tar: Path, name: str) -> None:
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
    # podman's progress lines are noise: its stderr is shown only when the import fails
    r = subprocess.run([*podman, "import", str(tar), name], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
