"""The DPDK promise, one level, no Kata: podman's real spec, edited by the real wrapper,
run in a TCG guest by runc with our hook, and dpdk-testpmd forwarding in the container.

Real: podman 4.3 + conmon running `--runtime kata-vfio` (our wrapper, registered with
kata-vfio-ctl's own code) for `podman run --rm --annotation io.kata-vfio.devices=… IMAGE
dpdk-testpmd …` with no other flag; the wrapper's edit of podman's config.json (its host
view of PCI is a fake sysfs: two e1000e 8086:10d3 on vfio-pci, a group each, with the
identity of QEMU's e1000e, and an NVMe the guest never gets); QEMU q35 + intel-iommu under
TCG booting `make initrd`'s image (vmtools appends runc, the scenarios and the container's
root filesystem: tests/kata/rootfs.py's DPDK image); two e1000e on one QEMU hub; Debian's
kernel with its e1000e and vfio-pci; Debian's runc running the spec with our
kata-vfio-hook as its OCI prestart hook ([name, "prestart"], empty environment, the OCI
state on stdin); Debian's dpdk-testpmd probing both ports through net_e1000_em and
forwarding between them.

Stand-ins for Kata (there is none in any registry):
- kata-runtime on the host: tests/vm/spec-recorder.py, the wrapper's inner runtime, copies
  the bundle's config.json it is given (what Kata would receive) and fails the create
  (runc cannot run that spec on this host: it may not raise RLIMIT_MEMLOCK to unlimited).
- Kata's hot-plug: the guest has the two e1000e from boot.
- kata-agent: runc, fed the recorded spec changed as Kata 1.x changes it on its way to the
  agent (`kata1_agent_spec`, which returns the list of its changes; the test prints it):
  * as Kata 1.x's runtime does (virtcontainers/kata_agent.go `constraintGRPCSpec`,
    `handleShm`, `createContainer`): `root.path` -> the container's root filesystem in the
    guest; `hooks` dropped (host hooks) and our hook added as the agent adds the hooks of
    `guest_hook_path`; `linux.seccomp` dropped (Kata's default `disable_guest_seccomp =
    true`); `process.selinuxLabel` cleared; `linux.resources` devices, pids, blockIO,
    hugepageLimits and network dropped, CPU cpus/mems cleared; the network and cgroup
    namespaces dropped, every other namespace's path emptied; `/dev/vfio/*` char devices
    removed from `linux.devices`; `/dev/shm` (a bind of a host directory) -> a tmpfs, as
    `handleShm` does for a sandbox without shared shm;
  * test-only: podman's other bind mounts of host files (`/etc/hosts`, `/etc/hostname`,
    `/etc/resolv.conf`, `/run/.containerenv`) are dropped: Kata shares them with the
    guest over 9p and points their sources at the guest's copies; there is no shared
    directory here.
  Untouched, and checked to be: the process (args, env, capabilities, rlimits with the
  wrapper's RLIMIT_MEMLOCK), the annotations (the wrapper's manifest), the wrapper's
  `/run/dpdk` tmpfs and every other non-bind mount, `linux.cgroupsPath`.

The set-up (podman, the wrapper's configuration, the fake host, the agent stand-in, the
guest) is tests/dpdk_one_level.py, which `make demo` runs too; the assertions are here.

testpmd's `-a` options come from the hook's /run/kata-vfio/env (`sed` as the README
shows it), not from a scan of /sys.

One guest runs both containers: the absent-device one first (its hook waits
`hotplug_timeout` = 1 s and fails the container with its own line), then testpmd.

What made testpmd work is the wrapper's spec: without its RLIMIT_MEMLOCK the same run
fails in the guest with "EAL: Cannot set up DMA remapping, error 12" and no probed port
(checked by hand with `raise_memlock = false`). The /run/dpdk tmpfs is checked in the
spec only: the guest's rootfs lies in the initramfs, where DPDK can bind its socket
anyway (on Kata 1.x's 9p rootfs it cannot).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dpdk import port_stats
from dpdk_one_level import (
    GUEST_ADDRESSES,
    HOST_NICS,
    IMAGE,
    Created,
    Guest,
    Missing,
    Podman,
    boot_guest,
    check_ready,
    podman_session,
)
from kata_vfio.manifest import GUEST_HOOK_PATH_ANNOTATION, MANIFEST_ANNOTATION, Manifest

from kata.env import HOST_ABSENT, HOTPLUG_TIMEOUT, annotation
from kata.harness import run_directory

pytestmark = [pytest.mark.vm, pytest.mark.podman]

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
ABSENT_MARK = "the absent-device container ran"
UNLIMITED = 2**64 - 1
# podman's binds of host files that Kata shares over 9p (no shared directory here)
HOST_FILE_BINDS = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv")


@dataclass
class Host:
    top: Path
    podman: Podman
    dpdk: Created
    absent: Created
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    # fail, never skip: a missing piece here is a missing install step (make test has all)
    try:
        check_ready(INITRD, KVER)
    except Missing as err:
        pytest.fail(f"the DPDK VM test needs {err}")
    with run_directory(
        request, "kata-vfio-dpdk-vm.", "DPDK VM test", drop_when_kept=("storage",)
    ) as top:
        timings: dict[str, float] = {}
        with podman_session(top, timings) as podman:
            dpdk = podman.run_testpmd()
            absent = podman.run(*annotation(HOST_ABSENT), IMAGE, "echo", ABSENT_MARK)
            timings["podman run (dpdk)"] = dpdk.seconds
            timings["podman run (absent)"] = absent.seconds
            yield Host(top, podman, dpdk, absent, timings)


@pytest.fixture(scope="module")
def guest(host: Host) -> Guest:
    started = time.monotonic()
    # the quick failure first
    guest = boot_guest(
        INITRD, KVER, host.podman, [host.absent, host.dpdk], host.top / "console.log"
    )
    host.timings["guest: archive, boot, both containers"] = time.monotonic() - started
    for created in (host.absent, host.dpdk):
        result = next(
            (
                r
                for r in guest.run.records
                if r.get("event") == "result" and r.get("name") == created.cid
            ),
            None,
        )
        if result is not None:
            host.timings[f"guest runc run ({'dpdk' if created is host.dpdk else 'absent'})"] = (
                result["seconds"]
            )
    print(
        f"\nDPDK VM test timings (s): "
        f"{json.dumps({k: round(v, 1) for k, v in host.timings.items()})}"
    )
    print(f"agent stand-in changes (dpdk): {json.dumps(guest.changes[host.dpdk.cid], indent=1)}")
    (host.top / "guest-records.json").write_text(json.dumps(guest.run.records, indent=1))
    return guest


def test_wrapper_gave_the_spec_what_dpdk_needs(host: Host) -> None:
    created = host.dpdk
    # the wrapper exec'd its inner runtime with the edited spec: podman fails the create
    # with the recorder's line (podman's exit code for an OCI runtime error)
    assert created.returncode == 126, created.stderr
    assert (
        "Error: OCI runtime error: kata-vfio: spec-recorder: recorded the spec for Kata"
        in created.stderr
    ), created.stderr
    process = created.spec["process"]
    memlock = [r for r in process["rlimits"] if r["type"] == "RLIMIT_MEMLOCK"]
    assert memlock == [{"type": "RLIMIT_MEMLOCK", "hard": UNLIMITED, "soft": UNLIMITED}]
    for kind, caps in process["capabilities"].items():
        assert "CAP_IPC_LOCK" not in caps, (kind, caps)
    mounts = {m["destination"]: m for m in created.spec["mounts"]}
    assert mounts["/run/dpdk"]["type"] == "tmpfs"
    assert "/run" not in mounts and "/var/run" not in mounts
    annotations = created.spec["annotations"]
    manifest = Manifest.from_json(annotations[MANIFEST_ANNOTATION])
    assert [str(d.host_address) for d in manifest.devices] == list(HOST_NICS)
    assert annotations[GUEST_HOOK_PATH_ANNOTATION] == "/usr/share/oci/hooks"


def test_agent_stand_in_keeps_the_wrappers_additions(host: Host, guest: Guest) -> None:
    for created in (host.dpdk, host.absent):
        spec = guest.specs[created.cid]
        assert spec["process"] == created.spec["process"]
        assert spec["annotations"] == created.spec["annotations"]
        # every mount that is not a bind of a host path, the wrapper's /run/dpdk included
        kept = [m for m in created.spec["mounts"] if m["type"] != "bind"]
        assert [m for m in spec["mounts"] if m in kept] == kept
        assert [m["type"] for m in spec["mounts"] if m["destination"] == "/run/dpdk"] == [
            "tmpfs"
        ], spec["mounts"]
        assert not [d for d in spec["linux"]["devices"] if d["path"].startswith("/dev/vfio")]
        dropped = [c for c in guest.changes[created.cid] if "test-only" in c]
        assert all(any(f" {p} " in c for p in HOST_FILE_BINDS) for c in dropped), dropped


def test_hook_gives_the_container_only_its_own_groups(host: Host, guest: Guest) -> None:
    before = guest.before(host.dpdk)["drivers_before"]
    assert [before[a] for a in GUEST_ADDRESSES] == ["e1000e", "e1000e"]
    result = guest.result(host.dpdk)
    assert [result["drivers_after"][a] for a in GUEST_ADDRESSES] == ["vfio-pci", "vfio-pci"]
    lines = result["stdout"].splitlines()
    # testpmd's -a options, from the hook's /run/kata-vfio/env: the guest addresses
    assert lines[0].split() == ["ports:", *[x for a in GUEST_ADDRESSES for x in ("-a", a)]]
    own = sorted(result["groups"][a] for a in GUEST_ADDRESSES)
    listed = lines[1 : 1 + len(own) + 1]  # `ls /dev/vfio`, one name a line
    assert sorted(listed) == sorted([*own, "vfio"]), lines[:5]
    done = [e for e in result["hook_log"] if e["event"] == "done"]
    assert done and done[-1]["container_id"] == host.dpdk.cid, result["hook_log"]
    assert done[-1]["host_to_guest"] == dict(zip(HOST_NICS, GUEST_ADDRESSES, strict=True))


def test_testpmd_forwards_between_the_two_e1000e(host: Host, guest: Guest) -> None:
    result = guest.result(host.dpdk)
    out = result["stdout"] + result["stderr"]
    (host.top / "testpmd.out").write_text(out)
    assert result["rc"] == 0, out + guest.run.console[-3000:]
    assert "Cannot set up DMA remapping" not in out, out
    for addr in GUEST_ADDRESSES:
        assert re.search(rf"Probe PCI driver: net_e1000_em \(8086:10d3\) device: {addr}", out), out
    stats = port_stats(out)
    print(f"\ntestpmd in the guest: {len(stats)} port statistics, last: {stats[-2:]}")
    for port in (0, 1):
        mine = [(rx, tx) for p, rx, tx in stats if p == port]
        assert len(mine) >= 2, out
        assert mine[-1][0] > 0 and mine[-1][1] > 0, out
        assert mine[-1][0] > mine[0][0] and mine[-1][1] > mine[0][1], out


def test_absent_device_fails_the_container_with_the_hooks_line(host: Host, guest: Guest) -> None:
    result = guest.result(host.absent)
    assert result["rc"] != 0
    assert (
        f"kata-vfio-hook: host device {HOST_ABSENT} [1b36:0010 class 010802] not found "
        f"in the guest after {HOTPLUG_TIMEOUT:g} s"
    ) in result["stderr"], result["stderr"]
    assert ABSENT_MARK not in result["stdout"]
    # the whole runc run, hook included, ends before kata-agent would kill the hook (10 s)
    assert result["seconds"] < 10, result["seconds"]
    failed = [e for e in result["hook_log"] if e["event"] == "failed"]
    assert failed and failed[-1]["container_id"] == host.absent.cid, result["hook_log"]
    before = guest.before(host.absent)["drivers_before"]
    assert result["drivers_after"] == before
