"""/run/kata-vfio/devices.json and env: the guest addresses the hook tells each container.

On the fake guest trees of hookguest.py (the test_hook*.py files); the host half (the
resource name from the io.kata-vfio.resource.<name> annotation into the manifest) on the
fake host of test_spec_edit.py, and both together: the wrapper's manifest read by the hook.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.errors import DeviceError, HookError, SpecError
from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import (
    MANIFEST_ANNOTATION,
    Manifest,
    ManifestDevice,
    ManifestGroup,
    resource_env_name,
)
from kata_vfio.pci import IommuGroup, PciAddress, PciIdentity
from kata_vfio_hook import main as hook_main
from kata_vfio_hook.main import run
from kata_vfio_host.settings import Settings
from kata_vfio_runtime.spec_edit import plan_edit

from fakesys import E1000E, NVME, FakeKernel, FakeSysfs
from hookguest import Guest

NIC = "kata-vfio.io/nic"


def mdev(
    addr: str,
    ids: tuple[int, int, int] = E1000E,
    mac: str | None = None,
    resource: str | None = None,
) -> ManifestDevice:
    vendor, device, cls = ids
    return ManifestDevice(
        PciAddress.parse(addr), PciIdentity(vendor, device, 0x8086, 0, cls), mac, resource
    )


def manifest(*groups: tuple[int, list[ManifestDevice]], timeout: float = 0.3) -> str:
    return Manifest(
        tuple(ManifestGroup(IommuGroup(n), tuple(d)) for n, d in groups), timeout
    ).to_json()


class Pod(Guest):
    """The guest of a pod: each container its own bundle and rootfs, as Kata gives them."""

    def rootfs(self, cid: str) -> Path:
        return self.bundle.parent / f"bundle-{cid}" / "rootfs"

    def start(self, annotation: str, cid: str, pid: int) -> int:
        (self.rootfs(cid) / "dev").mkdir(parents=True, exist_ok=True)
        if not (self.proc / str(pid)).exists():
            self.start_process(pid)
        state = json.dumps(
            {
                "ociVersion": "1.0.2",
                "id": cid,
                "pid": pid,
                "status": "created",
                "bundle": str(self.rootfs(cid).parent),
                "annotations": {MANIFEST_ANNOTATION: annotation},
            }
        )
        return run(state, self.roots, JsonLog(self.log_path))

    def files(self, cid: str) -> tuple[dict[str, Any], str]:
        run_dir = self.rootfs(cid) / "run/kata-vfio"
        return (json.loads((run_dir / "devices.json").read_text()), (run_dir / "env").read_text())

    def main(
        self,
        annotation: str,
        cid: str,
        pid: int,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> tuple[int, list[str]]:
        """The hook as kata-agent runs it (main(): the error boundary, one line)."""
        if not (self.proc / str(pid)).exists():
            self.start_process(pid)
        state = json.dumps(
            {
                "id": cid,
                "pid": pid,
                "bundle": str(self.rootfs(cid).parent),
                "annotations": {MANIFEST_ANNOTATION: annotation},
            }
        )
        monkeypatch.setattr(sys, "stdin", io.StringIO(state))
        monkeypatch.setattr(hook_main, "LOG_PATH", str(self.log_path))
        rc = hook_main.main(["kata-vfio-hook", "prestart"], self.roots)
        return rc, capsys.readouterr().err.splitlines()


@pytest.fixture
def pod(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Pod:
    # three identical NICs, a group each, and an NVMe drive (as test_hook's guest)
    for n, addr in enumerate(("0000:00:02.0", "0000:00:03.0", "0000:00:04.0")):
        fakesys.add_device(
            addr, group=2 + n, driver="e1000e", net=(f"eth{n}",), mac=f"52:54:00:00:00:0{n + 1}"
        )
    fakesys.add_device("0000:00:05.0", NVME, group=5, driver="nvme")
    return Pod(tmp_path, fakesys, kernel)


def entry(fs: FakeSysfs, guest: str, resource: str | None) -> dict[str, Any]:
    """What devices.json must say of a guest device: its group as the guest's sysfs has it."""
    group = fs.group(guest)
    return {
        "guest_address": guest,
        "guest_group": group,
        "node": f"/dev/vfio/{group}",
        "resource": resource,
    }


