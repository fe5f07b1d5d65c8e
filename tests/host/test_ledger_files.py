"""Issue 15, scale: the ledger is one file per IOMMU group. A create touches only its own
groups' files; whole-ledger views read them all; the single file of version 2
(bindings.json) is converted once, crash-safe; group locks are never taken out of order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.errors import DeviceError
from kata_vfio.pci import IommuGroup, PciAddress
from kata_vfio_ctl import plugin_ledger
from kata_vfio_host import ledger, locks, owners
from kata_vfio_host.bindings import acquire
from kata_vfio_host.ledger import (
    ContainerId,
    DeviceEntry,
    Host,
    editing,
    read_journal,
    read_journal_file,
)
from kata_vfio_host.owners import claim_groups, gone_containers, owner_of
from ledgerfiles import read_ledger

from fakesys import NVME, FakeKernel, FakeSysfs

REPO = Path(__file__).resolve().parents[2]
# written by the code of babc0a0
V2 = Path(__file__).resolve().parents[1] / "data/ledger-v2/bindings.json"
V2_BOOT = "5f1c0b7e-fixture-boot"


def v2_host(tmp_path: Path) -> Host:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(V2, state / "bindings.json")
    return Host(tmp_path / "sys", state, lambda *a: None, boot_id=V2_BOOT)


def whole(host: Host) -> dict[str, Any]:
    """Every whole-ledger view: the typed tables, the devices listing's owners, who holds
    each group, who is gone, the device plugin's recovery."""
    journal = read_journal_file(host)
    return {
        "devices": journal.devices,
        "claims": journal.claims,
        "vf_configs": journal.vf_configs,
        "kept": journal.kept,
        "damaged": sorted(journal.damaged),
        "listing": read_journal(host),
        "owners": {g: owner_of(host, IommuGroup(g)) for g in (3, 8, 12, 301, 999)},
        "gone": gone_containers(host),
        "allocations": plugin_ledger.allocations(host),
        "holders": plugin_ledger.live_holders(host),
    }


def test_a_ledger_of_version_2_is_converted_once_and_nothing_is_lost(tmp_path: Path) -> None:
    host = v2_host(tmp_path)
    before = whole(host)
    assert set(before["claims"]) == {3, 12, 301} and len(before["devices"]) == 5
    assert "not-an-address" in before["kept"]  # the hand-mangled entry, kept aside
    with editing(host, groups={7}) as journal:  # the first edit converts
        journal.claims[7] = ledger.Claim("new", V2_BOOT, None, 1.0)
    assert not (host.state_dir and Path(host.journal).exists())
    on_disk = read_ledger(host.state_dir)  # every entry in its own group's file
    assert on_disk["version"] == 3
    assert set(os.listdir(host.ledger_dir)) == {
        "group-3.json",
        "group-7.json",
        "group-8.json",
        "group-12.json",
        "group-301.json",
        "host.json",
    }
    assert "not-an-address" in on_disk["damaged_devices"]
    assert (
        "0000:3c:00.2" in json.loads(Path(host.ledger_dir, "host.json").read_text())["vf_configs"]
    )  # recorded without its group by older versions
    after = whole(host)
    assert after["claims"].pop(7).container == "new"
    assert after["holders"].pop(7) == "new"
    assert after == before
    assert ledger.migrate(host) is False  # once


STEPS = 7  # five files written, the directory renamed, bindings.json removed


@pytest.mark.parametrize("die_before", range(STEPS + 1))
def test_sigkill_during_the_conversion_loses_nothing(tmp_path: Path, die_before: int) -> None:
    """A SIGKILL before any step of the conversion: every reader sees the whole ledger
    (bindings.json until ledger/ exists, then ledger/), and the next edit finishes."""
    host = v2_host(tmp_path)
    before = whole(host)
    pid = os.fork()
    if pid == 0:
        try:
            count = [0]

            def dying(real: Any) -> Any:
                def step(*args: Any, **kwargs: Any) -> Any:
                    if count[0] == die_before:
                        os.kill(os.getpid(), signal.SIGKILL)
                    count[0] += 1
                    return real(*args, **kwargs)

                return step

            for name in ("replace", "rename", "unlink"):
                setattr(os, name, dying(getattr(os, name)))
            ledger.migrate(host)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) == (die_before < STEPS)
    assert whole(host) == before  # what a reader sees right after the kill
    both = Path(host.journal).exists() and Path(host.ledger_dir).is_dir()
    assert both == (die_before == STEPS - 1)  # the one state with both: ledger/ wins
    with editing(host, groups={3}) as journal:
        journal.devices["0000:05:00.2"] = DeviceEntry(
            "nvme", None, 3, "container ctr-a", V2_BOOT, 2.0
        )
    assert not Path(host.journal).exists()
    assert not Path(host.state_dir, "ledger.migrating").exists()
    after = whole(host)
    assert after["devices"].pop("0000:05:00.2").driver == "nvme"
    after["listing"].pop("0000:05:00.2")
    assert after == before


