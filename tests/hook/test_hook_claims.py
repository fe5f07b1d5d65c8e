"""Identical devices in one pod: the guest hook's claim ledger."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kata_vfio.errors import HookError, KataVfioError

from hookguest import Guest, manifest, mdev

# --- identical devices in one pod: the claim ledger --------------------------------------


def test_identical_devices_go_to_different_containers_of_a_pod(guest: Guest) -> None:
    """Three identical NICs; containers a and b each ask for one (different host devices
    with the same IDs): each gets its own guest device, and a freed one is reused."""
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    given = []
    for cid, pid in (("a", 100), ("b", 200)):
        guest.start_process(pid)
        assert guest.run(one_nic, cid, pid) == 0
        given += guest.given()
    assert given == ["0000:00:02.0", "0000:00:03.0"]
    assert guest.claims() == {"0000:00:02.0": "a", "0000:00:03.0": "b"}
    assert guest.fs.driver("0000:00:04.0") == "e1000e"

    guest.end_process(100)  # a is gone: its claim is stale
    guest.start_process(300)
    assert guest.run(one_nic, "c", 300) == 0
    assert guest.given() == ["0000:00:02.0"]
    assert guest.claims() == {"0000:00:02.0": "c", "0000:00:03.0": "b"}


@pytest.mark.parametrize(
    "damage",
    [
        b"{not json",
        b"[]",
        b'{"0000:00:02.0": "a"}',
        b'{"0000:00:02.0": {"container_id": "a"}}',
        b'{"0000:00:02.0": {"container_id": "a", "pid": "100", "start": 1000}}',
        b'{"0000:00:02.0": {"container_id": "a", "pid": true, "start": 1000}}',
        b"\xff\xfe",
    ],
)
def test_a_damaged_claims_file_fails_closed(guest: Guest, damage: bytes) -> None:
    """Container a holds a device; its claim record is damaged: the next container gets
    nothing (one line naming the file), rather than a device a live container holds."""
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    guest.start_process(100)
    assert guest.run(one_nic, "a", 100) == 0
    ledger_file = guest.roots.claims / "claims.json"
    ledger_file.write_bytes(damage)
    guest.start_process(200)
    writes = len(guest.kernel.writes)
    with pytest.raises(KataVfioError, match=f"the claims file {ledger_file} is damaged"):
        guest.run(one_nic, "b", 200)
    assert guest.kernel.writes[writes:] == []  # nothing bound for b
    assert ledger_file.read_bytes() == damage  # and the evidence left as it was
    assert not (guest.bundle / "rootfs/dev/vfio/3").exists()


def test_a_held_claims_lock_is_waited_for_within_the_deadline(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another hook stuck holding the claims lock: this one gives up before its deadline,
    with one line saying what it waited for, and binds nothing."""
    import fcntl

    import kata_vfio_hook.give

    monkeypatch.setattr(kata_vfio_hook.give, "HOOK_DEADLINE", 2.5)  # GROUP_WAIT 1.5 + 1 s
    guest.roots.claims.mkdir(parents=True, exist_ok=True)
    lock = guest.roots.claims / ".lock"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    guest.start_process(100)
    started = time.monotonic()
    try:
        with pytest.raises(
            KataVfioError, match=f"for the claims lock {lock}, which another hook holds"
        ) as err:
            guest.run(manifest((7, [mdev("0000:81:00.0")])), "a", 100)
    finally:
        os.close(holder)
    took = time.monotonic() - started
    assert 0.8 < took < 2.5, took  # waited, and ended before the deadline
    assert str(err.value).startswith("waited "), err.value
    assert guest.kernel.writes == []


def test_a_restarted_container_gets_its_own_device_back(guest: Guest) -> None:
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    guest.start_process(100)
    guest.start_process(200)
    assert guest.run(one_nic, "b", 200) == 0
    assert guest.run(one_nic, "a", 100) == 0
    assert guest.given() == ["0000:00:03.0"]
    guest.end_process(200)  # b ends: 00:02.0 is free and first by address
    guest.end_process(100)
    guest.start_process(101)  # a restarts (same id, new init)
    assert guest.run(one_nic, "a", 101) == 0
    assert guest.given() == ["0000:00:03.0"]
    assert guest.claims() == {"0000:00:03.0": "a"}


def test_a_reused_pid_does_not_keep_a_claim(guest: Guest) -> None:
    one_nic = manifest((7, [mdev("0000:81:00.0")]))
    guest.start_process(100, start=5000)
    assert guest.run(one_nic, "a", 100) == 0
    guest.end_process(100)
    guest.start_process(100, start=9000)  # another process got pid 100
    guest.start_process(200)
    assert guest.run(one_nic, "b", 200) == 0
    assert guest.given() == ["0000:00:02.0"]
    assert guest.claims() == {"0000:00:02.0": "b"}


def test_a_device_held_by_a_live_container_is_not_given_twice(guest: Guest) -> None:
    two_nics = manifest((7, [mdev("0000:81:00.0"), mdev("0000:81:00.1")]), timeout=0.2)
    guest.start_process(100)
    guest.start_process(200)
    assert guest.run(two_nics, "a", 100) == 0
    assert guest.given() == ["0000:00:02.0", "0000:00:03.0"]
    with pytest.raises(
        HookError,
        match=r"host device 0000:81:00\.1 .* not found in the guest "
        r"after 0\.2 s; guest device 0000:00:02\.0 is held by "
        r"container a; guest device 0000:00:03\.0 is held by "
        r"container a",
    ):
        guest.run(two_nics, "b", 200)
    assert guest.claims() == {"0000:00:02.0": "a", "0000:00:03.0": "a"}
    assert guest.fs.driver("0000:00:04.0") == "e1000e"  # b touched nothing


def test_claims_are_written_before_anything_is_bound(guest: Guest) -> None:
    seen: list[dict[str, str]] = []
    real_write = guest.kernel.write

    def write(path: Path, text: str) -> None:
        seen.append(guest.claims())
        real_write(path, text)

    guest.roots = guest.roots._replace(write=write)
    assert guest.run(manifest((7, [mdev("0000:81:00.0")]))) == 0
    assert seen and seen[0] == {"0000:00:02.0": "c1"}
