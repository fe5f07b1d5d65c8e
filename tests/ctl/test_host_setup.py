"""install / uninstall of the Kata settings, doctor, and the ctl command line."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from kata_vfio_ctl.checks import FAIL, OK
from kata_vfio_ctl.doctor import run_checks
from kata_vfio_ctl.kata_conf import check, install, uninstall
from kata_vfio_ctl.main import main as ctl

from fakesys import FakeSysfs

KATA = """\
# Kata Containers configuration (excerpt, shaped like the shipped file)
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/usr/share/kata-containers/vmlinux.container"
image = "/usr/share/kata-containers/kata-containers.img"
machine_type = "pc"
# comment kept
kernel_params = "systemd.unified_cgroup_hierarchy=1"
enable_annotations = ["enable_iommu"]
pcie_root_port = 0

[runtime]
internetworking_model = "tcfilter"
"""


def test_install_is_idempotent_and_uninstall_restores(tmp_path: Path) -> None:
    conf = tmp_path / "configuration.toml"
    conf.write_text(KATA)
    state = tmp_path / "state"
    assert not all(ok for _, ok, _ in check(conf, "/usr/share/oci/hooks", {}))
    changed = install(conf, state, "/usr/share/oci/hooks", {})
    assert set(changed) == {
        "machine_type",
        "enable_iommu",
        "hotplug_vfio_on_root_bus",
        "pcie_root_port",
        "guest_hook_path",
        "kernel_params",
        "enable_annotations",
    }
    assert all(ok for _, ok, _ in check(conf, "/usr/share/oci/hooks", {}))
    text = conf.read_text()
    assert "# comment kept" in text and 'internetworking_model = "tcfilter"' in text
    data = tomllib.loads(text)["hypervisor"]["qemu"]
    assert data["kernel_params"] == "systemd.unified_cgroup_hierarchy=1 intel_iommu=on iommu=pt"
    assert data["enable_annotations"] == ["enable_iommu", "guest_hook_path"]
    assert install(conf, state, "/usr/share/oci/hooks", {}) == []
    assert conf.read_text() == text
    uninstall(conf, state)
    assert tomllib.loads(conf.read_text()) == tomllib.loads(KATA)
    assert "# comment kept" in conf.read_text()


def fake_proc(tmp_path: Path, cmdline: str, interrupt: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "cmdline").write_text(cmdline + "\n")
    (proc / "interrupts").write_text(f"  24:  1  {interrupt} 512000-edge  eth0\n")
    (proc / "self/status").write_text("CapEff:\t000001ffffffffff\n")
    return proc


def test_doctor_on_a_host_without_iommu(fakesys: FakeSysfs, tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "BOOT_IMAGE=/vmlinuz root=/dev/sda1", "PCI-MSI")
    kata = tmp_path / "configuration.toml"
    kata.write_text(KATA)
    (tmp_path / "root").mkdir()
    checks = {
        c.name: c
        for c in run_checks(
            fakesys.root,
            proc,
            kata,
            tmp_path / "none.conf",
            "/usr/share/oci/hooks",
            {},
            root=tmp_path / "root",
        )
    }
    assert checks["iommu"].status == FAIL and "intel_iommu=on" in checks["iommu"].fix
    assert "root=/dev/sda1" not in checks["iommu"].fix  # only what to add (issue 17)
    assert checks["interrupt-remapping"].status == FAIL
    assert checks["kata:machine_type"].status == FAIL
    assert checks["kata:initrd"].status == FAIL
    assert checks["engines"].status == FAIL  # no podman, containerd, CRI-O or kubelet


def test_doctor_on_a_ready_host(vfio_host: FakeSysfs, tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "intel_iommu=on iommu=pt", "IR-PCI-MSI")
    vfio_host.add_driver("vfio-pci")
    checks = {
        c.name: c
        for c in run_checks(
            vfio_host.root, proc, None, tmp_path / "x", "/usr/share/oci/hooks", {}, root=tmp_path
        )
    }
    assert checks["iommu"].status == OK and checks["interrupt-remapping"].status == OK
    assert checks["vfio-modules"].status == OK
    assert checks["kata-config"].status == FAIL


@pytest.fixture
def ctl_env(vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "kv.toml"
    config.write_text(
        f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\nstate_dir = "{tmp_path / "state"}"\n'
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    return tmp_path


def test_devices_json_matches_sysfs(ctl_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(["devices", "--json"]) == 0
    records = {r["address"]: r for r in json.loads(capsys.readouterr().out)}
    nvme = records["0000:05:00.0"]
    assert (nvme["vendor"], nvme["device"], nvme["class"], nvme["driver"], nvme["iommu_group"]) == (
        "1b36",
        "0010",
        "010802",
        "nvme",
        14,
    )
    assert "NVM Express" in nvme["name"]  # from pci.ids
    assert records["0000:04:00.0"]["group_members"] == ["0000:00:1e.0", "0000:04:01.0"]
    assert records["0000:06:10.0"]["physfn"] == "0000:06:00.0"
    assert records["0000:06:00.0"]["virtfns"] == ["0000:06:10.0"]
    assert records["0000:07:00.0"]["iommu_group"] is None
    assert ctl(["devices", "--json", "-d", "1b36:0010", "0000:0*"]) == 0
    assert [r["address"] for r in json.loads(capsys.readouterr().out)] == ["0000:05:00.0"]
    assert ctl(["devices", "-d", ":*:0200", "--name", "Intel"]) == 0
    table = capsys.readouterr().out
    assert "0000:03:00.0" in table and "0000:05:00.0" not in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bind", "0000:09:00.0"], "no PCI device 0000:09:00.0 on this host"),
        (["bind", "../../etc"], "malformed PCI address '../../etc'"),
        (["bind", "0000:zz:00.0"], "malformed PCI address '0000:zz:00.0'"),
        (["bind", "0000:07:00.0"], "has no IOMMU group"),
        (["restore", "0000:05:00.0"], "0000:05:00.0: not bound by kata-vfio"),
        (["restore"], "give addresses, --all or --stale"),
        (["devices", "-d", "80x6:1"], "devices -d: '80x6:1': '80x6' is not a hex ID"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    ctl_env: Path,
    vfio_host: FakeSysfs,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    before = {p: p.read_text() for p in vfio_host.root.rglob("driver_override")}
    assert ctl(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kata-vfio-ctl: ") and message in err[0]
    assert {p: p.read_text() for p in vfio_host.root.rglob("driver_override")} == before


def test_doctor_says_what_dpdk_needs(tmp_path: Path) -> None:
    """Issue 8: memlock for DMA and two vCPUs for testpmd's two lcores."""
    from kata_vfio_ctl.checks import OK, WARN
    from kata_vfio_ctl.doctor import check_dpdk, check_memlock
    from kata_vfio_host.settings import Settings

    conf = tmp_path / "configuration.toml"
    conf.write_text("[hypervisor.qemu]\ndefault_vcpus = 1\n")
    one = check_dpdk(Settings(), conf)
    assert one.status == WARN and "--lcores 0@0,1@0" in one.detail
    off = check_memlock(Settings(raise_memlock=False))
    assert off.status == WARN and "--cap-add IPC_LOCK" in off.fix
    conf.write_text("[hypervisor.qemu]\ndefault_vcpus = 2\n")
    assert check_dpdk(Settings(), conf).status == OK
