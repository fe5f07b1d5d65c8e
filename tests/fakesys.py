"""Fake sysfs trees with the kernel's real symlink shapes, and a fake kernel.

One module for every test that needs /sys: the layout follows what Linux builds
(``bus/pci/devices/<addr>`` -> ``devices/pci0000:00/<addr>``, ``iommu_group``,
``driver``, ``physfn``/``virtfnN``, ``net/<ifname>``, ``class/vfio/<N>/dev``), so
code that works on it resolves the same links it meets on a real host.
`FakeKernel` plays the kernel's side of driver_override / unbind / drivers_probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kata_vfio.pci import PciAddress

E1000E = (0x8086, 0x10D3, 0x020000)
NVME = (0x1B36, 0x0010, 0x010802)
BRIDGE = (0x1B36, 0x0001, 0x060400)
IGBVF = (0x8086, 0x10CA, 0x020000)


@dataclass
class FakeSysfs:
    root: Path
    vfio_major: int = 243

    def __post_init__(self) -> None:
        for d in (
            "devices/pci0000:00",
            "bus/pci/devices",
            "bus/pci/drivers",
            "kernel/iommu_groups",
            "class/vfio",
            "devices/virtual/vfio",
        ):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "bus/pci/drivers_probe").write_text("")
        self.native: dict[str, str | None] = {}
        self.sriov: dict[str, tuple[tuple[int, int, int], int]] = {}

    # -- building ---------------------------------------------------------------------
    def dev_dir(self, addr: str) -> Path:
        return self.root / "devices/pci0000:00" / addr

    def add_driver(self, name: str) -> Path:
        d = self.root / "bus/pci/drivers" / name
        if not d.is_dir():
            d.mkdir(parents=True)
            for attr in ("bind", "unbind", "new_id", "remove_id"):
                (d / attr).write_text("")
        return d

    def add_device(
        self,
        addr: str,
        ids: tuple[int, int, int] = E1000E,
        *,
        group: int | None = None,
        driver: str | None = None,
        subsystem: tuple[int, int] = (0x8086, 0x0000),
        net: tuple[str, ...] = (),
        mac: str = "52:54:00:12:34:56",
    ) -> Path:
        addr = str(PciAddress.parse(addr))
        d = self.dev_dir(addr)
        d.mkdir(parents=True)
        vendor, device, class_code = ids
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "subsystem_vendor").write_text(f"0x{subsystem[0]:04x}\n")
        (d / "subsystem_device").write_text(f"0x{subsystem[1]:04x}\n")
        (d / "class").write_text(f"0x{class_code:06x}\n")
        (d / "driver_override").write_text("(null)\n")
        os.symlink(f"../../../devices/pci0000:00/{addr}", self.root / "bus/pci/devices" / addr)
        if group is not None:
            gdir = self.root / "kernel/iommu_groups" / str(group) / "devices"
            gdir.mkdir(parents=True, exist_ok=True)
            os.symlink(f"../../../../devices/pci0000:00/{addr}", gdir / addr)
            os.symlink(f"../../../kernel/iommu_groups/{group}", d / "iommu_group")
        for ifname in net:
            (d / "net" / ifname).mkdir(parents=True)
            (d / "net" / ifname / "address").write_text(mac + "\n")
            self._class_link("net", ifname, f"{addr}/net/{ifname}")
        self.native[addr] = driver
        if driver:
            self.set_driver(addr, driver)
        return d

    def _class_link(self, cls: str, name: str, below_root_complex: str) -> None:
        """/sys/class/<cls>/<name> -> ../../devices/pci0000:00/<path>, as the kernel links it."""
        (self.root / "class" / cls).mkdir(parents=True, exist_ok=True)
        os.symlink(
            f"../../devices/pci0000:00/{below_root_complex}", self.root / "class" / cls / name
        )

    def add_child_interface(self, addr: str, ifname: str, child: str = "virtio2") -> Path:
        """A network interface one device below the PCI function, as virtio-net makes it:
        ``<function>/virtio2/net/eth0`` (no ``<function>/net``)."""
        addr = str(PciAddress.parse(addr))
        d = self.dev_dir(addr) / child / "net" / ifname
        d.mkdir(parents=True)
        self._class_link("net", ifname, f"{addr}/{child}/net/{ifname}")
        return d

    def add_child_block(
        self, addr: str, disk: str, partitions: tuple[str, ...] = (), child: str = "virtio3"
    ) -> Path:
        """A disk (and its partitions) below the PCI function, as virtio-blk makes it:
        ``<function>/virtio3/block/vda/vda1``."""
        addr = str(PciAddress.parse(addr))
        d = self.dev_dir(addr) / child / "block" / disk
        d.mkdir(parents=True)
        self._class_link("block", disk, f"{addr}/{child}/block/{disk}")
        for part in partitions:
            (d / part).mkdir()
            self._class_link("block", part, f"{addr}/{child}/block/{disk}/{part}")
        return d

    def add_sriov_pf(
        self, pf: str, total: int, vf_ids: tuple[int, int, int], group_base: int
    ) -> None:
        """SR-IOV attributes on an existing device; FakeKernel makes VFs on sriov_numvfs
        writes (at bus+1, group_base + index), as the kernel's rules say."""
        d = self.dev_dir(pf)
        (d / "sriov_totalvfs").write_text(f"{total}\n")
        (d / "sriov_numvfs").write_text("0\n")
        (d / "sriov_drivers_autoprobe").write_text("1\n")
        self.sriov[pf] = (vf_ids, group_base)

    def remove_device(self, addr: str) -> None:
        import shutil

        if self.driver(addr):
            self.set_driver(addr, None)
        group = self.group(addr)
        if group is not None:
            gdir = self.root / "kernel/iommu_groups" / str(group)
            (gdir / "devices" / addr).unlink()
            if not os.listdir(gdir / "devices"):
                shutil.rmtree(gdir)
        (self.root / "bus/pci/devices" / addr).unlink()
        shutil.rmtree(self.dev_dir(addr))

    def add_vf(self, pf: str, vf: str, index: int) -> None:
        os.symlink(f"../{pf}", self.dev_dir(vf) / "physfn")
        os.symlink(f"../{vf}", self.dev_dir(pf) / f"virtfn{index}")

    def add_vfio_endpoints(self, count: int, first_bus: int, first_group: int) -> list[str]:
        """`count` functions (e1000e IDs) already on vfio-pci, one per group (0000:<bus>:00.0 in
        group <group>, counting up): what a VFIO container asks for."""
        addresses = []
        for i in range(count):
            addr = f"0000:{first_bus + i:02x}:00.0"
            self.add_device(addr, group=first_group + i, driver="vfio-pci")
            self.add_vfio_group(first_group + i)
            addresses.append(addr)
        return addresses

    def add_vfio_group(self, group: int, minor: int | None = None) -> None:
        vdir = self.root / "devices/virtual/vfio" / str(group)
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "dev").write_text(f"{self.vfio_major}:{group if minor is None else minor}\n")
        link = self.root / "class/vfio" / str(group)
        try:  # binds run in threads: two members of a group may both get here
            os.symlink(f"../../devices/virtual/vfio/{group}", link)
        except FileExistsError:
            pass

    def set_driver(self, addr: str, driver: str | None) -> None:
        d = self.dev_dir(addr)
        old = self.driver(addr)
        if old:
            (d / "driver").unlink()
            (self.root / "bus/pci/drivers" / old / addr).unlink()
        if driver:
            self.add_driver(driver)
            os.symlink(f"../../../bus/pci/drivers/{driver}", d / "driver")
            os.symlink(
                f"../../../../devices/pci0000:00/{addr}",
                self.root / "bus/pci/drivers" / driver / addr,
            )

    # -- reading ----------------------------------------------------------------------
    def driver(self, addr: str) -> str | None:
        link = self.dev_dir(addr) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def group(self, addr: str) -> int | None:
        link = self.dev_dir(addr) / "iommu_group"
        return int(os.path.basename(os.readlink(link))) if link.is_symlink() else None


