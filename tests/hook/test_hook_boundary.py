"""The guest hook's one error boundary, and what a whole run imports."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from fakesys import NVME
from hookguest import Guest, manifest, mdev

# --- one error boundary --------------------------------------------------------------------


def test_an_unexpected_error_names_its_step_and_place(
    guest: Guest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    from kata_vfio_hook import main as hook_main

    def broken(*args: Any) -> None:
        raise ValueError("boom")

    monkeypatch.setattr("kata_vfio_hook.nodes.devices_cgroup", broken)
    monkeypatch.setattr(
        sys, "stdin", io.StringIO(guest.state(manifest((7, [mdev("0000:81:00.0")]))))
    )
    monkeypatch.setattr(hook_main, "LOG_PATH", str(tmp_path / "main.log"))
    assert hook_main.main(["kata-vfio-hook", "prestart"], guest.roots) == 70
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert re.match(
        r"kata-vfio-hook: internal error while allowing the devices in the "
        r"container's cgroup: ValueError\('boom'\) at test_hook_boundary\.py:\d+ ",
        err[0],
    )
    assert guest.fs.driver("0000:00:02.0") == "e1000e"  # given back on this failure too
    logged = json.loads((tmp_path / "main.log").read_text().splitlines()[-1])
    assert logged["error"] in err[0] and logged["container_id"] == "c1"


# The hook's first run in a fresh VM is what Kata waits for (issue 8: ≤ 4× a bare
# interpreter start): its code imports the standard library's cheap modules only.
# _operator: built into the interpreter, like _thread (the itemgetter of kata_vfio's value types)
HOOK_STDLIB = {
    "os",
    "sys",
    "time",
    "errno",
    "fcntl",
    "stat",
    "struct",
    "select",
    "_socket",
    "_thread",
    "_json",
    "__future__",
    "_operator",
}


def fresh_run(guest: Guest, text: str) -> tuple[set[str], set[str]]:
    """One hook run with our modules imported afresh, so their top-level imports count
    too: (the standard modules our code imported, our modules the run loaded)."""
    import builtins

    ours = ("kata_vfio", "kata_vfio_hook")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ours}
    seen: set[str] = set()
    real_import = builtins.__import__

    def recording(name: str, globals: Any = None, *args: Any, **kwargs: Any) -> Any:
        importer = (globals or {}).get("__name__", "")
        if importer.split(".")[0] in ours and name.split(".", maxsplit=1)[0] not in ours:
            seen.add(name)
        return real_import(name, globals, *args, **kwargs)

    for name in saved:
        del sys.modules[name]
    builtins.__import__ = recording
    try:
        import kata_vfio_hook.main as fresh_main
        from kata_vfio.jsonlog import JsonLog as FreshLog
        from kata_vfio_hook.roots import GuestRoots as FreshRoots

        r = guest.roots
        roots = FreshRoots(
            sysfs=r.sysfs,
            proc=r.proc,
            cgroupfs=r.cgroupfs,
            libcontainer=r.libcontainer,
            claims=r.claims,
            modprobe=(),
            via_proc_root=False,
            write=r.write,
            uevents=False,
            ipv4_address=r.ipv4_address,
        )
        assert fresh_main.run(guest.state(text), roots, FreshLog(guest.log_path)) == 0
    finally:
        builtins.__import__ = real_import
        loaded = {k for k in sys.modules if k.split(".")[0] in ours}
        for name in loaded:
            del sys.modules[name]
        sys.modules.update(saved)
    return seen, loaded


def test_a_whole_hook_run_imports_only_cheap_standard_modules(guest: Guest) -> None:
    """Every import statement our modules execute during a full run (devices found,
    rebound concurrently, groups, nodes, cgroup, log): nothing beyond the cheap list (no
    pathlib, typing, json, re, threading, socket, contextlib, dataclasses)."""
    m = manifest(
        (7, [mdev("0000:81:00.0", mac="52:54:00:00:00:03")]),
        (9, [mdev("0000:82:00.0", NVME)]),
        (2, [mdev("0000:83:00.0")]),
    )
    seen, loaded = fresh_run(guest, m)
    assert guest.given() == ["0000:00:02.0", "0000:00:04.0", "0000:00:05.0"]
    assert {"_thread", "_json"} <= seen  # the concurrent bind and the codec did run
    assert seen <= HOOK_STDLIB, sorted(seen - HOOK_STDLIB)
    assert "kata_vfio.threads" in loaded


def test_one_device_binds_without_loading_the_thread_pool(guest: Guest) -> None:
    """Most containers ask for one device: it is rebound in the hook's own thread, and
    the pool's module (one more module on every start) is never loaded."""
    guest.fs.add_child_block("0000:00:05.0", "nvme0n1", child="nvme/nvme0")  # not in use
    seen, loaded = fresh_run(guest, manifest((9, [mdev("0000:82:00.0", NVME)])))
    assert guest.given() == ["0000:00:05.0"]
    assert guest.fs.driver("0000:00:05.0") == "vfio-pci"
    assert "kata_vfio.threads" not in loaded and "_thread" not in seen
    assert {"kata_vfio_hook.give", "kata_vfio.rebind", "kata_vfio.blockuse"} <= loaded


def test_a_nic_is_checked_without_loading_the_block_device_tables(guest: Guest) -> None:
    """A NIC (DPDK's case) has no block devices below it: the tables of what uses block
    devices (mounts, swaps, holders) are neither read nor their module loaded."""
    _, loaded = fresh_run(guest, manifest((2, [mdev("0000:83:00.0")])))
    assert len(guest.given()) == 1
    assert "kata_vfio.blockuse" not in loaded and "kata_vfio_hook.vmdeps" in loaded
