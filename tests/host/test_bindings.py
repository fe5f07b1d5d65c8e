"""Host device management on fake sysfs trees with a fake kernel behind the writes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vfio.errors import DeviceError
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio.pci import PciAddress
from kata_vfio_host.bindings import acquire, bind_group, bind_groups
from kata_vfio_host.giveback import release_container, restore_all
from kata_vfio_host.ledger import ADMIN, ContainerId, Host, marker, read_journal
from kata_vfio_runtime.spec_edit import requested_addresses
from ledgerfiles import read_ledger

from fakesys import BRIDGE, IGBVF, NVME, FakeKernel, FakeSysfs


def A(text: str) -> PciAddress:
    return PciAddress.parse(text)


def autobind(
    spec: dict[str, object], host: Host, allow: tuple[str, ...], cid: str, bundle: str | None = None
) -> list[PciAddress]:
    """What a container's create asks of the ledger for an io.kata-vfio.devices request."""
    return acquire(host, ContainerId.parse(cid), [], requested_addresses(spec), allow, bundle)


def release(host: Host, cid: str) -> list[str]:
    return release_container(host, cid).restored


@pytest.fixture
def host(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Host:
    fakesys.add_device("0000:00:03.0", group=3, driver="e1000e", net=("enp0s3",))
    # conventional bridge with two NICs: one group
    fakesys.add_device("0000:00:1e.0", BRIDGE, group=7, driver=None)
    fakesys.add_device("0000:05:01.0", group=7, driver="e1000")
    fakesys.add_device("0000:05:02.0", group=7, driver="e1000")
    # PF and its VFs in one group (no ACS)
    fakesys.add_device("0000:06:00.0", group=9, driver="igb", net=("enp6s0",))
    fakesys.add_device("0000:06:10.0", IGBVF, group=9, driver="igbvf")
    fakesys.add_vf("0000:06:00.0", "0000:06:10.0", 0)
    fakesys.add_device("0000:08:00.0", NVME, group=11, driver="nvme")
    fakesys.add_device("0000:09:00.0", driver="e1000e")  # no IOMMU group
    return Host(sysfs=fakesys.root, state_dir=tmp_path / "state", write=kernel.write)


def drivers(fs: FakeSysfs) -> dict[str, str | None]:
    return {a: fs.driver(a) for a in sorted(os.listdir(fs.root / "bus/pci/devices"))}


def test_bind_takes_the_whole_group_and_restore_gives_it_back(
    host: Host, fakesys: FakeSysfs, kernel: FakeKernel
) -> None:
    before = drivers(fakesys)
    group = bind_group(host, A("0000:05:02.0"), ADMIN)
    assert group.number == 7
    assert fakesys.driver("0000:05:01.0") == fakesys.driver("0000:05:02.0") == "vfio-pci"
    assert fakesys.driver("0000:00:1e.0") is None  # bridges are left alone
    assert (fakesys.root / "class/vfio/7/dev").exists()
    journal = read_journal(host)
    assert journal["0000:05:01.0"]["driver"] == "e1000" and journal["0000:05:01.0"]["group"] == 7
    assert not any(w.endswith("new_id") for w, _ in kernel.writes)
    assert sorted(restore_all(host).restored) == ["0000:05:01.0", "0000:05:02.0"]
    assert drivers(fakesys) == before
    assert read_journal(host) == {}


def test_pf_and_vf_in_one_group_go_together(host: Host, fakesys: FakeSysfs) -> None:
    bind_group(host, A("0000:06:10.0"), ADMIN)
    assert fakesys.driver("0000:06:00.0") == fakesys.driver("0000:06:10.0") == "vfio-pci"
    restore_all(host)
    assert (fakesys.driver("0000:06:00.0"), fakesys.driver("0000:06:10.0")) == ("igb", "igbvf")


def test_in_use_is_refused_unless_forced(host: Host, fakesys: FakeSysfs) -> None:
    def in_use(addr: PciAddress) -> list[str]:
        return (
            ["interface enp6s0 is up with addresses 192.0.2.1"]
            if str(addr) == "0000:06:00.0"
            else []
        )

    with pytest.raises(DeviceError, match=r"0000:06:00\.0 is in use: interface enp6s0"):
        bind_group(host, A("0000:06:10.0"), ADMIN, in_use=in_use)
    assert fakesys.driver("0000:06:10.0") == "igbvf"
    bind_group(host, A("0000:06:10.0"), ADMIN, force=True, in_use=in_use)
    assert fakesys.driver("0000:06:00.0") == "vfio-pci"


def test_no_group_and_unknown_device(host: Host) -> None:
    with pytest.raises(DeviceError, match="intel_iommu=on"):
        bind_group(host, A("0000:09:00.0"), ADMIN)
    with pytest.raises(DeviceError, match=r"no PCI device 0000:0a:00\.0"):
        bind_group(host, A("0000:0a:00.0"), ADMIN)


def spec_for(*addresses: str) -> dict[str, object]:
    return {"annotations": {DEVICES_ANNOTATION: ",".join(addresses)}}


def test_autobind_default_deny_and_allow_list(host: Host, fakesys: FakeSysfs) -> None:
    # default deny: no allow-list, nothing is bound (the spec edit then says how to bind)
    assert autobind(spec_for("0000:08:00.0"), host, (), "c1") == []
    assert fakesys.driver("0000:08:00.0") == "nvme"
    release(host, "c1")
    with pytest.raises(DeviceError, match=r"not in the auto-bind allow-list"):
        autobind(spec_for("0000:08:00.0"), host, ("8086:*",), "c1")
    with pytest.raises(DeviceError, match=r"0000:05:01\.0 \[8086:10d3\].*allow-list"):
        autobind(spec_for("0000:05:02.0"), host, ("0000:05:02.0",), "c1")  # member not allowed
    assert fakesys.driver("0000:05:02.0") == "e1000"
    assert autobind(spec_for("0000:08:00.0"), host, ("1b36:*",), "c1") == [A("0000:08:00.0")]
    assert fakesys.driver("0000:08:00.0") == "vfio-pci"
    assert Path(marker(host.state_dir, "c1")).exists()
    # another container: refused, naming the owner
    with pytest.raises(DeviceError, match="in use by container c1"):
        autobind(spec_for("0000:08:00.0"), host, ("1b36:*",), "c2")
    release(host, "c1")
    assert fakesys.driver("0000:08:00.0") == "nvme"
    assert not Path(marker(host.state_dir, "c1")).exists()


STEPS = 7  # 0: after the journal; then override, unbind, probe for each of the two NICs


def dying_writer(kernel: FakeKernel, die_after_writes: int) -> Callable[[Path, str], None]:
    """Sysfs writes that SIGKILL the process after N of them. Each write is atomic, as
    the kernel's are (binds run in threads: the kill must not land inside the fake)."""
    lock = threading.Lock()
    count = 0

    def write(path: Path, text: str) -> None:
        nonlocal count
        with lock:
            if count >= die_after_writes:
                os.kill(os.getpid(), signal.SIGKILL)
            count += 1
            kernel.write(path, text)

    return write


@pytest.mark.parametrize("die_after_writes", range(STEPS))
def test_sigkill_at_every_step_is_repaired_by_restore_all(
    host: Host, fakesys: FakeSysfs, kernel: FakeKernel, die_after_writes: int
) -> None:
    """A child process auto-binds and is SIGKILLed after N sysfs writes (0: right after
    the journal); restore --all then puts every device back."""
    before = drivers(fakesys)
    pid = os.fork()
    if pid == 0:  # the "wrapper"
        dying = Host(host.sysfs, host.state_dir, dying_writer(kernel, die_after_writes))
        try:
            autobind(spec_for("0000:05:01.0"), dying, ("8086:*",), "ctr")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    assert killed == (die_after_writes < 6)  # six writes bind the pair
    # the claim names no bundle here, so nothing tells that "ctr" is gone: the admin forces
    restore_all(host, force=True)
    assert drivers(fakesys) == before
    assert read_journal(host) == {}


def test_two_concurrent_creates_one_wins(
    host: Host, fakesys: FakeSysfs, kernel: FakeKernel, tmp_path: Path
) -> None:
    def slow_write(path: Path, text: str) -> None:
        time.sleep(0.05)  # widen the race window
        kernel.write(path, text)

    results = []
    pids = []
    for cid in ("a", "b"):
        pid = os.fork()
        if pid == 0:
            out = tmp_path / f"result-{cid}"
            try:
                autobind(
                    spec_for("0000:05:01.0"),
                    Host(host.sysfs, host.state_dir, slow_write),
                    ("8086:*",),
                    cid,
                )
                out.write_text("ok")
            except DeviceError as err:
                out.write_text(str(err))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    results = sorted((tmp_path / f"result-{c}").read_text() for c in ("a", "b"))
    assert results[1] == "ok"
    assert "is in use by container " in results[0]
    owners = {e["owner"] for e in read_journal(host).values()}
    assert len(owners) == 1


@pytest.mark.host
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for veth interfaces")
def test_network_use_is_seen_on_real_interfaces() -> None:
    from kata_vfio_host.usage import network_uses

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    ip("link", "add", "kvfio-t0", "type", "veth", "peer", "name", "kvfio-t1")
    try:
        assert network_uses("kvfio-t0") == []  # down, no addresses: free
        ip("addr", "add", "192.0.2.10/24", "dev", "kvfio-t0")
        ip("link", "set", "kvfio-t0", "up")
        assert network_uses("kvfio-t0") == ["interface kvfio-t0 is up with addresses 192.0.2.10"]
        ip("link", "add", "kvfio-br0", "type", "bridge")
        ip("link", "set", "kvfio-t1", "master", "kvfio-br0")
        assert network_uses("kvfio-t1") == [
            "interface kvfio-t1 is a member of bridge "
            "kvfio-br0, which is down (ip link set kvfio-t1 "
            "nomaster frees it)"
        ]
        assert network_uses("kvfio-nonexistent") == []
    finally:
        subprocess.run(["ip", "link", "del", "kvfio-t0"], check=False)
        subprocess.run(["ip", "link", "del", "kvfio-br0"], check=False)


def test_journal_is_json_with_original_drivers(host: Host) -> None:
    bind_group(host, A("0000:00:03.0"), ADMIN)
    data = read_ledger(host.state_dir)  # checks the entry is in its group's own file
    assert data["version"] == 3
    assert data["devices"]["0000:00:03.0"]["driver"] == "e1000e"
    assert data["devices"]["0000:00:03.0"]["owner"] == ADMIN


CONCURRENT = 8


@pytest.mark.parametrize("die_after_writes", [0, 1, 5, 9, 14, 19, 23])
def test_sigkill_during_a_concurrent_bind_of_eight(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel, die_after_writes: int
) -> None:
    """Issue 10: eight groups bound at once (threads); a SIGKILL after any number of
    sysfs writes leaves a journal from which restore --all puts everything back."""
    for i in range(CONCURRENT):
        fakesys.add_device(f"0000:{0x40 + i:02x}:00.0", NVME, group=40 + i, driver="nvme")
    host = Host(fakesys.root, tmp_path / "state", kernel.write)
    before = drivers(fakesys)
    pid = os.fork()
    if pid == 0:
        dying = Host(host.sysfs, host.state_dir, dying_writer(kernel, die_after_writes))
        try:
            bind_groups(dying, [A(f"0000:{0x40 + i:02x}:00.0") for i in range(CONCURRENT)], ADMIN)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) == (die_after_writes < 3 * CONCURRENT)
    assert len(read_journal(host)) == CONCURRENT  # the whole intent was written first
    report = restore_all(host)
    assert report.failed == []
    assert drivers(fakesys) == before
    assert read_journal(host) == {}


