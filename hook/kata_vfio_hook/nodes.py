"""Creating /dev/vfio nodes inside the container, as runc creates device nodes.

The hook runs in kata-agent's namespaces after the container's rootfs is set up
and before pivot_root. The container's /dev lives in its own mount namespace, so
a child process joins it (setns needs a single-threaded caller) and makes the
nodes relative to the rootfs: every path component opened with O_NOFOLLOW so a
symlink in the image cannot send a node outside, EEXIST accepted, type and
major:minor checked afterwards.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kata_vfio.errors import HookError

CLONE_NEWNS = 0x00020000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Node = tuple[str, int, int]  # name under /dev/vfio, major, minor


def _open_subdir(parent_fd: int, name: str, where: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file
        raise HookError(f"{where} is not a plain directory ({exc.strerror})",
                        "the container image must not replace /dev/vfio") from None


def make_nodes(rootfs: str, nodes: list[Node]) -> None:
    """mknod each node at <rootfs>/dev/vfio/<name> (mode 0666), verified."""
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = [root_fd]
    try:
        fds.append(_open_subdir(fds[-1], "dev", f"{rootfs}/dev"))
        fds.append(_open_subdir(fds[-1], "vfio", f"{rootfs}/dev/vfio"))
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
                    "remove it from the container image")
            os.chmod(name, 0o666, dir_fd=vfio_fd)  # mknod's mode went through the umask
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _setns(ns_path: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def make_nodes_in_container(mount_ns: Path | None, rootfs: str, nodes: list[Node]) -> None:
    """Join `mount_ns` in a child process, then `make_nodes`; None: this namespace."""
    if mount_ns is None:
        make_nodes(rootfs, nodes)
        return
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            os.close(read_fd)
            _setns(mount_ns)
            make_nodes(rootfs, nodes)
        except BaseException as exc:
            message = exc.one_line() if isinstance(exc, HookError) else str(exc)
            os.write(write_fd, message.encode(errors="replace")[:4000])
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise HookError(f"cannot create /dev/vfio nodes in the container: {message}",
                        "see /tmp/kata-vfio-hook.log in the guest")