def test_the_container_learns_its_guest_addresses(pod: Pod) -> None:
    m = manifest(
        (7, [mdev("0000:81:00.0", mac="52:54:00:00:00:03", resource=NIC)]),
        (8, [mdev("0000:81:00.1", resource=NIC)]),
        (9, [mdev("0000:82:00.0", NVME)]),
    )
    assert pod.start(m, "c1", 100) == 0
    listing, env = pod.files("c1")
    assert listing == {
        "version": 1,
        "devices": {
            "0000:81:00.0": entry(pod.fs, "0000:00:04.0", NIC),  # by MAC
            "0000:81:00.1": entry(pod.fs, "0000:00:02.0", NIC),
            "0000:82:00.0": entry(pod.fs, "0000:00:05.0", None),
        },
    }
    assert list(listing["devices"]) == ["0000:81:00.0", "0000:81:00.1", "0000:82:00.0"]
    assert env == (
        "PCIDEVICE_KATA_VFIO_IO_NIC=0000:00:04.0,0000:00:02.0\n"
        "PCIDEVICE_KATA_VFIO_IO_DEVICES=0000:00:05.0\n"
    )
    run_dir = pod.rootfs("c1") / "run/kata-vfio"
    for name in ("devices.json", "env"):
        st = os.stat(run_dir / name, follow_symlinks=False)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o755
    assert sorted(os.listdir(run_dir)) == ["devices.json", "env"]  # no temp file left
    for device in listing["devices"].values():  # each node it names is there, its group's
        node = os.stat(pod.rootfs("c1") / device["node"].lstrip("/"))
        assert stat.S_ISCHR(node.st_mode) and os.minor(node.st_rdev) == device["guest_group"]
    assert "addresses" in [e["event"] for e in pod.log()]


