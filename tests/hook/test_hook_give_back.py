"""Every failure of the guest hook after binding gives the devices back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.errors import KataVfioError

from hookguest import FakeClock, Guest, manifest, mdev

# --- every failure after binding gives everything back -------------------------------------


def _fail_in_group_check(guest: Guest) -> None:
    # a second function in the guest group of the wanted device, on a host driver
    guest.fs.add_device("0000:00:06.1", group=6, driver="e1000e")


def _fail_no_vfio_node(guest: Guest) -> None:
    guest.fs.add_vfio_group = lambda *args, **kw: None  # type: ignore[method-assign]


def _fail_pid_exits(guest: Guest) -> None:
    (guest.proc / "4242/root").symlink_to("/")  # the container's mount ns: ours, here
    guest.roots = guest.roots._replace(via_proc_root=True)
    real_write = guest.kernel.write

    def write_then_exit(path: Path, text: str) -> None:
        real_write(path, text)
        if Path(path).name == "drivers_probe" and (guest.proc / "4242").exists():
            guest.end_process(4242)  # the container's init dies while we bind

    guest.roots = guest.roots._replace(write=write_then_exit)


def _fail_dev_vfio_symlink(guest: Guest) -> None:
    (guest.bundle.parent / "elsewhere").mkdir()
    (guest.bundle / "rootfs/dev/vfio").symlink_to(guest.bundle.parent / "elsewhere")


def _fail_cgroup_write(guest: Guest) -> None:
    shutil.rmtree(guest.cgroupfs / "devices/kata/c1")


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (_fail_in_group_check, "guest IOMMU group 6 also holds 0000:00:06.1 on driver e1000e"),
        (_fail_no_vfio_node, r"/dev/vfio/\[3, 6\] did not appear"),
        (_fail_pid_exits, "cannot open the container's rootfs"),
        (_fail_dev_vfio_symlink, "is not a plain directory"),
        (_fail_cgroup_write, "devices.allow"),
    ],
)
def test_every_failure_after_binding_gives_the_devices_back(
    guest: Guest, clock: FakeClock, breakage: Any, error: str
) -> None:
    guest.fs.add_device("0000:00:06.0", (0x15B3, 0x101E, 0x020000), group=6, driver="mlx5_core")
    breakage(guest)
    m = manifest(
        (7, [mdev("0000:81:00.0", mac="52:54:00:00:00:02")]),
        (8, [mdev("0000:82:00.0", (0x15B3, 0x101E, 0x020000))]),
    )
    with pytest.raises((KataVfioError, OSError), match=error):
        guest.run(m)
    assert any(w.endswith("drivers_probe") for w, _ in guest.kernel.writes)  # it did bind
    assert guest.fs.driver("0000:00:03.0") == "e1000e"
    assert guest.fs.driver("0000:00:06.0") == "mlx5_core"
    assert (guest.fs.dev_dir("0000:00:06.0") / "driver_override").read_text() == "(null)\n"
    assert guest.claims() == {}
    given = {e["guest_address"] for e in guest.log() if e["event"] == "given back"}
    assert given == {"0000:00:03.0", "0000:00:06.0"}


def test_a_device_already_on_a_vfio_variant_driver_is_used_as_it_is(guest: Guest) -> None:
    guest.fs.add_device("0000:00:06.0", (0x15B3, 0x101E, 0x020000), group=6, driver="mlx5_vfio_pci")
    guest.fs.add_vfio_group(6)
    assert guest.run(manifest((7, [mdev("0000:81:00.0", (0x15B3, 0x101E, 0x020000))]))) == 0
    assert guest.kernel.writes == []
    assert guest.fs.driver("0000:00:06.0") == "mlx5_vfio_pci"
    assert guest.node("6").st_rdev == os.makedev(243, 6)