def test_a_bind_of_eight_groups_reads_and_writes_the_journal_once(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10: the per-batch work is done once per batch: one journal read (the claim
    check is made in it) and one write, whatever the number of groups; every device's
    driver is read once, under the group locks, and the kernel work starts from it."""
    from kata_vfio_host import bindings, ledger

    for i in range(CONCURRENT):
        fakesys.add_device(f"0000:{0x40 + i:02x}:00.0", NVME, group=40 + i, driver="nvme")
    host = Host(fakesys.root, tmp_path / "state", kernel.write)
    calls: list[str] = []
    read, write = ledger.read_journal_file, ledger._write_journal_file
    monkeypatch.setattr(
        ledger, "read_journal_file", lambda h, **kw: calls.append("read") or read(h, **kw)
    )
    monkeypatch.setattr(bindings, "read_journal_file", ledger.read_journal_file)
    monkeypatch.setattr(
        ledger, "_write_journal_file", lambda h, j: calls.append("write") or write(h, j)
    )
    bind_groups(host, [A(f"0000:{0x40 + i:02x}:00.0") for i in range(CONCURRENT)], ADMIN)
    assert calls == ["read", "write"]
    assert set(drivers(fakesys).values()) == {"vfio-pci"}
    assert [e["driver"] for e in read_journal(host).values()] == ["nvme"] * CONCURRENT


def test_bind_threads_follow_the_cpus() -> None:
    from kata_vfio_host.bindings import bind_pool_size

    assert bind_pool_size(1) == 1
    assert 2 <= bind_pool_size(32) <= 8
    assert bind_pool_size(32) == min(max(2, os.cpu_count() or 1), 8)


@pytest.mark.parametrize("die_after_writes", [0, 1, 5, 9, 13, 23, 24])
def test_sigkill_during_a_concurrent_restore_of_eight(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel, die_after_writes: int
) -> None:
    """Giving back runs concurrently too and drops the journal entries in one write at
    the end: a SIGKILL after any number of sysfs writes leaves entries from which the
    next restore --all puts everything back (again, for those already back)."""
    for i in range(CONCURRENT):
        fakesys.add_device(f"0000:{0x40 + i:02x}:00.0", NVME, group=40 + i, driver="nvme")
    host = Host(fakesys.root, tmp_path / "state", kernel.write)
    before = drivers(fakesys)
    bind_groups(host, [A(f"0000:{0x40 + i:02x}:00.0") for i in range(CONCURRENT)], ADMIN)
    pid = os.fork()
    if pid == 0:
        try:
            restore_all(Host(host.sysfs, host.state_dir, dying_writer(kernel, die_after_writes)))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) == (die_after_writes < 3 * CONCURRENT)
    if os.WIFSIGNALED(status):
        assert len(read_journal(host)) == CONCURRENT  # nothing dropped before the end
    report = restore_all(host)
    assert report.failed == []
    assert drivers(fakesys) == before
    assert read_journal(host) == {}


def test_restore_keeps_an_entry_another_owner_wrote_meanwhile(
    host: Host, fakesys: FakeSysfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kata_vfio_host import giveback
    from kata_vfio_host.ledger import DeviceEntry, editing

    bind_group(host, A("0000:00:03.0"), ADMIN)
    give_back = giveback.give_back

    def rebound_meanwhile(*args: object, **kwargs: object) -> None:
        give_back(*args, **kwargs)  # type: ignore[arg-type]
        with editing(host) as journal:  # another owner binds it again before we finish
            journal.devices["0000:00:03.0"] = DeviceEntry("e1000e", None, 5, "container x")

    monkeypatch.setattr(giveback, "give_back", rebound_meanwhile)
    assert restore_all(host, ADMIN).restored == ["0000:00:03.0"]
    assert read_journal(host)["0000:00:03.0"]["owner"] == "container x"