def test_when_ledger_and_bindings_json_are_both_there_ledger_wins(tmp_path: Path) -> None:
    """The rule: ledger/ only ever appears whole (one rename), so a bindings.json beside
    it is a leftover, even one that says otherwise; the next edit removes it."""
    host = v2_host(tmp_path)
    ledger.migrate(host)
    with editing(host, groups={3}) as journal:
        del journal.claims[3]  # ctr-a gives group 3 up after the conversion
    shutil.copy(V2, host.journal)  # a leftover (a conversion killed before its last step)
    assert 3 not in read_journal_file(host).claims
    assert 3 not in read_journal_file(host, groups={3}).claims
    with editing(host, groups={12}):
        pass
    assert not Path(host.journal).exists() and 3 not in read_journal_file(host).claims


def test_a_create_reads_only_its_own_groups_and_whole_views_read_all(tmp_path: Path) -> None:
    """A damaged file of another group does not stop a create (it never reads it); every
    whole-ledger view does read it and names it."""
    host = Host(tmp_path / "sys", tmp_path / "state", lambda *a: None, boot_id="b")
    claim_groups(host, ContainerId("a"), [IommuGroup(5)], None)
    Path(host.ledger_dir, "group-999.json").write_text("{cut off")
    claim_groups(host, ContainerId("b"), [IommuGroup(6)], None)
    assert read_journal_file(host, groups={5, 6}).claims.keys() == {5, 6}
    with pytest.raises(DeviceError, match=r"group-999\.json is damaged"):
        read_journal_file(host)
    assert json.loads(Path(host.ledger_dir, "group-6.json").read_text())["claims"].keys() == {"6"}


def test_concurrent_creates_on_different_groups_lose_no_claim(tmp_path: Path) -> None:
    """24 processes claim 24 groups at once (each under its group lock, as a create does),
    each with a device entry: every claim and entry is there, each in its group's file."""
    host = Host(tmp_path / "sys", tmp_path / "state", lambda *a: None, boot_id="b")
    gate_r, gate_w = os.pipe()
    pids = []
    for n in range(24):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(gate_w)
                os.read(gate_r, 1)
                group = IommuGroup(100 + n)
                with (
                    ledger.group_locks(host, [group]),
                    editing(host, groups={group.number}) as journal,
                ):
                    owners.record_claims(host, journal, ContainerId(f"c{n}"), [group], None)
                    journal.devices[f"0000:{n + 1:02x}:00.0"] = DeviceEntry(
                        None, None, group.number, f"container c{n}", "b", 1.0
                    )
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(gate_r)
    os.write(gate_w, b"x" * 24)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    on_disk = read_ledger(host.state_dir)  # each entry in its own group's file
    assert {c["container"] for c in on_disk["claims"].values()} == {f"c{n}" for n in range(24)}
    assert len(on_disk["devices"]) == 24
    journal = read_journal_file(host)
    assert {g: c.container for g, c in journal.claims.items()} == {
        100 + n: f"c{n}" for n in range(24)
    }


DEADLOCK = """
import sys, threading, time
from pathlib import Path
sys.path[:0] = sys.argv[2].split(":")
from kata_vfio.errors import DeviceError
from kata_vfio.pci import IommuGroup, PciAddress
from kata_vfio_host.bindings import acquire
from kata_vfio_host.ledger import ContainerId, Host, group_locks, read_journal_file
from kata_vfio_host.owners import claim_groups
from fakesys import NVME, FakeKernel, FakeSysfs

top = Path(sys.argv[1])
fs = FakeSysfs(top / "sys")
fs.add_driver("vfio-pci")
kernel = FakeKernel(fs)
fs.add_device("0000:03:00.0", NVME, group=3, driver="nvme")
fs.add_device("0000:05:00.0", NVME, group=5, driver="nvme")
host = Host(fs.root, top / "state", kernel.write, boot_id="b")
for name in ("b3", "b5"):
    (top / name).mkdir()
claim_groups(host, ContainerId("c"), [IommuGroup(3)], str(top / "b3"))  # c holds 3
holds_3, a_decides = threading.Event(), threading.Event()

def other():  # another create: groups 3 and 5, in order
    with group_locks(host, [IommuGroup(3)]):
        holds_3.set()
        a_decides.wait(10)
        with group_locks(host, [IommuGroup(5)]):
            pass

def in_use(addr):
    a_decides.set()
    time.sleep(0.3)  # the other create now waits for group 5
    return ["mounted on /data"]

t = threading.Thread(target=other, daemon=True)
t.start()
holds_3.wait(10)
try:
    acquire(host, ContainerId("c"), [], [PciAddress.parse("0000:05:00.0")], ("1b36:0010",),
            str(top / "b5"), in_use)
except DeviceError as exc:
    print("refused:", exc.one_line())
t.join(20)
print("other create done:", not t.is_alive())
print("claims left:", sorted(read_journal_file(host).claims))
"""