class FakeKernel:
    """The kernel's side of the sysfs writes that move drivers, on a FakeSysfs.

    driver_override stores the name; ``drivers/<d>/unbind`` drops the driver link;
    ``drivers_probe`` binds the override if set (when that driver is registered),
    else the device's native driver. Binding vfio-pci creates ``class/vfio/<group>``.
    `refuse` names devices vfio-pci will not take (its probe fails).
    """

    def __init__(self, fs: FakeSysfs, refuse: frozenset[str] = frozenset()) -> None:
        self.fs = fs
        self.refuse = refuse
        self.writes: list[tuple[str, str]] = []

    def write(self, path: str | Path, text: str) -> None:
        path = Path(path)
        rel = os.path.relpath(os.path.realpath(path.parent), self.fs.root)
        self.writes.append((f"{rel}/{path.name}", text))
        if path.name == "driver_override":
            value = text.strip()
            Path(os.path.realpath(path)).write_text((value or "(null)") + "\n")
        elif path.name == "unbind":
            addr = str(PciAddress.parse(text))
            self.fs.set_driver(addr, None)
        elif path.name == "drivers_probe":
            self._probe(str(PciAddress.parse(text)))
        elif path.name == "sriov_numvfs":
            self._set_numvfs(os.path.basename(os.path.realpath(path.parent)), int(text))
        elif path.name == "new_id":
            raise AssertionError("new_id must never be used")
        else:
            path.write_text(text)

    def _set_numvfs(self, pf: str, count: int) -> None:
        d = self.fs.dev_dir(pf)
        current = int((d / "sriov_numvfs").read_text())
        if current and count:
            raise OSError(16, "Device or resource busy")  # must go through 0
        vf_ids, group_base = self.fs.sriov[pf]
        if count == 0:
            for link in sorted(d.glob("virtfn*")):
                vf = os.path.basename(os.readlink(link))
                link.unlink()
                self.fs.remove_device(vf)
        autoprobe = (d / "sriov_drivers_autoprobe").read_text().strip() == "1"
        pf_addr = PciAddress.parse(pf)
        for i in range(count):
            vf = str(PciAddress(pf_addr.domain, pf_addr.bus + 1, i // 8, i % 8))
            self.fs.add_device(
                vf, vf_ids, group=group_base + i, driver="vf-native" if autoprobe else None
            )
            self.fs.add_vf(pf, vf, i)
        (d / "sriov_numvfs").write_text(f"{count}\n")

    def _probe(self, addr: str) -> None:
        if self.fs.driver(addr):
            return
        override = (self.fs.dev_dir(addr) / "driver_override").read_text().strip()
        if override and override != "(null)":
            registered = (self.fs.root / "bus/pci/drivers" / override).is_dir()
            if not registered or (override == "vfio-pci" and addr in self.refuse):
                raise OSError(22, "Invalid argument")
            self.fs.set_driver(addr, override)
            group = self.fs.group(addr)
            if override == "vfio-pci" and group is not None:
                self.fs.add_vfio_group(group)
            return
        native = self.fs.native.get(addr)
        if native:
            self.fs.set_driver(addr, native)


def engine_host(root: Path) -> FakeSysfs:
    """The host the engine tests (podman, containerd, CDI) share: group 12 with one NIC,
    group 13 with two, both already handed to vfio-pci by an admin."""
    fs = FakeSysfs(root)
    fs.add_device("0000:03:00.0", group=12, driver="vfio-pci")
    fs.add_vfio_group(12, minor=0)
    fs.add_device("0000:04:00.0", group=13, driver="vfio-pci")
    fs.add_device("0000:04:00.1", group=13, driver="vfio-pci")
    fs.add_vfio_group(13, minor=1)
    return fs
