"""Binds that survive a reboot (issue 17): bind --persist, vfs --persist, kata-vfio-ctl
boot, and what restore says after a reboot, on a fake host whose "reboot" does what a
kernel's does: a new boot id, every SR-IOV VF gone (autoprobe back on), every device
back on its native driver, no override."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kata_vfio_ctl.base
from kata_vfio.pci import PciAddress
from kata_vfio_ctl.main import main as ctl
from kata_vfio_host.bindings import acquire
from kata_vfio_host.ledger import ContainerId, Host, read_journal, read_journal_file

from fakesys import NVME, FakeKernel, FakeSysfs

PROG = "kata-vfio-ctl: "
NIC = "0000:08:00.0"
PF = "0000:0b:00.0"  # an SR-IOV PF: its VFs are 0000:0c:00.N, in groups 50 + N
VF0, VF1, VF2 = "0000:0c:00.0", "0000:0c:00.1", "0000:0c:00.2"


class Machine:
    """A fake host that can reboot: kata-vfio-ctl in-process on it."""

    def __init__(self, fs: FakeSysfs, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fs = fs
        self.kernel = FakeKernel(fs)
        self.state = state
        self.boot = 1
        self.host = self._host()
        monkeypatch.setattr(kata_vfio_ctl.base, "_host", lambda args: self.host)

    def _host(self) -> Host:
        return Host(self.fs.root, self.state, self.kernel.write, boot_id=f"boot-{self.boot}")

    def reboot(self) -> None:
        for pf in self.fs.sriov:
            self.kernel.write(self.fs.dev_dir(pf) / "sriov_numvfs", "0")
            (self.fs.dev_dir(pf) / "sriov_drivers_autoprobe").write_text("1\n")
        for addr, native in self.fs.native.items():
            if not self.fs.dev_dir(addr).is_dir():
                continue  # a VF the reboot removed
            if self.fs.driver(addr) != native:
                self.fs.set_driver(addr, native)
            (self.fs.dev_dir(addr) / "driver_override").write_text("(null)\n")
        self.boot += 1
        self.host = self._host()
        self.kernel.writes.clear()


@pytest.fixture
def machine(vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Machine:
    config = tmp_path / "kv.toml"
    config.write_text(
        f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'log_file = "{tmp_path / "log"}"\n'
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    monkeypatch.setenv("KATA_VFIO_PERSIST", str(tmp_path / "etc/persistent-binds"))
    vfio_host.add_device(NIC, group=40, driver="e1000e")
    vfio_host.add_device("0000:09:00.0", NVME, group=41, driver="nvme")
    vfio_host.add_device("0000:0a:00.0", NVME, group=42, driver="nvme")
    vfio_host.add_device(PF, NVME, group=43, driver="nvme")
    vfio_host.add_sriov_pf(PF, total=4, vf_ids=NVME, group_base=50)
    return Machine(vfio_host, tmp_path / "state", monkeypatch)


def claim(machine: Machine, cid: str, addr: str, tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / cid
    bundle.mkdir(parents=True)
    acquire(machine.host, ContainerId(cid), [], [PciAddress.parse(addr)], ("*",), str(bundle))


def test_boot_binds_the_persistent_device_again_and_clears_the_old_claims(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["bind", "--persist", "--timeout", "0", NIC]) == 0, capsys.readouterr().err
    assert f"{NIC}: bound again at every boot" in capsys.readouterr().out
    claim(machine, "ctr-a", "0000:09:00.0", tmp_path)
    claim(machine, "ctr-b", "0000:0a:00.0", tmp_path)
    machine.reboot()
    assert machine.fs.driver(NIC) == "e1000e"
    assert ctl(["boot", "--timeout", "0"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert machine.fs.driver(NIC) == "vfio-pci"
    assert "cleared the claims of containers ctr-a, ctr-b from the previous boot" in out
    assert f"re-bound {NIC} (8086:10d3, persistent): {NIC} (e1000e) -> vfio-pci" in out
    assert "given back" not in out
    assert (
        "0000:09:00.0: the previous boot's bind by container ctr-a ended with the reboot "
        "(now on nvme): its record dropped, the device not touched"
    ) in out
    assert read_journal_file(machine.host).claims == {}
    assert machine.fs.driver("0000:09:00.0") == "nvme"  # untouched: the reboot did it
    assert read_journal(machine.host)[NIC]["boot_id"] == "boot-2"
    assert not any(n for n in os.listdir(machine.state / "containers"))


def test_restore_after_a_reboot_without_the_boot_command_gives_nothing_back(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix `restore --all` wrote driver_override and said "given back" for a
    device the reboot had given back already."""
    assert ctl(["bind", "--timeout", "0", "0000:09:00.0"]) == 0
    machine.reboot()
    capsys.readouterr()
    assert ctl(["restore", "--all"]) == 0
    out = capsys.readouterr().out
    assert "given back" not in out
    assert (
        "0000:09:00.0: bound by kata-vfio-ctl in an earlier boot, a bind the reboot "
        "ended (now on nvme): its record dropped, the device not touched"
    ) in out
    assert machine.kernel.writes == []
    assert read_journal(machine.host) == {}


