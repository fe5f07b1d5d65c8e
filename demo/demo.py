#!/usr/bin/env python3
"""`make demo`: a DPDK program driving its devices from inside the container, the whole
path explained as it goes (tests/dpdk_one_level.py, which tests/e2e/test_dpdk_vm.py checks).

1. podman runs dpdk-testpmd with `--runtime kata-vfio`: the wrapper edits podman's spec
   (its host is a fake sysfs: this machine has no IOMMU; a stand-in records the spec
   Kata would get: there is no Kata in any registry).
2. The spec is changed as Kata 1.x changes it on its way to its agent.
3. A QEMU q35 guest with intel-iommu boots `make initrd`'s image (TCG) with two e1000e.
4. runc in the guest, standing in for kata-agent, runs kata-vfio-hook as the prestart hook.
5. testpmd in the container probes both NICs through vfio-pci and forwards between them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "vm")]
import dpdk_one_level as one_level  # noqa: E402
from dpdk import port_stats  # noqa: E402
from dpdk_one_level import GUEST_ADDRESSES, HOST_NICS, IMAGE, Missing, RunFailed  # noqa: E402
from kata_vfio.manifest import (  # noqa: E402
    GUEST_HOOK_PATH_ANNOTATION,
    MANIFEST_ANNOTATION,
)


class DemoFailed(Exception):
    """A step did not happen; the message says which."""


def show_host(spec: dict[str, Any]) -> None:
    print(
        f"== 1. host: podman run --runtime kata-vfio --annotation "
        f"io.kata-vfio.devices={','.join(HOST_NICS)} {IMAGE} sh -c 'dpdk-testpmd …'"
    )
    print(
        "   podman starts our wrapper as its OCI runtime; the wrapper edits podman's "
        "config.json\n   and hands it to Kata (here a stand-in that records it). The host "
        "view is a fake\n   sysfs (no IOMMU here): two e1000e on vfio-pci, an IOMMU group "
        "each."
    )
    manifest = json.loads(spec["annotations"][MANIFEST_ANNOTATION])
    for group in manifest["groups"]:
        names = ", ".join(
            f"{d['host_address']} [{d['vendor'][2:]}:{d['device'][2:]}]" for d in group["devices"]
        )
        print(f"   host IOMMU group {group['host_group']}: {names}")
    print("   what the wrapper added to the spec:")
    nodes = [d["path"] for d in spec["linux"]["devices"] if d["path"].startswith("/dev/vfio")]
    print(f"     linux.devices: {' '.join(nodes)} (Kata hot-plugs these groups into the VM)")
    memlock = [r for r in spec["process"]["rlimits"] if r["type"] == "RLIMIT_MEMLOCK"]
    if memlock and memlock[0]["hard"] == 2**64 - 1:
        print("     process.rlimits: RLIMIT_MEMLOCK unlimited (DPDK locks its DMA memory)")
    if any(m["destination"] == "/run/dpdk" and m["type"] == "tmpfs" for m in spec["mounts"]):
        print("     mounts: a tmpfs on /run/dpdk (DPDK's socket; Kata 1.x's 9p rootfs takes none)")
    print(
        f"     annotations: {MANIFEST_ANNOTATION} (the groups above, for the guest hook),\n"
        f"       guest_hook_path = {spec['annotations'][GUEST_HOOK_PATH_ANNOTATION]} "
        "(where kata-agent finds kata-vfio-hook)"
    )


def show_agent_spec(changes: list[str]) -> None:
    print(
        "\n== 2. Kata 1.x's changes on the spec's way to its agent "
        f"(made here as Kata makes them: {len(changes)})"
    )
    for change in changes:
        if "/dev/vfio" in change or "hooks.prestart" in change:
            print(f"   {change}")
    print("   (the guest numbers its IOMMU groups its own way: the hook makes their nodes)")


def show_guest(guest: one_level.Guest, created: one_level.Created) -> None:
    print(f"   guest booted in {guest.run.find('booted')['uptime']} s (guest clock)")
    before = guest.before(created)
    for addr in GUEST_ADDRESSES:
        ids = before["ids"][addr]
        print(
            f"   guest {addr} [{ids[0][2:]}:{ids[1][2:]}] IOMMU group "
            f"{before['groups'][addr]}, driver {before['drivers_before'][addr]}"
        )


def show_hook(result: dict[str, Any]) -> None:
    print(
        "\n== 4. runc (for kata-agent) creates the container; kata-vfio-hook runs as its "
        "prestart hook"
    )
    for entry in result["hook_log"]:
        if entry["event"] == "found":
            print(
                f"   found host {entry['host_address']} as guest {entry['guest_address']} "
                f"(on {entry['driver']})"
            )
        elif entry["event"] == "bind":
            print(
                f"   bound {entry['guest_address']}: {entry['from_driver']} -> vfio-pci "
                f"in {entry['ms']:.0f} ms"
            )
        elif entry["event"] == "group mapping":
            print(f"   host group -> guest group: {entry['host_to_guest']}")
        elif entry["event"] == "done":
            print(f"   hook done in {entry['total_ms']:.0f} ms")
        elif entry["level"] == "error":
            print(f"   hook failed: {entry.get('error')}")


def show_testpmd(out: str) -> None:
    """The container's own lines and testpmd's port statistics; DemoFailed unless both
    ports received and sent more in the last report than in the first."""
    print("\n== 5. inside the container: testpmd on the ports the hook named in /run/kata-vfio/env")
    lines = out.splitlines()
    if lines and lines[0].startswith("ports:"):
        print(f"   testpmd options from /run/kata-vfio/env:{lines[0][len('ports:') :]}")
        vfio = []
        for name in lines[1:]:  # `ls /dev/vfio`, one name a line
            if not (name == "vfio" or name.isdigit()):
                break
            vfio.append(name)
        print(f"   ls /dev/vfio: {' '.join(vfio)}")
    for line in lines:
        if "Probe PCI driver" in line:
            print(f"   {line.strip()}")
    stats = port_stats(out)
    counts = {port: [(rx, tx) for p, rx, tx in stats if p == port] for port in (0, 1)}
    for port, seen in counts.items():
        if len(seen) >= 2:
            (rx0, tx0), (rx1, tx1) = seen[0], seen[-1]
            print(
                f"   port {port}: RX-packets {rx0} -> {rx1}, TX-packets {tx0} -> {tx1} "
                f"(first and last of {len(seen)} statistics reports, 5 s apart)"
            )
    if not all(len(s) >= 2 and s[-1][0] > s[0][0] and s[-1][1] > s[0][1] for s in counts.values()):
        raise DemoFailed(
            "testpmd did not forward packets between the two ports in the "
            f"container (last port statistics: {stats[-2:] or 'none'})"
        )


def demo(top: Path, initrd: Path, kver: str) -> None:
    timings: dict[str, float] = {}
    with one_level.podman_session(top, timings) as podman:
        created = podman.run_testpmd()
        show_host(created.spec)
        show_agent_spec(one_level.kata1_agent_spec(created.spec, one_level.GUEST_ROOTFS)[1])
        print(
            "\n== 3. booting the guest (QEMU q35 + intel-iommu, TCG) with the kata-vfio "
            "initrd and two\n   e1000e on one hub; runc runs the container, testpmd for "
            f"{one_level.TESTPMD_SECONDS} s ..."
        )
        guest = one_level.boot_guest(initrd, kver, podman, [created], top / "console.log")
    try:
        show_guest(guest, created)
        result = guest.result(created)
    except AssertionError:
        raise DemoFailed("the guest did not report back") from None
    show_hook(result)
    out = result["stdout"] + result["stderr"]
    (top / "testpmd.out").write_text(out)
    if result["rc"] != 0:
        last = (result["stderr"].strip().splitlines() or ["(no output)"])[-1]
        raise DemoFailed(f"the container failed (exit {result['rc']}): {last}")
    show_testpmd(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--kver", required=True)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    started = time.monotonic()
    try:
        one_level.check_ready(args.initrd, args.kver)
    except Missing as err:
        print(f"demo: needs {err}", file=sys.stderr)
        return 1
    top = Path(tempfile.mkdtemp(prefix="kata-vfio-demo.", dir="/var/tmp"))
    try:
        demo(top, args.initrd, args.kver)
    except (DemoFailed, RunFailed, subprocess.CalledProcessError) as err:
        shutil.rmtree(top / "storage", ignore_errors=True)
        if isinstance(err, subprocess.CalledProcessError):
            said = (err.stderr or "").strip().splitlines()
            err = DemoFailed(
                f"{Path(str(err.cmd[0])).name} failed (exit "
                f"{err.returncode}): {said[-1] if said else '(no output)'}"
            )
        print(
            f"demo: {err}; testpmd.out, console.log and the wrapper's log are kept in {top}",
            file=sys.stderr,
        )
        return 1
    shutil.rmtree(top, ignore_errors=True)
    print(
        f"\ndemo done in {time.monotonic() - started:.0f} s: a DPDK program drove two "
        "devices from inside the container."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