def test_the_env_file_gives_testpmd_its_a_options(pod: Pod) -> None:
    """The README's line: `dpdk-testpmd $(sed … /run/kata-vfio/env)` gets one -a per device,
    and each line also works as a shell assignment."""
    m = manifest(
        (7, [mdev("0000:81:00.0", resource=NIC), mdev("0000:81:00.1", resource=NIC)]),
        (9, [mdev("0000:82:00.0", NVME)]),
    )
    assert pod.start(m, "c1", 100) == 0
    env = pod.rootfs("c1") / "run/kata-vfio/env"
    options = subprocess.run(
        ["sh", "-c", f"echo $(sed -n 's/^PCIDEVICE_[A-Z0-9_]*=/,/; s/,/ -a /gp' {env})"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert options == ["-a", "0000:00:02.0", "-a", "0000:00:03.0", "-a", "0000:00:05.0"]
    nic = subprocess.run(
        ["sh", "-c", f'. {env}; echo "$PCIDEVICE_KATA_VFIO_IO_NIC"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert nic == "0000:00:02.0,0000:00:03.0\n"


def test_two_containers_of_a_pod_each_see_only_their_own(pod: Pod) -> None:
    """Both live at once; b asks for a NIC identical to a's (the claim ledger gives it
    another guest device) and an NVMe drive. Neither file names the other's devices."""
    assert pod.start(manifest((7, [mdev("0000:81:00.0", resource=NIC)])), "a", 100) == 0
    assert (
        pod.start(
            manifest((8, [mdev("0000:91:00.0", resource=NIC)]), (9, [mdev("0000:92:00.0", NVME)])),
            "b",
            200,
        )
        == 0
    )
    a_listing, a_env = pod.files("a")
    b_listing, b_env = pod.files("b")
    assert a_listing["devices"] == {"0000:81:00.0": entry(pod.fs, "0000:00:02.0", NIC)}
    assert a_env == "PCIDEVICE_KATA_VFIO_IO_NIC=0000:00:02.0\n"
    assert b_listing["devices"] == {
        "0000:91:00.0": entry(pod.fs, "0000:00:03.0", NIC),
        "0000:92:00.0": entry(pod.fs, "0000:00:05.0", None),
    }
    assert b_env == (
        "PCIDEVICE_KATA_VFIO_IO_NIC=0000:00:03.0\nPCIDEVICE_KATA_VFIO_IO_DEVICES=0000:00:05.0\n"
    )
    assert pod.claims() == {"0000:00:02.0": "a", "0000:00:03.0": "b", "0000:00:05.0": "b"}


def _plant_run_symlink(rootfs: Path, outside: Path) -> None:
    (rootfs / "run").symlink_to(outside)


def _plant_dir_symlink(rootfs: Path, outside: Path) -> None:
    (rootfs / "run").mkdir()
    (rootfs / "run/kata-vfio").symlink_to(outside)


def _plant_directory(rootfs: Path, outside: Path) -> None:
    (rootfs / "run/kata-vfio/env").mkdir(parents=True)


@pytest.mark.parametrize(
    ("plant", "line"),
    [
        (_plant_run_symlink, "the container's /run is not a plain directory (a symbolic link)"),
        (
            _plant_dir_symlink,
            "the container's /run/kata-vfio is not a plain directory (a symbolic link)",
        ),
        (_plant_directory, "cannot write the container's /run/kata-vfio/env: Is a directory"),
    ],
)
def test_what_the_image_planted_is_refused_and_nothing_stays_bound(
    pod: Pod,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    plant: Any,
    line: str,
) -> None:
    """A symlinked /run or /run/kata-vfio could send the files anywhere in the guest (the
    hook runs as root in the agent's namespaces): one line, non-zero, every device given
    back, no claim kept, nothing written outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (pod.rootfs("c1") / "dev").mkdir(parents=True)
    plant(pod.rootfs("c1"), outside)
    m = manifest((7, [mdev("0000:81:00.0", resource=NIC)]), (9, [mdev("0000:82:00.0", NVME)]))
    rc, err = pod.main(m, "c1", 100, monkeypatch, capsys)
    assert rc != 0
    assert len(err) == 1 and err[0].startswith(f"kata-vfio-hook: {line}"), err
    assert any(w.endswith("drivers_probe") for w, _ in pod.kernel.writes)  # it had bound
    assert pod.fs.driver("0000:00:02.0") == "e1000e" and pod.fs.driver("0000:00:05.0") == "nvme"
    assert pod.claims() == {}
    assert os.listdir(outside) == []


def test_a_planted_file_symlink_is_replaced_not_followed(pod: Pod, tmp_path: Path) -> None:
    """devices.json and env as symlinks to a guest file: the rename replaces the links;
    the file they pointed at keeps its content."""
    target = tmp_path / "guest-file"
    target.write_text("the guest's own\n")
    run_dir = pod.rootfs("c1") / "run/kata-vfio"
    run_dir.mkdir(parents=True)
    for name in ("devices.json", "env"):
        (run_dir / name).symlink_to(target)
    assert pod.start(manifest((7, [mdev("0000:81:00.0")])), "c1", 100) == 0
    assert target.read_text() == "the guest's own\n"
    for name in ("devices.json", "env"):
        assert not (run_dir / name).is_symlink()
    assert pod.files("c1")[1] == "PCIDEVICE_KATA_VFIO_IO_DEVICES=0000:00:02.0\n"


def test_a_second_start_rewrites_the_files(pod: Pod) -> None:
    """A restarted container (same id and rootfs, a new init) gets files that say what this
    start gave it, nothing of the last one's."""
    assert pod.start(manifest((7, [mdev("0000:81:00.0"), mdev("0000:81:00.1")])), "c1", 100) == 0
    first = pod.files("c1")
    assert len(first[0]["devices"]) == 2
    pod.end_process(100)
    assert (
        pod.start(
            manifest((9, [mdev("0000:82:00.0", NVME, resource="kata-vfio.io/nvme")])), "c1", 101
        )
        == 0
    )
    listing, env = pod.files("c1")
    assert listing["devices"] == {
        "0000:82:00.0": entry(pod.fs, "0000:00:05.0", "kata-vfio.io/nvme")
    }
    assert env == "PCIDEVICE_KATA_VFIO_IO_NVME=0000:00:05.0\n"
    assert sorted(os.listdir(pod.rootfs("c1") / "run/kata-vfio")) == ["devices.json", "env"]


def test_a_failed_start_leaves_no_file_naming_devices(pod: Pod) -> None:
    """Kata >= 2 starts a container whose hook failed: files of its earlier start must not
    tell it of devices it no longer has."""
    m = manifest((9, [mdev("0000:82:00.0", NVME)]))
    assert pod.start(m, "c1", 100) == 0
    pod.end_process(100)
    pod.fs.remove_device("0000:00:05.0")  # this time the device is not in the guest
    with pytest.raises(HookError, match="not found in the guest"):
        pod.start(m, "c1", 101)
    assert os.listdir(pod.rootfs("c1") / "run/kata-vfio") == []


def test_no_manifest_writes_no_files(pod: Pod) -> None:
    assert pod.run(None) == 0
    assert not (pod.bundle / "rootfs/run").exists()


# --- the host half: the resource name in the manifest ----------------------------------


def test_resource_names_from_annotations_reach_the_hooks_files(
    vfio_host: FakeSysfs, pod: Pod
) -> None:
    """A device plugin's io.kata-vfio.resource.<name> annotation asks for its devices and
    names them; the wrapper's manifest carries the name to the hook's env file."""
    spec: dict[str, Any] = {
        "annotations": {
            "io.kata-vfio.devices": "0000:03:00.0",
            "io.kata-vfio.resource.nic": "0000:04:00.0,0000:04:01.0",
        }
    }  # asked for by it alone
    plan = plan_edit(spec, Settings(sysfs=str(vfio_host.root)))
    assert plan is not None
    text = plan.annotations[MANIFEST_ANNOTATION]
    named = {str(d.host_address): d.resource for d in Manifest.from_json(text).devices}
    assert named == {"0000:03:00.0": None, "0000:04:00.0": NIC, "0000:04:01.0": NIC}
    assert pod.start(text, "c1", 100) == 0
    assert pod.files("c1")[1] == (
        "PCIDEVICE_KATA_VFIO_IO_DEVICES=0000:00:02.0\n"
        "PCIDEVICE_KATA_VFIO_IO_NIC=0000:00:03.0,0000:00:04.0\n"
    )


def test_a_manifest_without_resources_is_what_it_was(vfio_host: FakeSysfs) -> None:
    """Backward compatible: no resource key unless one is named, and a manifest with one
    still version 1 (an older hook ignores keys it does not know)."""
    plan = plan_edit(
        {"annotations": {"io.kata-vfio.devices": "0000:03:00.0"}},
        Settings(sysfs=str(vfio_host.root)),
    )
    assert plan is not None
    raw = json.loads(plan.annotations[MANIFEST_ANNOTATION])
    assert raw["version"] == 1 and "resource" not in raw["groups"][0]["devices"][0]
    with_name = mdev("0000:03:00.0", resource=NIC).to_obj()
    assert with_name["resource"] == NIC
    assert set(with_name) - set(raw["groups"][0]["devices"][0]) == {"resource"}


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {"io.kata-vfio.resource.-nic": "0000:03:00.0"},
            "annotation io.kata-vfio.resource.-nic: '-nic' is not a resource name",
        ),
        ({"io.kata-vfio.resource.a/b": "0000:03:00.0"}, "'a/b' is not a resource name"),
        ({"io.kata-vfio.resource.nic": ""}, "annotation io.kata-vfio.resource.nic is empty"),
        ({"io.kata-vfio.resource.nic": "03:00"}, "03:00"),
        (
            {"io.kata-vfio.resource.a": "0000:03:00.0", "io.kata-vfio.resource.b": "0000:03:00.0"},
            "PCI device 0000:03:00.0 is named by two resources, kata-vfio.io/a and kata-vfio.io/b",
        ),
    ],
)
def test_bad_resource_annotations_are_refused(
    vfio_host: FakeSysfs, annotations: dict[str, str], message: str
) -> None:
    with pytest.raises(DeviceError, match=re.escape(message)):
        plan_edit({"annotations": annotations}, Settings(sysfs=str(vfio_host.root)))


@pytest.mark.parametrize("forged", ["x\nLD_PRELOAD=/tmp/evil.so", "nic", "a/b/c", "", 7])
def test_a_forged_resource_in_the_manifest_is_refused(forged: object) -> None:
    """The env file is one KEY=VALUE a line: a resource name is checked where the manifest
    is read, so nothing but a name ever reaches it."""
    obj = json.loads(manifest((7, [mdev("0000:81:00.0")])))
    obj["groups"][0]["devices"][0]["resource"] = forged
    with pytest.raises(SpecError, match="is not a resource name"):
        Manifest.from_json(json.dumps(obj))


@pytest.mark.parametrize(
    ("resource", "variable"),
    [
        ("kata-vfio.io/nvme", "PCIDEVICE_KATA_VFIO_IO_NVME"),
        ("intel.com/sriov_net-a.b", "PCIDEVICE_INTEL_COM_SRIOV_NET_A_B"),
        (None, "PCIDEVICE_KATA_VFIO_IO_DEVICES"),
    ],
)
def test_resource_names_are_mangled_as_device_plugins_do(
    resource: str | None, variable: str
) -> None:
    assert resource_env_name(resource) == variable
