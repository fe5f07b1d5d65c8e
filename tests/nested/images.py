"""What both nested tests (with no Kata: test_nested_host_e2e.py; against an installed Kata:
test_kata_nested_e2e.py) put into their L1 and L2: the project's own directories, the kernel
as an ELF vmlinux, the guest image uncompressed, and the static VFIO checker the container
runs."""

from __future__ import annotations

import lzma
import shutil
import subprocess
import zlib
from pathlib import Path

from kata.installed import Unavailable


def l1_sources() -> list[str]:
    """virtme-ng options that show L1 the project and its venv at their own paths: L1 sees
    this host's root, but with tmpfs over /tmp, /var/tmp and more, where a clone (CI's own
    among them) may live."""
    import sys

    repo = Path(__file__).resolve().parents[2]
    dirs = [repo] + (
        [] if Path(sys.prefix).resolve().is_relative_to(repo) else [Path(sys.prefix).resolve()]
    )
    return [arg for d in dirs for arg in ("--rodir", str(d))]


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise Unavailable(reason)


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """The ELF vmlinux inside Debian's XZ-compressed bzImage. Kata's `kernel` points at it:
    QEMU boots it through its PVH entry, which skips the real-mode setup code and the
    decompressor. L2 (TCG inside TCG) with Kata's intel-iommu device resets in exactly that
    stretch (right after "Probing EDD"), with the bzImage; and PVH saves ~12 s (LAB.md 7)."""
    data = bzimage.read_bytes()
    if data[:4] == b"\x7fELF":  # a Kata guest kernel is often a vmlinux already
        out.write_bytes(data)
        return out
    start = data.find(b"\xfd7zXZ\x00")
    _check(start >= 0, f"{bzimage}: no XZ payload (only XZ-compressed kernels handled)")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    _check(elf[:4] == b"\x7fELF", f"{bzimage}: the XZ payload is not an ELF vmlinux")
    out.write_bytes(elf)
    return out


def _newc_end(data: bytes) -> int:
    """Where the plain newc cpio archive at the start of `data` ends (after its trailer)."""
    pos = 0
    while True:
        if data[pos : pos + 6] not in (b"070701", b"070702"):
            raise Unavailable(f"initrd: no cpio header at {pos}")
        filesize = int(data[pos + 54 : pos + 62], 16)
        namesize = int(data[pos + 94 : pos + 102], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1]
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize
        pos += -pos % 4
        if name == b"TRAILER!!!":
            return pos


def uncompressed_initrd(data: bytes) -> bytes:
    """The image's concatenated archives (gzip members and plain cpio), all uncompressed,
    each starting at a multiple of 4 as the kernel wants (else "broken padding")."""
    out = bytearray()
    while data := data.lstrip(b"\0"):
        out += b"\0" * (-len(out) % 4)
        if data[:2] == b"\x1f\x8b":
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(data)
            data = d.unused_data
        else:
            end = _newc_end(data)
            out += data[:end]
            data = data[end:]
    return bytes(out)


VFIO_VIABLE_C = r"""/* written by tests/nested/images.py: run in the container, opens
   /dev/vfio/vfio (VFIO_GET_API_VERSION = _IO(';', 100)) and every group node in /dev/vfio
   (VFIO_GROUP_GET_STATUS = _IO(';', 103) on {u32 argsz; u32 flags}, flag 1 = viable) */
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void) {
    int container = open("/dev/vfio/vfio", O_RDWR), bad = 0;
    if (container < 0) { perror("/dev/vfio/vfio"); return 1; }
    printf("api %d\n", ioctl(container, 0x3B64));
    DIR *dir = opendir("/dev/vfio");
    for (struct dirent *e; dir && (e = readdir(dir));) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "vfio") == 0) continue;
        char path[300];
        snprintf(path, sizeof path, "/dev/vfio/%s", e->d_name);
        struct { uint32_t argsz, flags; } status = {8, 0};
        int group = open(path, O_RDWR);
        if (group < 0 || ioctl(group, 0x3B67, &status) < 0) { perror(path); bad = 1; continue; }
        printf("group %s viable %u\n", e->d_name, status.flags & 1);
        close(group);
    }
    return bad;
}
"""


def vfio_viable(source: Path, binary: Path) -> Path:
    """A static checker for the busybox image (no Python in it): the container's view."""
    gcc = shutil.which("gcc")
    _check(gcc is not None, "needs gcc (build-essential, make deps)")
    source.write_text(VFIO_VIABLE_C)
    subprocess.run([str(gcc), "-static", "-O2", "-o", str(binary), str(source)], check=True)
    return binary
