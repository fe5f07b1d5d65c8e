"""Telling the container its guest addresses: /run/kata-vfio/devices.json and env.

Guest addresses differ from the host's, and a userspace driver needs them (DPDK's
``-a <BDF>``). Kata >= 2's agent in vfio mode rewrites ``PCIDEVICE_*`` variables to
guest addresses; where this hook serves, the container's environment is fixed before
any hook runs, so the hook writes two files into the container's root instead, after
every other step (a hook that fails leaves none, see `forget`):

- ``devices.json``: ``{"version": 1, "devices": {<host address>: {"guest_address",
  "guest_group", "node", "resource"}}}``, this container's devices only, in the
  manifest's order; ``resource`` is null for a device asked for without one;
- ``env``: ``PCIDEVICE_<RESOURCE>=<guest addresses, comma-separated>``, one a line,
  the resource name upper-cased with every other character '_' as device plugins do
  (kata-vfio.io/nvme -> PCIDEVICE_KATA_VFIO_IO_NVME); devices without a resource name
  are PCIDEVICE_KATA_VFIO_IO_DEVICES. Every line is also a valid shell assignment.

Written as nodes.py makes /dev/vfio: through the container's mount namespace, every
directory opened with O_NOFOLLOW (a symlinked /run or /run/kata-vfio in the image is
refused), each file written to a fresh temp file (O_EXCL | O_NOFOLLOW) in that
directory and renamed over the old one, so a symlink planted in its place is replaced,
never followed, and a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import time

from kata_vfio.errors import HookError
from kata_vfio.files import write_fully
from kata_vfio.jsoncodec import dumps
from kata_vfio.manifest import resource_env_name
from kata_vfio_hook.nodes import open_rootfs, open_subdir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import Placed

RUN_DIR = "/run/kata-vfio"  # as the container sees it
DEVICES_FILE = "devices.json"
ENV_FILE = "env"
FILES = (DEVICES_FILE, ENV_FILE)
FILE_MODE = 0o644
_HINT = "the container image must not replace /run or /run/kata-vfio"


def render(placed: list[Placed]) -> list[tuple[str, bytes]]:
    """The two files' names and contents for the container's devices."""
    devices = {}
    env: dict[str, list[str]] = {}
    for host, guest, group, resource in placed:
        devices[host] = {
            "guest_address": guest,
            "guest_group": group,
            "node": f"/dev/vfio/{group}",
            "resource": resource,
        }
        env.setdefault(resource_env_name(resource), []).append(guest)
    listing = dumps({"version": 1, "devices": devices}) + "\n"
    lines = "".join(f"{key}={','.join(guests)}\n" for key, guests in env.items())
    return [(DEVICES_FILE, listing.encode()), (ENV_FILE, lines.encode())]


def _open_run_dir(rootfs: str, create: bool = True) -> list[int]:
    """fds of the rootfs, its run/ and run/kata-vfio/ (made if missing and `create`, else
    FileNotFoundError), the deepest last."""
    fds = [open_rootfs(rootfs)]
    try:
        fds.append(open_subdir(fds[-1], "run", "the container's /run", _HINT, create))
        fds.append(open_subdir(fds[-1], "kata-vfio", f"the container's {RUN_DIR}", _HINT, create))
    except BaseException:
        for fd in reversed(fds):
            os.close(fd)
        raise
    return fds


def _replace(dir_fd: int, name: str, data: bytes) -> None:
    # a name only this process uses; O_EXCL | O_NOFOLLOW: nothing the image put there
    tmp = f".{name}.{os.getpid()}.{time.monotonic_ns()}"
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            FILE_MODE,
            dir_fd=dir_fd,
        )
        try:
            try:
                os.fchmod(fd, FILE_MODE)  # os.open's mode went through the umask
                write_fully(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise HookError(
            f"cannot write the container's {RUN_DIR}/{name}: {exc.strerror}",
            f"{RUN_DIR}/{name} must be a file the hook may replace; "
            "remove it from the container image",
        ) from None


def write(rootfs: str, placed: list[Placed]) -> None:
    """devices.json and env into <rootfs>/run/kata-vfio/, each replaced atomically."""
    fds = _open_run_dir(rootfs)
    try:
        for name, data in render(placed):
            _replace(fds[-1], name, data)
    finally:
        for fd in reversed(fds):
            os.close(fd)


def forget(rootfs: str) -> None:
    """Remove the files an earlier start of this container wrote (the hook failed this
    time: no file may name devices it was not given). Errors are the caller's to log."""
    try:
        fds = _open_run_dir(rootfs, create=False)
    except FileNotFoundError:
        return  # no /run/kata-vfio: nothing to forget, and nothing made
    failed: OSError | None = None
    try:
        for name in FILES:
            try:
                os.unlink(name, dir_fd=fds[-1])
            except FileNotFoundError:
                pass
            except OSError as exc:  # the next file still goes
                failed = failed or exc
    finally:
        for fd in reversed(fds):
            os.close(fd)
    if failed is not None:
        raise failed
