"""The guest hook on fake guest trees: matching, rebinding, nodes, cgroup, the OCI state."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kata_vfio.errors import HookError
from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import MANIFEST_ANNOTATION
from kata_vfio_hook.events import PollWakeups
from kata_vfio_hook.main import run
from kata_vfio_hook.nodes import make_nodes, rootfs_view
from kata_vfio_hook.state import parse_state

from fakesys import NVME
from hookguest import Guest, manifest, mdev


def test_no_manifest_touches_nothing(guest: Guest) -> None:
    assert guest.run(None) == 0
    assert guest.kernel.writes == []
    assert not (guest.bundle / "rootfs/dev/vfio").exists()


def test_devices_rebound_nodes_made_and_cgroup_allowed(guest: Guest) -> None:
    m = manifest(
        (7, [mdev("0000:81:00.0", mac="52:54:00:00:00:03")]), (9, [mdev("0000:82:00.0", NVME)])
    )
    assert guest.run(m) == 0
    assert guest.fs.driver("0000:00:04.0") == "vfio-pci"  # picked by MAC, not address
    assert guest.fs.driver("0000:00:05.0") == "vfio-pci"
    assert guest.fs.driver("0000:00:02.0") == "e1000e"  # untouched
    for name, minor in (("4", 4), ("5", 5)):
        st = guest.node(name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(243, minor)
        assert st.st_mode & 0o777 == 0o666
    assert guest.node("vfio").st_rdev == os.makedev(10, 196)
    assert not any("new_id" in w for w, _ in guest.kernel.writes)
    log = guest.log()
    events = [e["event"] for e in log]
    for expected in ("start", "found", "bind", "rebind", "group mapping", "nodes", "done"):
        assert expected in events
    done = log[-1]
    assert done["host_to_guest"] == {"0000:81:00.0": "0000:00:04.0", "0000:82:00.0": "0000:00:05.0"}
    assert done["groups"] == {"7": "4", "9": "5"} and done["container_id"] == "c1"


def test_a_full_guest_tmp_does_not_fail_the_hook(guest: Guest) -> None:
    """The hook's log sits in the guest's /tmp: full (/dev/full: ENOSPC on every write),
    the container still gets its devices; the lines are dropped and counted."""
    before = JsonLog.dropped
    m = manifest((9, [mdev("0000:82:00.0", NVME)]))
    assert run(guest.state(m), guest.roots, JsonLog("/dev/full")) == 0
    assert guest.fs.driver("0000:00:05.0") == "vfio-pci"
    assert stat.S_ISCHR(guest.node("5").st_mode)
    assert JsonLog.dropped > before


def test_identical_devices_assigned_in_address_order_and_rerun_is_harmless(
    guest: Guest, tmp_path: Path
) -> None:
    m = manifest((7, [mdev("0000:81:00.0"), mdev("0000:81:00.1")]))
    assert guest.run(m) == 0
    assert [guest.fs.driver(a) for a in ("0000:00:02.0", "0000:00:03.0", "0000:00:04.0")] == [
        "vfio-pci",
        "vfio-pci",
        "e1000e",
    ]
    guest.kernel.writes.clear()
    assert guest.run(m) == 0
    assert guest.kernel.writes == []


def test_late_hotplug_is_waited_for(guest: Guest) -> None:
    m = manifest((7, [mdev("0000:81:00.0", NVME), mdev("0000:82:00.0", NVME)]), timeout=5)

    def plug() -> None:
        time.sleep(0.3)
        guest.fs.add_device("0000:00:06.0", NVME, group=6, driver="nvme")

    threading.Thread(target=plug).start()
    started = time.monotonic()
    assert guest.run(m) == 0
    assert time.monotonic() - started < 4
    assert guest.fs.driver("0000:00:06.0") == "vfio-pci"


def test_missing_device_fails_within_the_bound_touching_nothing(guest: Guest) -> None:
    m = manifest(
        (7, [mdev("0000:81:00.0", NVME), mdev("0000:82:00.0", (0x15B3, 0x101E, 0x020000))]),
        timeout=0.3,
    )
    started = time.monotonic()
    with pytest.raises(
        HookError,
        match=r"host device 0000:82:00\.0 \[15b3:101e class 020000\] "
        r"not found in the guest after 0\.3 s",
    ):
        guest.run(m)
    assert time.monotonic() - started < 2
    assert guest.kernel.writes == []
    assert guest.fs.driver("0000:00:05.0") == "nvme"


def test_refused_bind_gives_every_device_back(guest: Guest) -> None:
    guest.kernel.refuse = frozenset({"0000:00:05.0"})
    m = manifest((7, [mdev("0000:81:00.0")]), (9, [mdev("0000:82:00.0", NVME)]))
    with pytest.raises(HookError, match=r"cannot bind guest device 0000:00:05\.0 to vfio-pci"):
        guest.run(m)
    assert guest.fs.driver("0000:00:02.0") == "e1000e"
    assert guest.fs.driver("0000:00:05.0") == "nvme"


def test_symlinked_dev_vfio_in_the_image_is_refused(guest: Guest, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (guest.bundle / "rootfs/dev/vfio").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HookError, match="is not a plain directory"):
        guest.run(manifest((7, [mdev("0000:81:00.0")])))
    assert os.listdir(tmp_path / "elsewhere") == []


def test_manifest_from_kata1_libcontainer_spec(guest: Guest, tmp_path: Path) -> None:
    spec_dir = tmp_path / "libcontainer/c1"
    spec_dir.mkdir(parents=True)
    spec = {
        "root": {"path": str(guest.bundle / "rootfs")},
        "annotations": {MANIFEST_ANNOTATION: manifest((7, [mdev("0000:81:00.0", NVME)]))},
    }
    (spec_dir / "config.json").write_text(json.dumps(spec))
    state = json.dumps({"id": "c1", "pid": 4242, "bundle": ""})
    assert run(state, guest.roots, JsonLog(None)) == 0
    assert guest.fs.driver("0000:00:05.0") == "vfio-pci"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "stdin is not the OCI state JSON"),
        ('{"id": "../x", "pid": 1}', "no usable container id"),
        ('{"id": "c1", "pid": 0}', "has no container pid"),
    ],
)
def test_bad_state(text: str, message: str) -> None:
    with pytest.raises(HookError, match=message):
        parse_state(text)


def test_poll_wakeups_bounded() -> None:
    started = time.monotonic()
    PollWakeups(0.05).wait(10)
    assert time.monotonic() - started < 1


@pytest.mark.host
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_nodes_land_in_the_containers_mount_namespace(tmp_path: Path) -> None:
    """A process with its own /dev mount, as a container before pivot_root: the nodes
    made through /proc/<pid>/root appear in its namespace, not in ours."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "dev").mkdir(parents=True)
    ctr = subprocess.Popen(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs ctr-dev {rootfs}/dev && echo ready && exec sleep 60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert ctr.stdout is not None and ctr.stdout.readline().strip() == "ready"
        make_nodes(
            rootfs_view(Path("/proc"), ctr.pid, str(rootfs)), [("vfio", 10, 196), ("7", 243, 7)]
        )
        assert not (rootfs / "dev/vfio").exists()  # our view: untouched
        seen = subprocess.run(
            [
                "nsenter",
                "-t",
                str(ctr.pid),
                "-m",
                "stat",
                "-c",
                "%F %t:%T %a",
                f"{rootfs}/dev/vfio/vfio",
                f"{rootfs}/dev/vfio/7",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert seen == ["character special file a:c4 666", "character special file f3:7 666"]
    finally:
        ctr.kill()
        ctr.wait()
