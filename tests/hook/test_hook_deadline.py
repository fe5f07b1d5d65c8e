"""The guest hook keeps one deadline for the whole run, below kata-agent's kill."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kata_vfio.defaults import HOOK_DEADLINE, HOOK_KILL_AFTER, HOTPLUG_TIMEOUT_MAX
from kata_vfio.errors import HookError, KataVfioError

from hookguest import FakeClock, Guest, manifest, mdev

# --- one deadline for the whole hook ------------------------------------------------------


def test_devices_that_never_appear_end_the_hook_before_the_deadline(
    guest: Guest, clock: FakeClock
) -> None:
    """Python's start-up (3 s of a slow TCG guest, from /proc/self/stat) counts too: with
    hotplug_timeout at its maximum the hook still ends inside HOOK_DEADLINE."""
    tck = os.sysconf("SC_CLK_TCK")
    (guest.proc / "uptime").write_text("1000.00 900.00\n")
    (guest.proc / "self/stat").write_text(
        f"77 (python3) R {' '.join(['0'] * 18)} {(1000 - 3) * tck} 0\n"
    )
    process_start = clock.now - 3
    m = manifest(
        (7, [mdev("0000:81:00.0", (0x15B3, 0x101E, 0x020000))]), timeout=HOTPLUG_TIMEOUT_MAX
    )
    with pytest.raises(HookError, match="not found in the guest after 4 s"):
        guest.run(m)
    assert clock.now - process_start <= HOOK_DEADLINE < HOOK_KILL_AFTER


def test_groups_that_never_appear_end_the_hook_before_the_deadline(
    guest: Guest, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device hot-plugged just inside hotplug_timeout, a slow rebind, and then no
    /dev/vfio/<N>: the group wait gets only what is left."""
    started = clock.now
    plug = ("0000:00:06.0", (0x15B3, 0x101E, 0x020000))
    clock.at.append(
        (started + 5.9, lambda: guest.fs.add_device(plug[0], plug[1], group=6, driver="mlx5_core"))
    )
    real_write = guest.kernel.write

    def slow_probe(path: Path, text: str) -> None:
        real_write(path, text)
        if Path(path).name == "drivers_probe" and guest.fs.driver(plug[0]) == "vfio-pci":
            clock.advance(1.5)

    monkeypatch.setattr(guest.fs, "add_vfio_group", lambda *args, **kw: None)
    guest.roots = guest.roots._replace(write=slow_probe)
    with pytest.raises(HookError, match=r"/dev/vfio/\[6\] did not appear"):
        guest.run(manifest((7, [mdev("0000:81:00.0", plug[1])]), timeout=HOTPLUG_TIMEOUT_MAX))
    assert clock.now - started <= HOOK_DEADLINE
    assert guest.fs.driver(plug[0]) == "mlx5_core"  # and given back


def test_manifest_timeout_above_the_maximum_is_refused(guest: Guest) -> None:
    forged = json.loads(manifest((7, [mdev("0000:81:00.0")])))
    forged["hotplug_timeout"] = 60
    started = time.monotonic()
    with pytest.raises(KataVfioError, match=r"hotplug_timeout=60 is not 0\.\.6 seconds"):
        guest.run(json.dumps(forged))
    assert time.monotonic() - started < 1 and guest.kernel.writes == []