def test_a_failed_create_never_waits_for_a_lower_group_lock(tmp_path: Path) -> None:
    """Container c holds group 3; its create asking for group 5 fails (the device is in
    use). Giving back c's group 3 while still holding group 5's lock deadlocked with a
    create that holds 3 and waits for 5. Locks are taken in group order: the failed
    create gives back group 5 under its lock, then group 3 once 5 is released."""
    paths = ":".join(str(REPO / p) for p in ("common", "wrapper", "hook", "tests"))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(DEADLOCK), str(tmp_path), paths],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: the failed create and the other create wait for each other")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("refused: PCI device 0000:05:00.0 is in use"), lines
    assert lines[1:] == ["other create done: True", "claims left: []"]


def test_nested_take_of_a_lower_group_held_elsewhere_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: a nested block asking for a lower group than one it holds, while
    another process holds that lower one, gives up with one line instead of waiting."""
    monkeypatch.setattr(locks, "_OUT_OF_ORDER_WAIT", 0.3)
    host = Host(tmp_path / "sys", tmp_path / "state", lambda *a: None, boot_id="b")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with ledger.group_locks(host, [IommuGroup(2)]):
                os.write(w, b"x")
                import time

                time.sleep(5)
        finally:
            os._exit(0)
    os.read(r, 1)
    try:
        with (
            ledger.group_locks(host, [IommuGroup(9)]),
            pytest.raises(DeviceError, match="IOMMU group 2's lock is held"),
            ledger.group_locks(host, [IommuGroup(2)]),
        ):
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_acquire_on_the_converted_fixture_sees_the_old_claims(tmp_path: Path) -> None:
    """A create on a host whose ledger is still bindings.json: converted, and a group the
    old file says is held is refused."""
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_driver("vfio-pci")
    kernel = FakeKernel(fs)
    fs.add_device("0000:0c:00.0", NVME, group=12, driver="vfio-pci")
    fs.add_device("0000:0d:00.0", NVME, group=13, driver="vfio-pci")
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(V2, state / "bindings.json")
    host = Host(fs.root, state, kernel.write, boot_id=V2_BOOT)
    with pytest.raises(DeviceError, match="IOMMU group 12 is in use by container ctr-a"):
        acquire(host, ContainerId("x"), [], [PciAddress.parse("0000:0c:00.0")], (), None)
    acquire(host, ContainerId("x"), [], [PciAddress.parse("0000:0d:00.0")], (), None)
    assert not Path(host.journal).exists()
    assert read_journal_file(host).claims[13].container == "x"
    assert read_journal_file(host).claims[12].container == "ctr-a"


def test_a_claim_of_this_boot_flushes_its_file_but_not_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16, Allocate p99: a claim (a record a reboot makes history) fsyncs the group
    file before its rename, not the ledger directory after it; an admin's bind recorded
    while the boot is unknown (nothing says a reboot ends it) fsyncs both."""
    import stat

    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    host = Host(tmp_path / "sys", tmp_path / "state", lambda *a: None, boot_id="b")
    claim_groups(host, ContainerId("a"), [IommuGroup(5)], None)  # the layout made
    synced.clear()
    claim_groups(host, ContainerId("c"), [IommuGroup(6)], None)
    assert synced == ["file"]
    assert read_journal_file(host).claims[6].container == "c"
    unknown = Host(
        tmp_path / "sys", tmp_path / "state", lambda *a: None, boot_id=ledger.UNKNOWN_BOOT
    )
    synced.clear()
    with editing(unknown, groups={7}) as journal:
        journal.devices["0000:07:00.0"] = DeviceEntry(
            "nvme", None, 7, ledger.ADMIN, ledger.UNKNOWN_BOOT
        )
    assert synced == ["file", "dir"]
