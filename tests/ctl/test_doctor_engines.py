"""Issue 17: `doctor` on each engine a node has, and the IOMMU fix for its boot loader.

Engines are found in a fake root: podman 4.3 and Debian's containerd 1.6 are the real
programs (linked into the root, asked for their versions), CRI-O and the kubelet are their
configuration files and stand-in programs. What is asserted is what a user reads.
"""

from __future__ import annotations

import os
import shutil
import socket
import tomllib
from pathlib import Path

import pytest

from kata_vfio_ctl import engine_shim
from kata_vfio_ctl.checks import FAIL, OK, WARN, Check
from kata_vfio_ctl.containerd_conf import register_containerd
from kata_vfio_ctl.crio_conf import register_crio
from kata_vfio_ctl.doctor import (
    check_engines,
    check_iommu,
    check_memlock,
    render,
)
from kata_vfio_ctl.engine_shim import ShimRuntime
from kata_vfio_host.settings import Settings

NO_SKIPS = os.environ.get("KATA_VFIO_NO_SKIPS") == "1"
LONG_CMDLINE = (
    "BOOT_IMAGE=/boot/vmlinuz-6.1.0-57-amd64 root=UUID=0b9c3a7e-5f6d-4c1e-9d2a-"
    "7b1f3e0c4d5a ro quiet splash console=tty0 console=ttyS0,115200n8 "
    "systemd.unified_cgroup_hierarchy=1 " + "x" * 400
)
KATA3 = """\
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
machine_type = "q35"
enable_iommu = true
hot_plug_vfio = "{hot}"
cold_plug_vfio = "{cold}"
pcie_root_port = {ports}

[runtime]
vfio_mode = "guest-kernel"
"""


