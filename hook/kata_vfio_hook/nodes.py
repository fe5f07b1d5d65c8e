"""Creating /dev/vfio nodes inside the container, as runc creates device nodes, and
letting the container open them through its devices cgroup.

The hook runs in kata-agent's namespaces after the container's rootfs is set up
and before pivot_root. The container's /dev is a mount in the container's own
mount namespace; /proc/<pid>/root walks paths in that namespace, so the nodes are
made through it, with neither setns nor a child process. Relative to the rootfs,
every path component is opened with O_NOFOLLOW so a symlink in the image cannot
send a node outside; EEXIST is accepted; type and major:minor are checked after.

The cgroup: under cgroup v1, "c M:m rwm" appended to the container's devices.allow.
cgroup v2 has no such file (device access is a BPF program the runtime attached from the
spec's linux.resources.devices), so there the spec's rules decide, and we say so. (Here,
not in a module of its own: a node is no use without its rule, and each module more
costs every hook start.)
"""

from __future__ import annotations

import os
import stat

from kata_vfio.errors import HookError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import StrPath, VfioNode

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_subdir(parent_fd: int, name: str, where: str, hint: str, create: bool = True) -> int:
    """The directory `name` below `parent_fd`, made (0755) if missing and `create`
    (else FileNotFoundError); never a symlink."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:  # ENOTDIR or ELOOP: a symlink or a file
        why = exc.strerror
        try:
            if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                why = "a symbolic link"
        except OSError:
            pass
        raise HookError(f"{where} is not a plain directory ({why})", hint) from None


def open_rootfs(rootfs: str) -> int:
    try:
        return os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise HookError(
            f"cannot open the container's rootfs {rootfs}: {exc.strerror}",
            "is the container's init still there?",
        ) from None


def rootfs_view(proc: StrPath, pid: int, rootfs: str) -> str:
    """The container's rootfs as seen from its mount namespace, via /proc/<pid>/root."""
    return f"{proc}/{pid}/root/{rootfs.lstrip('/')}"


def make_nodes(rootfs: str, nodes: list[VfioNode]) -> None:
    """mknod each node at <rootfs>/dev/vfio/<name> (mode 0666), verified."""
    fds = [open_rootfs(rootfs)]
    hint = "the container image must not replace /dev/vfio"
    try:
        fds.append(open_subdir(fds[-1], "dev", f"{rootfs}/dev", hint))
        fds.append(open_subdir(fds[-1], "vfio", f"{rootfs}/dev/vfio", hint))
        vfio_fd = fds[-1]
        for name, major, minor in nodes:
            want = os.makedev(major, minor)
            try:
                os.mknod(name, stat.S_IFCHR | 0o666, want, dir_fd=vfio_fd)
            except FileExistsError:
                pass
            st = os.stat(name, dir_fd=vfio_fd, follow_symlinks=False)
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != want:
                raise HookError(
                    f"/dev/vfio/{name} in the container exists but is not char {major}:{minor}",
                    "remove it from the container image",
                )
            os.chmod(name, 0o666, dir_fd=vfio_fd)  # mknod's mode went through the umask
    finally:
        for fd in reversed(fds):
            os.close(fd)


def devices_cgroup(proc: StrPath, pid: int) -> str | None:
    """The pid's cgroup v1 devices path ('/a/b'), or None without a v1 devices hierarchy."""
    try:
        with open(os.path.join(proc, str(pid), "cgroup"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)  # "hierarchy-ID:controllers:path"
        if len(parts) != 3:
            raise HookError(f"odd line {line!r} in /proc/{pid}/cgroup", "check the guest")
        _, controllers, path = parts
        if "devices" in controllers.split(","):
            if ".." in path.split("/"):
                raise HookError(f"odd cgroup path {path!r} for pid {pid}", "check the guest")
            return path
    return None


def allow_devices(cgroupfs: StrPath, cgroup_path: str, devnums: list[tuple[int, int]]) -> str:
    allow = os.path.join(cgroupfs, "devices", cgroup_path.lstrip("/"), "devices.allow")
    for major, minor in devnums:
        with open(allow, "w", encoding="ascii") as f:  # one rule per write(2)
            f.write(f"c {major}:{minor} rwm")
    return allow