def test_bind_after_a_reboot_records_the_driver_of_this_boot(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier boot's record is not kept over a new bind: it would make the new
    bind look like history to the next restore, which then would not give it back."""
    assert ctl(["bind", "--timeout", "0", "0000:09:00.0"]) == 0
    machine.reboot()
    assert ctl(["bind", "--timeout", "0", "0000:09:00.0"]) == 0
    assert read_journal(machine.host)["0000:09:00.0"]["boot_id"] == "boot-2"
    assert ctl(["restore", "0000:09:00.0"]) == 0
    assert "0000:09:00.0: given back" in capsys.readouterr().out
    assert machine.fs.driver("0000:09:00.0") == "nvme"


def test_restore_removes_the_persistence_and_says_so(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["bind", "--persist", "--timeout", "0", NIC, "0000:09:00.0"]) == 0
    capsys.readouterr()
    assert ctl(["restore", NIC]) == 0
    out = capsys.readouterr().out
    assert f"{NIC}: given back" in out and f"{NIC}: no longer bound at boot" in out
    machine.reboot()
    assert ctl(["boot", "--timeout", "0"]) == 0
    assert machine.fs.driver(NIC) == "e1000e"
    assert machine.fs.driver("0000:09:00.0") == "vfio-pci"


def test_boot_refuses_a_device_whose_ids_changed_and_binds_the_rest(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["bind", "--persist", "--timeout", "0", NIC, "0000:09:00.0"]) == 0
    machine.reboot()
    (machine.fs.dev_dir(NIC) / "device").write_text("0x10d4\n")  # another card there
    capsys.readouterr()
    assert ctl(["boot", "--timeout", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{NIC} is now 8086:10d4, not 8086:10d3" in err[0]
    assert machine.fs.driver(NIC) == "e1000e"
    assert machine.fs.driver("0000:09:00.0") == "vfio-pci"


def test_boot_without_a_boot_id_is_refused(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["bind", "--persist", "--timeout", "0", NIC]) == 0
    machine.reboot()
    machine.host = Host(machine.fs.root, machine.state, machine.kernel.write, boot_id="unknown")
    capsys.readouterr()
    assert ctl(["boot"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read this boot's id" in err[0]
    assert machine.kernel.writes == [] and machine.fs.driver(NIC) == "e1000e"


BAD_FILES = [
    ("0000:08:00.0\n", "line 1: '0000:08:00.0' is not an address and its IDs"),
    ("# c\n08:00.0 8086:10d3\n", "line 2: '08:00.0' is not a PCI address in the form"),
    ("0000:08:00.0 8086:10D3\n", "line 1: '8086:10D3' is not VVVV:DDDD"),
    ("0000:08:00.0 8086:10d3\n0000:08:00.0 8086:10d3\n", "line 2: 0000:08:00.0 is listed twice"),
    (b"0000:08:00.0 8086:10d3 \xff\n", "holds bytes that are not ASCII"),
    ("directory", "is not a regular file"),
    ("fifo", "is not a regular file"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
@pytest.mark.parametrize(
    "argv",
    [
        ["boot"],
        ["bind", "--persist", "0000:0a:00.0"],
        ["restore", "0000:09:00.0"],
        ["restore", "--all"],
    ],
)
def test_a_bad_persist_file_is_one_line_and_changes_nothing(
    machine: Machine,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes,
    message: str,
    argv: list[str],
) -> None:
    assert ctl(["bind", "--timeout", "0", "0000:09:00.0"]) == 0
    claim(machine, "ctr-a", "0000:0a:00.0", tmp_path) if argv[0] != "bind" else None
    machine.reboot() if argv == ["boot"] else None
    path = tmp_path / "etc/persistent-binds"
    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "directory":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    journal = read_journal_file(machine.host)
    drivers = {a: machine.fs.driver(a) for a in machine.fs.native}
    machine.kernel.writes.clear()
    capsys.readouterr()
    assert ctl(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PROG) and message in err[0], err
    assert str(path) in err[0]
    assert machine.kernel.writes == []
    assert {a: machine.fs.driver(a) for a in machine.fs.native} == drivers
    after = read_journal_file(machine.host)
    assert (after.claims, after.devices) == (journal.claims, journal.devices)
    if content not in ("directory", "fifo"):
        assert path.read_bytes() == (content.encode() if isinstance(content, str) else content)


def test_the_boot_unit_runs_the_boot_command_before_the_engines() -> None:
    import configparser
    import shlex

    from kata_vfio_ctl.parser import build_parser

    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.read(Path(__file__).resolve().parents[2] / "systemd/kata-vfio-boot.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    # make install puts its PREFIX/bin in place of @BINDIR@ (tests/project/test_install.py)
    assert argv[0] == "@BINDIR@/kata-vfio-ctl" and unit["Service"]["Type"] == "oneshot"
    build_parser().parse_args(argv[1:])  # a command kata-vfio-ctl has (SystemExit if not)
    before = unit["Unit"]["Before"].split()
    for engine in ("containerd", "crio", "kubelet", "podman"):
        assert f"{engine}.service" in before
    assert "systemd-modules-load.service" in unit["Unit"]["After"].split()


def test_devices_after_a_reboot_names_no_binder_and_shows_persistence(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix `devices` said "bound by kata-vfio-ctl" for a device the reboot had
    put back on its driver."""
    import json

    assert ctl(["bind", "--timeout", "0", "0000:09:00.0"]) == 0
    assert ctl(["bind", "--persist", "--timeout", "0", NIC]) == 0
    machine.reboot()
    capsys.readouterr()
    assert ctl(["devices", "--json", "0000:09:00.0", NIC]) == 0
    records = {r["address"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["0000:09:00.0"]["bound_by"] is None
    assert records["0000:09:00.0"]["persistent"] is False
    assert records[NIC]["persistent"] is True and records[NIC]["bound_by"] is None
    assert ctl(["devices", NIC]) == 0
    table = capsys.readouterr().out
    assert "bound again at every boot (bind --persist)" in table and "bound by" not in table


# -- VF counts that survive a reboot, and the device plugin's records (issue 17) -------


def persist_file(tmp_path: Path) -> str:
    path = tmp_path / "etc/persistent-binds"
    return path.read_text() if path.exists() else ""


def numvfs(machine: Machine) -> int:
    return int((machine.fs.dev_dir(PF) / "sriov_numvfs").read_text())


def test_boot_makes_the_persistent_vfs_again_then_binds_the_persistent_vf(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix `vfs` had no --persist and the PF had no VFs after a reboot: a
    persistent bind of a VF found nothing at boot."""
    assert ctl(["vfs", PF, "2", "--persist"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{PF}: 2 VFs made again at every boot" in out
    assert ctl(["bind", "--persist", "--timeout", "0", VF1]) == 0, capsys.readouterr().err
    assert f"{PF} 1b36:0010 vfs=2\n" in persist_file(tmp_path)
    machine.reboot()
    assert numvfs(machine) == 0 and not machine.fs.dev_dir(VF1).exists()
    capsys.readouterr()
    assert ctl(["boot", "--timeout", "0"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert numvfs(machine) == 2
    assert machine.fs.driver(VF1) == "vfio-pci" and machine.fs.driver(VF0) is None
    assert ctl(["devices", PF]) == 0
    assert "2 VFs made again at every boot (vfs --persist)" in capsys.readouterr().out
    assert (machine.fs.dev_dir(PF) / "sriov_drivers_autoprobe").read_text() == "0"
    lines = out.splitlines()
    made = lines.index(f"made 2 VFs of {PF} (1b36:0010, persistent) again: {VF0}, {VF1}")
    rebound = next(
        i
        for i, line in enumerate(lines)
        if line.startswith(f"re-bound {VF1} (1b36:0010, persistent): {VF1} (no driver) -> vfio-pci")
    )
    assert made < rebound  # the VFs first, then the binds
    # run again: nothing made, nothing moved, and it says so
    assert ctl(["boot", "--timeout", "0"]) == 0
    again = capsys.readouterr().out
    assert f"{PF} (1b36:0010, persistent): already has 2 VFs ({VF0}, {VF1}), nothing made" in again
    assert f"{VF1} (1b36:0010, persistent): already on vfio-pci" in again


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_persistent_bind_of_a_vf_whose_count_is_not_persistent_is_refused(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str], dry_run: bool
) -> None:
    """Before the fix the bind was made persistent, and after a reboot it bound nothing."""
    assert ctl(["vfs", PF, "2"]) == 0
    machine.kernel.writes.clear()
    capsys.readouterr()
    assert (
        ctl(["bind", "--persist", "--timeout", "0", VF0] + (["--dry-run"] if dry_run else [])) == 1
    )
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PROG), err
    assert f"{VF0} is a VF of {PF}, whose VF count is not persistent" in err[0]
    assert f"kata-vfio-ctl vfs {PF} 2 --persist" in err[0]
    assert "moving" not in captured.out and "would" not in captured.out
    assert machine.fs.driver(VF0) is None and machine.kernel.writes == []
    assert VF0 not in persist_file(tmp_path)


def test_vfs_to_zero_drops_the_count_and_the_binds_of_its_vfs(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["vfs", PF, "2", "--persist"]) == 0
    assert ctl(["bind", "--persist", "--timeout", "0", VF1]) == 0
    capsys.readouterr()
    assert ctl(["vfs", PF, "0"]) == 1  # kata-vfio bound VF1: refused, records kept
    assert f"kata-vfio bound {VF1}" in capsys.readouterr().err
    assert f"{PF} 1b36:0010 vfs=2" in persist_file(tmp_path) and VF1 in persist_file(tmp_path)
    assert ctl(["vfs", PF, "0", "--force"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{VF1}: no longer bound at boot (its VF went" in out
    assert f"{PF}: its VFs are no longer made at boot" in out
    assert PF not in persist_file(tmp_path) and VF1 not in persist_file(tmp_path)
    machine.reboot()
    assert ctl(["boot", "--timeout", "0"]) == 0
    assert capsys.readouterr().out.startswith("nothing to do")
    assert numvfs(machine) == 0


def test_resizing_a_persistent_count_keeps_it_persistent_at_the_new_count(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["vfs", PF, "2", "--persist"]) == 0
    capsys.readouterr()
    assert ctl(["vfs", PF, "3"]) == 0
    assert f"{PF}: 3 VFs made again at every boot" in capsys.readouterr().out
    assert f"{PF} 1b36:0010 vfs=3\n" in persist_file(tmp_path)
    machine.reboot()
    assert ctl(["boot", "--timeout", "0"]) == 0
    assert f"made 3 VFs of {PF}" in capsys.readouterr().out
    assert numvfs(machine) == 3 and machine.fs.dev_dir(VF2).is_dir()


def test_no_persist_is_refused_while_a_persistent_vf_bind_needs_the_count(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["vfs", PF, "2", "--persist"]) == 0
    assert ctl(["bind", "--persist", "--timeout", "0", VF0]) == 0
    before = persist_file(tmp_path)
    capsys.readouterr()
    assert ctl(["vfs", PF, "2", "--no-persist"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"the persistent binds of {VF0} need the VF count of {PF}" in err[0]
        and f"kata-vfio-ctl restore {VF0}" in err[0]
    )
    assert persist_file(tmp_path) == before and machine.fs.driver(VF0) == "vfio-pci"
    assert ctl(["restore", VF0]) == 0
    assert ctl(["vfs", PF, "2", "--no-persist"]) == 0
    assert f"{PF}: its VFs are no longer made at boot" in capsys.readouterr().out
    assert PF not in persist_file(tmp_path) and numvfs(machine) == 2
    machine.reboot()
    assert ctl(["boot", "--timeout", "0"]) == 0 and numvfs(machine) == 0


@pytest.mark.parametrize("change", ["gone", "other card", "other count"])
def test_boot_says_which_vfs_it_could_not_make_and_does_the_rest(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    assert ctl(["vfs", PF, "2", "--persist"]) == 0
    assert ctl(["bind", "--persist", "--timeout", "0", VF0, NIC]) == 0
    machine.reboot()
    if change == "gone":
        machine.fs.remove_device(PF)
    elif change == "other card":
        (machine.fs.dev_dir(PF) / "device").write_text("0x0011\n")
    else:  # something else gave the PF VFs first
        machine.kernel.write(machine.fs.dev_dir(PF) / "sriov_numvfs", "1")
    capsys.readouterr()
    assert ctl(["boot", "--timeout", "0"]) == 1
    captured = capsys.readouterr()
    assert f"re-bound {NIC} (8086:10d3, persistent)" in captured.out  # the rest is done
    assert machine.fs.driver(NIC) == "vfio-pci"
    err = captured.err.strip().splitlines()
    assert all(line.startswith(PROG) for line in err), err
    reason = {
        "gone": f"{PF} is not on this host now: its 2 VFs not made",
        "other card": f"{PF} is now 1b36:0011, not 1b36:0010 as when its VF count "
        "was persisted: no VFs made",
        "other count": f"{PF} has 1 VFs now, not 2 as persisted: left alone",
    }[change]
    assert f"cannot make the VFs of {PF} (1b36:0010, 2 VFs, persistent): {reason}" in err[0]
    if change == "other count":  # VF0 exists (the other VF count made it): bound
        assert len(err) == 1 and machine.fs.driver(VF0) == "vfio-pci"
        return
    assert len(err) == 2 and err[1].startswith(
        f"{PROG}cannot bind {VF0} (1b36:0010, persistent): {VF0} is not on this host now"
    )
    assert f"a VF of {PF}, whose VFs were not made?" in err[1]
    if change == "gone":  # the record of a PF that is not there can still be dropped
        assert ctl(["vfs", PF, "0"]) == 0
        assert (
            f"{PF}: not on this host; its VFs are no longer made at boot" in capsys.readouterr().out
        )
        assert f"{PF} " not in persist_file(tmp_path)


def test_boot_drops_the_device_plugins_allocations_of_the_previous_boot(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the fix `boot` cleared the allocation's ledger claim as a container's and
    left its record: the restarted plugin "recovered" an allocation of the previous boot."""
    import json

    from kata_vfio.pci import IommuGroup
    from kata_vfio_ctl import plugin_ledger

    def allocate(addr: str, group: int) -> str:
        return plugin_ledger.allocate(
            machine.host,
            "kata-vfio.io/nvme",
            [addr],
            [IommuGroup(group)],
            [PciAddress.parse(addr)],
            None,
        ).id

    old = allocate("0000:0a:00.0", 42)
    claim(machine, "ctr-a", "0000:09:00.0", tmp_path)
    records = machine.state / "device-plugin"
    legacy = records / "kubernetes-allocation-legacy.json"  # written before boot ids
    legacy.write_text(
        json.dumps(
            {
                "id": "kubernetes-allocation-legacy",
                "resource": "r",
                "device_ids": ["x"],
                "groups": [49],
                "since": 1.0,
            }
        )
    )
    machine.reboot()
    mine = allocate(NIC, 40)  # this boot's (the plugin ran before boot): kept
    capsys.readouterr()
    assert ctl(["boot", "--timeout", "0"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "cleared the claims of containers ctr-a from the previous boot" in out
    assert (
        f"cleared the device plugin's allocations {old} (kata-vfio.io/nvme), "
        "kubernetes-allocation-legacy (r) from the previous boot (no pod survives a "
        "reboot)"
    ) in out
    assert set(plugin_ledger.allocations(machine.host)) == {mine}
    assert sorted(os.listdir(records)) == [f"{mine}.json"]
    assert machine.fs.driver(NIC) == "vfio-pci"  # this boot's allocation untouched