def real(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        if NO_SKIPS:
            pytest.fail(f"{program} is not installed (Debian package in APT_PACKAGES)")
        pytest.skip(f"no {program}")
    return found


def link_program(root: Path, program: str, target: str, where: str = "usr/bin") -> Path:
    path = root / where / program
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def stand_in(root: Path, program: str, where: str = "usr/bin") -> Path:
    path = root / where / program
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def kata_conf(path: Path, hot: str = "root-port", cold: str = "no-port", ports: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(KATA3.format(hot=hot, cold=cold, ports=ports))
    return path


# --- the IOMMU fix: the host's boot loader, only the parameters to add -------------------


def host(
    tmp_path: Path,
    *,
    vendor: str = "GenuineIntel",
    flags: str = "fpu vme sse4_2",
    cmdline: str = LONG_CMDLINE,
    dmi: str = "",
    tables: tuple[str, ...] = ("APIC",),
) -> tuple[Path, Path, Path]:
    root, sysfs, proc = tmp_path / "root", tmp_path / "sys", tmp_path / "proc"
    root.mkdir(parents=True)
    proc.mkdir()
    (proc / "cmdline").write_text(cmdline + "\n")
    (proc / "cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n")
    (sysfs / "firmware/acpi/tables").mkdir(parents=True)
    for table in tables:
        (sysfs / "firmware/acpi/tables" / table).write_bytes(b"\0" * 36)
    if dmi:
        (sysfs / "class/dmi/id").mkdir(parents=True)
        (sysfs / "class/dmi/id/sys_vendor").write_text(dmi + "\n")
        (sysfs / "class/dmi/id/product_name").write_text("Standard PC (Q35 + ICH9, 2009)\n")
    return root, sysfs, proc


def test_iommu_fix_on_a_grub_host_names_the_file_the_command_and_only_what_to_add(
    tmp_path: Path,
) -> None:
    root, sysfs, proc = host(tmp_path)
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/grub").write_text('GRUB_CMDLINE_LINUX=""\n')
    check = check_iommu(sysfs, proc, root)
    assert check.status == FAIL
    assert "GRUB detected" in check.fix and "/etc/default/grub" in check.fix
    assert "update-grub" in check.fix and "add intel_iommu=on iommu=pt to" in check.fix
    # the old fix quoted ~600 characters of the running command line
    assert "quiet" not in check.detail + check.fix and "xxxx" not in check.detail + check.fix
    assert len(check.detail) + len(check.fix) < 400


def test_iommu_fix_on_a_systemd_boot_host_adds_only_what_is_missing(tmp_path: Path) -> None:
    root, sysfs, proc = host(tmp_path, vendor="AuthenticAMD", cmdline="root=/dev/sda1 iommu=pt")
    (root / "etc/kernel").mkdir(parents=True)
    (root / "etc/kernel/cmdline").write_text("root=/dev/sda1 iommu=pt\n")
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/grub").write_text("")  # kernel-install's file says what boots
    check = check_iommu(sysfs, proc, root)
    assert "systemd-boot / kernel-install detected" in check.fix
    assert "add amd_iommu=on to /etc/kernel/cmdline" in check.fix
    assert "kernel-install add" in check.fix and "iommu=pt" not in check.fix
    assert "lacks amd_iommu=on)" in check.detail


def test_iommu_on_a_vm_without_a_viommu_says_its_hypervisor_must_give_one(tmp_path: Path) -> None:
    root, sysfs, proc = host(tmp_path, flags="fpu sse4_2 hypervisor", dmi="QEMU")
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/grub").write_text("")
    check = check_iommu(sysfs, proc, root)
    assert check.status == FAIL
    assert (
        "this host is a virtual machine (DMI says 'QEMU Standard PC (Q35 + ICH9, 2009)')"
        in check.detail
        and "no DMAR or IVRS ACPI table" in check.detail
    )
    assert check.fix.startswith("the VM's hypervisor must give it one")
    assert "intel-iommu" in check.fix and "GRUB" not in check.fix
    # only the cpuinfo flag (no DMI): still a VM
    root2, sysfs2, proc2 = host(tmp_path / "2", flags="fpu hypervisor")
    assert "the CPU flags include 'hypervisor'" in check_iommu(sysfs2, proc2, root2).detail
    # a VM that has a vIOMMU (its DMAR table) is told to boot with the parameters
    root3, sysfs3, proc3 = host(tmp_path / "3", flags="fpu hypervisor", tables=("DMAR",))
    (root3 / "etc/default").mkdir(parents=True)
    (root3 / "etc/default/grub").write_text("")
    vm_with = check_iommu(sysfs3, proc3, root3)
    assert "virtual machine" not in vm_with.detail and "GRUB detected" in vm_with.fix


# --- memlock: one story --------------------------------------------------------------------


def test_memlock_says_what_vfio_containers_get_not_the_shells_limit() -> None:
    """The memlock line said 'RLIMIT_MEMLOCK 8192 KiB ... need --cap-add IPC_LOCK' and the
    dpdk line under it 'VFIO containers get RLIMIT_MEMLOCK unlimited'."""
    on = check_memlock(Settings())
    assert on.status == OK and "VFIO containers get RLIMIT_MEMLOCK unlimited" in on.detail
    assert "KiB" not in on.detail and not on.fix
    off = check_memlock(Settings(raise_memlock=False))
    assert off.status == WARN and "raise_memlock = false" in off.detail


# --- podman --------------------------------------------------------------------------------


def test_podman_with_kata3_is_told_it_cannot_work_not_that_it_is_unregistered(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    link_program(root, "podman", real("podman"))
    conf = root / "etc/containers/containers.conf"
    kata = kata_conf(tmp_path / "kata/configuration.toml")
    checks = by_name(check_engines(root, conf, kata, Settings(), "3.30"))
    podman = checks["podman"]
    assert podman.status == WARN
    assert (
        "podman (podman version 4.3.1) cannot run Kata containers with Kata 3.30" in podman.detail
        and "needs Kata 1.x" in podman.detail
    )
    assert "not registered" not in podman.detail
    assert "containerd or CRI-O" in podman.fix
    # Kata 1.x: the registration is what matters
    checks = by_name(check_engines(root, conf, kata, Settings(), "1.13"))
    assert checks["podman"].status == FAIL
    assert f"kata-vfio is not registered in {conf}" in checks["podman"].detail


# --- containerd ----------------------------------------------------------------------------


@pytest.fixture
def shim(tmp_path: Path) -> str:
    path = tmp_path / "kv/bin" / engine_shim.SHIM_BINARY
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def containerd_node(tmp_path: Path, shim: str, kata: Path) -> Path:
    root = tmp_path / "root"
    link_program(root, "containerd", real("containerd"))
    stand_in(root, "containerd-shim-kata-v2", "opt/kata/bin")
    register_containerd(
        root / "etc/containerd/config.toml", ShimRuntime(shim, str(kata)), version=2
    )
    return root


def test_doctor_on_a_containerd_node_checks_containerd_not_podman(
    tmp_path: Path, shim: str
) -> None:
    kata = kata_conf(tmp_path / "kata/configuration-kata-vfio.toml")
    root = containerd_node(tmp_path, shim, kata)
    checks = check_engines(root, root / "etc/containers/containers.conf", None, Settings(), "3.30")
    found = by_name(checks)
    assert "podman" not in found  # "podman not registered" failed containerd nodes
    assert found["containerd"].status == OK
    assert found["containerd"].detail.startswith(
        "containerd 1.6: kata-vfio (io.containerd.kata-vfio.v2) in "
    )
    # Debian's containerd 1.6 ignores runtime_path: the shim must be on its PATH
    assert found["containerd:shim"].status == FAIL
    assert "containerd 1.6 ignores runtime_path" in found["containerd:shim"].detail
    assert f"ln -s {shim} /usr/local/bin/{engine_shim.SHIM_BINARY}" == found["containerd:shim"].fix
    link_program(root, engine_shim.SHIM_BINARY, shim, "usr/local/bin")
    assert (
        by_name(check_engines(root, root / "none", None, Settings(), "3.30"))[
            "containerd:shim"
        ].status
        == OK
    )
    assert found["containerd:kata"].status == OK and "Kata 3.30" in found["containerd:kata"].detail
    assert found["containerd:plug"].status == OK
    assert str(kata) in found["containerd:plug"].detail


@pytest.mark.parametrize(
    ("hot", "cold", "ports", "status", "says"),
    [
        ("no-port", "no-port", 2, FAIL, "port is not set for device"),
        ("root-port", "root-port", 2, FAIL, "both set, and Kata takes only one"),
        ("root-port", "no-port", 0, FAIL, "root-port but pcie_root_port = 0"),
        ("switch-port", "no-port", 2, FAIL, "switch-port but pcie_switch_port = 0"),
        ("no-port", "root-port", 2, WARN, "No PCI mapping found for container"),
    ],
)
def test_plug_ports_are_checked_in_the_file_containerds_shim_reads(
    tmp_path: Path, shim: str, hot: str, cold: str, ports: int, status: str, says: str
) -> None:
    """kata#9014: the setting went into another file than the one the shim loads."""
    named = kata_conf(tmp_path / "kata/configuration-kata-vfio.toml", hot, cold, ports)
    other = kata_conf(tmp_path / "etc/kata-containers/configuration.toml")  # all fine
    root = containerd_node(tmp_path, shim, named)
    plug = by_name(check_engines(root, root / "none", other, Settings(), "3.30"))["containerd:plug"]
    assert plug.status == status and says in plug.detail
    assert plug.detail.startswith(f"{named} (named by the kata-vfio runtime): ")


def test_containerd_register_says_the_shim_must_be_on_path_for_containerd_16(
    tmp_path: Path, shim: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kata_vfio_ctl.main import main as ctl

    real("containerd")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    conf = tmp_path / "config.toml"
    assert ctl(["containerd-register", "--conf", str(conf), "--shim-path", shim]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("restart containerd to use it")
    assert out[1] == (
        f"containerd 1.6 ignores runtime_path: {engine_shim.SHIM_BINARY} must be on "
        f"containerd's PATH (e.g. ln -s {shim} /usr/local/bin/"
        f"{engine_shim.SHIM_BINARY})"
    )
    # once it is there, nothing more to say
    monkeypatch.setenv("PATH", f"{Path(shim).parent}:/usr/bin:/bin")
    assert ctl(["containerd-register", "--conf", str(conf), "--shim-path", shim]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


# --- CRI-O ---------------------------------------------------------------------------------


def test_doctor_on_a_crio_node(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stand_in(root, "crio")
    stand_in(root, "containerd-shim-kata-v2")
    shim = stand_in(tmp_path, engine_shim.SHIM_BINARY, "kv/bin")
    kata = kata_conf(tmp_path / "kata/configuration-kata-vfio.toml", ports=0)
    (root / "etc/crio").mkdir(parents=True)
    (root / "etc/crio/crio.conf").write_text('[crio.runtime]\ndefault_runtime = "runc"\n')
    dropin = root / "etc/crio/crio.conf.d/50-kata-vfio.conf"
    none = root / "etc/containers/containers.conf"
    checks = by_name(check_engines(root, none, None, Settings(), "3.30"))
    assert "podman" not in checks and "containerd" not in checks
    assert checks["cri-o"].status == FAIL
    assert checks["cri-o"].fix == "kata-vfio-ctl crio-register, then restart CRI-O"
    register_crio(dropin, ShimRuntime(str(shim), str(kata)))
    checks = by_name(check_engines(root, none, None, Settings(), "3.30"))
    assert checks["cri-o"].status == OK and str(dropin) in checks["cri-o"].detail
    assert checks["cri-o:shim"].status == OK and "cri-o:annotations" not in checks
    assert (
        checks["cri-o:plug"].status == FAIL
        and "root-port but pcie_root_port = 0" in checks["cri-o:plug"].detail
    )
    # a drop-in of the old crio-register, listing our keys CRI-O refuses there
    text = dropin.read_text() + 'allowed_annotations = ["io.kata-vfio.devices"]\n'
    dropin.write_text(text)
    bad = by_name(check_engines(root, none, None, Settings(), "3.30"))["cri-o:annotations"]
    assert bad.status == FAIL and "invalid allowed_annotation" in bad.detail
    assert tomllib.loads(text)  # the file itself is valid TOML: only CRI-O refuses it


# --- the kubelet and the device plugin ------------------------------------------------------


def test_doctor_on_a_kubelet_node_checks_the_device_plugins_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    stand_in(root, "kubelet")
    plugins = root / "var/lib/kubelet/device-plugins"
    plugins.mkdir(parents=True)
    settings = Settings(device_plugin_resources=({"name": "nvme", "select": "1b36:0010"},))
    checks = by_name(check_engines(root, root / "none", None, settings, "3.30"))
    assert (
        checks["kubelet"].status == WARN and "is the kubelet running?" in checks["kubelet"].detail
    )
    plugin = checks["kubelet:device-plugin"]
    assert plugin.status == FAIL
    assert plugin.detail == (
        f"config.toml offers kata-vfio.io/nvme, but kata-vfio-nvme.sock is "
        f"not in {plugins}: the device plugin is not running"
    )
    with socket.socket(socket.AF_UNIX) as kubelet, socket.socket(socket.AF_UNIX) as ours:
        monkeypatch.chdir(plugins)  # a socket's path has a 108-byte limit
        kubelet.bind("kubelet.sock")
        ours.bind("kata-vfio-nvme.sock")
        checks = by_name(check_engines(root, root / "none", None, settings, "3.30"))
    assert checks["kubelet"].status == OK
    assert checks["kubelet:device-plugin"].status == OK
    assert "serving kata-vfio.io/nvme" in checks["kubelet:device-plugin"].detail
    assert "[ok  ] kubelet:device-plugin: serving kata-vfio.io/nvme" in render(
        list(checks.values())
    )


# --- install -------------------------------------------------------------------------------


def test_install_does_not_register_podman_for_kata3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kata_vfio_ctl.main import main as ctl

    config = tmp_path / "kv.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    kata = kata_conf(tmp_path / "kata/configuration.toml")
    podman = tmp_path / "containers.conf"
    assert (
        ctl(
            [
                "install",
                "--kata-config",
                str(kata),
                "--kata-version",
                "3.30",
                "--conf",
                str(podman),
                "--runtime-path",
                "/usr/bin/kata-vfio",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert not podman.exists()
    assert (
        f"{podman}: podman not registered: Kata 3.30 (--kata-version) has no OCI command "
        "line for podman (only Kata 1.x does); use --containerd or --crio"
    ) in out


def test_kata1_shim_under_containerd_is_told_it_ignores_config_path(
    tmp_path: Path, shim: str
) -> None:
    named = kata_conf(tmp_path / "kata/configuration-kata-vfio.toml")
    root = containerd_node(tmp_path, shim, named)
    etc = root / "etc/kata-containers/configuration.toml"
    etc.parent.mkdir(parents=True)
    etc.write_text(
        "[hypervisor.qemu]\nhotplug_vfio_on_root_bus = false\npcie_root_port = 0\n[proxy.kata]\n"
    )
    found = by_name(check_engines(root, root / "none", None, Settings(), "1.13"))
    assert found["containerd:kata-config"].status == FAIL
    assert found["containerd:kata-config"].detail == (
        f"Kata 1.13 (--kata-version)'s shim ignores ConfigPath = '{named}': it reads only "
        "/etc/kata-containers/configuration.toml or "
        "/usr/share/defaults/kata-containers/configuration.toml"
    )
    # the plug ports are read where that shim reads them
    plug = found["containerd:plug"]
    assert plug.detail.startswith(
        f"{etc} (what Kata 1.x's shim reads): hotplug_vfio_on_root_bus = False"
    )
    assert plug.status == WARN and "kata#2899" in plug.detail


def test_podman_unregistered_beside_a_registered_containerd_does_not_fail_the_node(
    tmp_path: Path, shim: str
) -> None:
    kata = kata_conf(tmp_path / "kata/configuration-kata-vfio.toml")
    root = containerd_node(tmp_path, shim, kata)
    link_program(root, "podman", real("podman"))
    found = by_name(
        check_engines(root, root / "etc/containers/containers.conf", None, Settings(), "1.13")
    )
    assert found["containerd"].status == OK
    assert found["podman"].status == WARN
    assert found["podman"].detail.endswith("(kata-vfio is registered with containerd)")
