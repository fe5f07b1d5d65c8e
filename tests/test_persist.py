"""Binds that survive a reboot (issue 17): bind --persist, kata-vfio-ctl boot, and what
restore says after a reboot, on a fake host whose "reboot" does what a kernel's does:
a new boot id, every device back on its native driver, no override."""

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
        for addr, native in self.fs.native.items():
            if self.fs.driver(addr) != native:
                self.fs.set_driver(addr, native)
            (self.fs.dev_dir(addr) / "driver_override").write_text("(null)\n")
        self.boot += 1
        self.host = self._host()
        self.kernel.writes.clear()


@pytest.fixture
def machine(vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Machine:
    config = tmp_path / "kv.toml"
    config.write_text(f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\n'
                      f'state_dir = "{tmp_path / "state"}"\n'
                      f'log_file = "{tmp_path / "log"}"\n')
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    monkeypatch.setenv("KATA_VFIO_PERSIST", str(tmp_path / "etc/persistent-binds"))
    vfio_host.add_device(NIC, group=40, driver="e1000e")
    vfio_host.add_device("0000:09:00.0", NVME, group=41, driver="nvme")
    vfio_host.add_device("0000:0a:00.0", NVME, group=42, driver="nvme")
    return Machine(vfio_host, tmp_path / "state", monkeypatch)


def claim(machine: Machine, cid: str, addr: str, tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / cid
    bundle.mkdir(parents=True)
    acquire(machine.host, ContainerId(cid), [], [PciAddress.parse(addr)], ("*",), str(bundle))


def test_boot_binds_the_persistent_device_again_and_clears_the_old_claims(
        machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert ("0000:09:00.0: the previous boot's bind by container ctr-a ended with the reboot "
            "(now on nvme): its record dropped, the device not touched") in out
    assert read_journal_file(machine.host).claims == {}
    assert machine.fs.driver("0000:09:00.0") == "nvme"  # untouched: the reboot did it
    assert read_journal(machine.host)[NIC]["boot_id"] == "boot-2"
    assert not any(n for n in os.listdir(machine.state / "containers"))


def test_restore_after_a_reboot_without_the_boot_command_gives_nothing_back(
        machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
    """Before the fix `restore --all` wrote driver_override and said "given back" for a
    device the reboot had given back already."""
    assert ctl(["bind", "--timeout", "0", "0000:09:00.0"]) == 0
    machine.reboot()
    capsys.readouterr()
    assert ctl(["restore", "--all"]) == 0
    out = capsys.readouterr().out
    assert "given back" not in out
    assert ("0000:09:00.0: bound by kata-vfio-ctl in an earlier boot, a bind the reboot "
            "ended (now on nvme): its record dropped, the device not touched") in out
    assert machine.kernel.writes == []
    assert read_journal(machine.host) == {}


def test_bind_after_a_reboot_records_the_driver_of_this_boot(
        machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
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
        machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
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
        machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(["bind", "--persist", "--timeout", "0", NIC, "0000:09:00.0"]) == 0
    machine.reboot()
    (machine.fs.dev_dir(NIC) / "device").write_text("0x10d4\n")  # another card there
    capsys.readouterr()
    assert ctl(["boot", "--timeout", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{NIC} is now 8086:10d4, not 8086:10d3" in err[0]
    assert machine.fs.driver(NIC) == "e1000e"
    assert machine.fs.driver("0000:09:00.0") == "vfio-pci"


def test_boot_without_a_boot_id_is_refused(machine: Machine,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(["bind", "--persist", "--timeout", "0", NIC]) == 0
    machine.reboot()
    machine.host = Host(machine.fs.root, machine.state, machine.kernel.write,
                        boot_id="unknown")
    capsys.readouterr()
    assert ctl(["boot"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read this boot's id" in err[0]
    assert machine.kernel.writes == [] and machine.fs.driver(NIC) == "e1000e"


BAD_FILES = [
    ("0000:08:00.0\n", "line 1: '0000:08:00.0' is not an address and its IDs"),
    ("# c\n08:00.0 8086:10d3\n", "line 2: '08:00.0' is not a PCI address in the form"),
    ("0000:08:00.0 8086:10D3\n", "line 1: '8086:10D3' is not VVVV:DDDD"),
    ("0000:08:00.0 8086:10d3\n0000:08:00.0 8086:10d3\n", "line 2: 0000:08:00.0 is listed "
                                                         "twice"),
    (b"0000:08:00.0 8086:10d3 \xff\n", "holds bytes that are not ASCII"),
    ("directory", "is not a regular file"),
    ("fifo", "is not a regular file"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
@pytest.mark.parametrize("argv", [["boot"], ["bind", "--persist", "0000:0a:00.0"],
                                  ["restore", "0000:09:00.0"], ["restore", "--all"]])
def test_a_bad_persist_file_is_one_line_and_changes_nothing(
        machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        content: str | bytes, message: str, argv: list[str]) -> None:
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
        assert path.read_bytes() == (content.encode() if isinstance(content, str)
                                     else content)


def test_the_boot_unit_runs_the_boot_command_before_the_engines() -> None:
    import configparser
    import shlex

    from kata_vfio_ctl.parser import build_parser

    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.read(Path(__file__).parent.parent / "systemd/kata-vfio-boot.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    # make install puts its PREFIX/bin in place of @BINDIR@ (tests/test_install.py)
    assert argv[0] == "@BINDIR@/kata-vfio-ctl" and unit["Service"]["Type"] == "oneshot"
    build_parser().parse_args(argv[1:])  # a command kata-vfio-ctl has (SystemExit if not)
    before = unit["Unit"]["Before"].split()
    for engine in ("containerd", "crio", "kubelet", "podman"):
        assert f"{engine}.service" in before
    assert "systemd-modules-load.service" in unit["Unit"]["After"].split()


def test_devices_after_a_reboot_names_no_binder_and_shows_persistence(
        machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
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
