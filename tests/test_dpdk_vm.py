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

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dpdk import TESTPMD_FROM_ENV, port_stats
from kata_vfio.manifest import GUEST_HOOK_PATH_ANNOTATION, MANIFEST_ANNOTATION, Manifest
from kata_vfio.pci import PciIdentity
from kata_vfio_ctl.podman_conf import register

import vmtools
from fakesys import FakeSysfs
from kata import rootfs
from kata.env import HOST_ABSENT, HOTPLUG_TIMEOUT, annotation
from kata.env import HOST_NICS as ALL_HOST_NICS
from kata.harness import run_directory
from vmtools import GuestRun, Scenario

pytestmark = [pytest.mark.vm, pytest.mark.podman]

INITRD = Path(os.environ.get("KATA_VFIO_INITRD", "build/kata-vfio-initrd.img"))
KVER = os.environ.get("KATA_VFIO_KVER", "")
HOST_NICS = ALL_HOST_NICS[:2]
# the guest's two e1000e, on one hub so that each receives what the other sends
GUEST_NICS = (vmtools.e1000e_on_hub("52:54:00:00:00:11", "kvfioh1", addr="0x3"),
              vmtools.e1000e_on_hub("52:54:00:00:00:12", "kvfioh2", addr="0x4"))
GUEST_ADDRESSES = ("0000:00:03.0", "0000:00:04.0")
IMAGE = "localhost/kata-vfio-dpdk-vm"
GUEST_ROOTFS = "/kvfio/ctr/dpdk-rootfs"
TESTPMD_SECONDS = 30
# runc's whole run in the guest: testpmd's 30 s plus the hook, EAL start and port shutdown,
# which took 6 s on an idle machine and 16 s at load 5 (TCG slows with the host)
RUNC_TIMEOUT = 150
ABSENT_MARK = "the absent-device container ran"
UNLIMITED = 2**64 - 1
# podman's binds of host files that Kata shares over 9p (no shared directory here)
HOST_FILE_BINDS = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv")


def _need(ok: bool, what: str) -> None:
    # fail, never skip: a missing piece here is a missing install step (make test has all)
    if not ok:
        pytest.fail(f"the DPDK VM test needs {what}")


@dataclass
class Created:
    """One `podman run` through the wrapper and the spec its inner runtime recorded."""

    cid: str
    returncode: int
    stderr: str
    seconds: float
    spec: dict[str, Any]


@dataclass
class Host:
    top: Path
    rootfs: Path
    dpdk: Created
    absent: Created
    timings: dict[str, float] = field(default_factory=dict)


def podman_host(top: Path, timings: dict[str, float]) -> tuple[list[str], dict[str, str], Path]:
    """podman with `kata-vfio` registered: a launcher of that name carries the config path
    (podman gives runtimes a clean environment and keys runtime features by basename).
    The wrapper's config: the fake host sysfs and the recording inner runtime."""
    fs = FakeSysfs(top / "sys")

    def add(addr: str, ident: PciIdentity, group: int) -> None:
        # the identity QEMU's device shows the guest: what the hook matches on
        fs.add_device(addr, (ident.vendor, ident.device, ident.class_code), group=group,
                      driver="vfio-pci",
                      subsystem=(ident.subsystem_vendor, ident.subsystem_device))
        fs.add_vfio_group(group, minor=group - 12)

    for n, addr in enumerate(HOST_NICS):
        add(addr, GUEST_NICS[n].identity, 12 + n)
    add(HOST_ABSENT, vmtools.NVME_ID, 20)  # a device the guest never gets
    specs = top / "specs"
    specs.mkdir()
    inner = top / "bin/kata-runtime-stand-in"
    inner.parent.mkdir()
    recorder = Path(vmtools.HERE) / "spec-recorder.py"
    inner.write_text(f'#!/bin/sh\nKVFIO_SPEC_DIR={specs} exec /usr/bin/python3 -I -S '
                     f'{recorder} "$@"\n')
    inner.chmod(0o755)
    config = top / "kata-vfio.toml"
    config.write_text(
        f'runtime = "{inner}"\nsysfs = "{fs.root}"\nlog_file = "{top / "kata-vfio.log"}"\n'
        f'state_dir = "{top / "state"}"\nhotplug_timeout = {HOTPLUG_TIMEOUT}\n')
    launcher = top / "bin/kata-vfio"
    wrapper = Path(sys.executable).with_name("kata-vfio")
    _need(wrapper.is_file(), "kata-vfio installed beside this Python (make venv)")
    launcher.write_text(f"#!/bin/sh\nKATA_VFIO_CONFIG={config} exec {wrapper} \"$@\"\n")
    launcher.chmod(0o755)
    conf = top / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    register(conf, str(launcher))
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    base = ["podman", "--root", str(top / "storage"), "--runroot", str(top / "run"),
            "--storage-driver", "vfs", "--runtime", "kata-vfio"]
    t = time.monotonic()
    root = rootfs.dpdk_rootfs(top / "dpdk-rootfs")
    rootfs.import_image(base, env, root, top / "dpdk.tar", IMAGE)
    timings["DPDK image built and imported"] = time.monotonic() - t
    return base, env, specs


def podman_run(base: list[str], env: dict[str, str], specs: Path, *args: str) -> Created:
    """`podman run --rm` through the wrapper; the create fails by design (no Kata)."""
    cidfile = specs.parent / f"cid-{time.monotonic_ns()}"
    started = time.monotonic()
    result = subprocess.run([*base, "run", "--rm", "--cidfile", str(cidfile), *args], env=env,
                            text=True, capture_output=True, timeout=120)
    took = time.monotonic() - started
    cid = cidfile.read_text().strip() if cidfile.exists() else ""
    recorded = specs / f"{cid}.json"
    assert cid and recorded.is_file(), f"no spec recorded ({result.returncode}): {result.stderr}"
    return Created(cid, result.returncode, result.stderr, took, json.loads(recorded.read_text()))


def kata1_agent_spec(spec: dict[str, Any], root: str) -> tuple[dict[str, Any], list[str]]:
    """The spec as kata-agent 1.x would get it, for runc in the guest (see the module's
    docstring), and the list of what changed."""
    out = copy.deepcopy(spec)
    changes: list[str] = []
    out["root"] = {**out.get("root", {}), "path": root}
    changes.append(f"root.path -> {root}")
    if out.pop("hooks", None):
        changes.append("hooks: the host's dropped")
    out["hooks"] = {"prestart": [vmtools.guest_prestart_hook()]}
    changes.append("hooks.prestart: kata-vfio-hook, as the agent adds guest_hook_path's hooks")
    linux = out["linux"]
    if linux.pop("seccomp", None) is not None:
        changes.append("linux.seccomp dropped (disable_guest_seccomp = true)")
    if out["process"].pop("selinuxLabel", None):
        changes.append("process.selinuxLabel cleared")
    resources = linux.get("resources") or {}
    for key in ("devices", "pids", "blockIO", "hugepageLimits", "network"):
        if resources.pop(key, None) is not None:
            changes.append(f"linux.resources.{key} dropped")
    for key in ("cpus", "mems"):
        if (resources.get("cpu") or {}).pop(key, None):
            changes.append(f"linux.resources.cpu.{key} cleared")
    namespaces = []
    for ns in linux.get("namespaces") or []:
        if ns["type"] in ("network", "cgroup"):
            changes.append(f"linux.namespaces: {ns['type']} dropped")
            continue
        if ns.pop("path", None):
            changes.append(f"linux.namespaces: {ns['type']} path emptied")
        namespaces.append(ns)
    linux["namespaces"] = namespaces
    devices = linux.get("devices") or []
    linux["devices"] = [d for d in devices
                        if not (d.get("type") == "c" and d["path"].startswith("/dev/vfio"))]
    changes += [f"linux.devices: {d['path']} removed" for d in devices
                if d not in linux["devices"]]
    mounts = []
    for m in out.get("mounts") or []:
        if m["destination"] == "/dev/shm" and m.get("type") == "bind":
            mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                           "options": ["noexec", "nosuid", "nodev", "mode=1777",
                                       "size=65536k"]})
            changes.append("mounts: /dev/shm bind -> tmpfs (handleShm)")
        elif m.get("type") == "bind":
            changes.append(f"mounts: {m['destination']} (bind of a host file) dropped "
                           "[test-only: Kata shares it over 9p]")
        else:
            mounts.append(m)
    out["mounts"] = mounts
    return out, changes


@pytest.fixture(scope="module")
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    _need(os.geteuid() == 0, "root")
    _need(shutil.which("podman") is not None, "podman (make deps)")
    _need(INITRD.is_file() and bool(KVER) and vmtools.kernel_image(KVER).exists(),
          "`make initrd` (KATA_VFIO_INITRD, KATA_VFIO_KVER): run through make test")
    with run_directory(request, "kata-vfio-dpdk-vm.", "DPDK VM test",
                       drop_when_kept=("storage",)) as top:
        timings: dict[str, float] = {}
        base, env, specs = podman_host(top, timings)
        try:
            # no podman flag beyond the device request: what DPDK needs is the wrapper's
            dpdk = podman_run(base, env, specs, *annotation(*HOST_NICS), IMAGE,
                              "sh", "-c",
                              TESTPMD_FROM_ENV.replace("SECONDS", str(TESTPMD_SECONDS)))
            absent = podman_run(base, env, specs, *annotation(HOST_ABSENT), IMAGE,
                                "echo", ABSENT_MARK)
            timings["podman run (dpdk)"] = dpdk.seconds
            timings["podman run (absent)"] = absent.seconds
            yield Host(top, top / "dpdk-rootfs", dpdk, absent, timings)
        finally:
            subprocess.run([*base, "rm", "--all", "--force"], env=env, capture_output=True,
                           timeout=120)


@dataclass
class Guest:
    run: GuestRun
    specs: dict[str, dict[str, Any]]
    changes: dict[str, list[str]]


@pytest.fixture(scope="module")
def guest(host: Host) -> Guest:
    specs, changes, scenarios = {}, {}, []
    for created in (host.absent, host.dpdk):  # the quick failure first
        spec, changed = kata1_agent_spec(created.spec, GUEST_ROOTFS)
        specs[created.cid], changes[created.cid] = spec, changed
        # the guest's runc names the container as kata-agent does: by podman's id
        scenarios.append(Scenario(created.cid, "", spec=spec,
                                  files={"timeout": str(RUNC_TIMEOUT)}))
    started = time.monotonic()
    run = vmtools.boot(INITRD, KVER, scenarios, devices=GUEST_NICS, memory_mb=1536,
                       timeout=300, console_log=host.top / "console.log",
                       trees={GUEST_ROOTFS: host.rootfs})
    host.timings["guest: archive, boot, both containers"] = time.monotonic() - started
    for created in (host.absent, host.dpdk):
        result = next((r for r in run.records if r.get("event") == "result"
                       and r.get("name") == created.cid), None)
        if result is not None:
            host.timings[f"guest runc run ({'dpdk' if created is host.dpdk else 'absent'})"] \
                = result["seconds"]
    print(f"\nDPDK VM test timings (s): "
          f"{json.dumps({k: round(v, 1) for k, v in host.timings.items()})}")
    print(f"agent stand-in changes (dpdk): {json.dumps(changes[host.dpdk.cid], indent=1)}")
    (host.top / "guest-records.json").write_text(json.dumps(run.records, indent=1))
    return Guest(run, specs, changes)


def test_wrapper_gave_the_spec_what_dpdk_needs(host: Host) -> None:
    created = host.dpdk
    # the wrapper exec'd its inner runtime with the edited spec: podman fails the create
    # with the recorder's line (podman's exit code for an OCI runtime error)
    assert created.returncode == 126, created.stderr
    assert "Error: OCI runtime error: kata-vfio: spec-recorder: recorded the spec for Kata" \
        in created.stderr, created.stderr
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
        assert [m["type"] for m in spec["mounts"] if m["destination"] == "/run/dpdk"] == \
            ["tmpfs"], spec["mounts"]
        assert not [d for d in spec["linux"]["devices"] if d["path"].startswith("/dev/vfio")]
        dropped = [c for c in guest.changes[created.cid] if "test-only" in c]
        assert all(any(f" {p} " in c for p in HOST_FILE_BINDS) for c in dropped), dropped


def result_of(guest: Guest, created: Created) -> dict[str, Any]:
    return guest.run.find("result", created.cid)


def test_hook_gives_the_container_only_its_own_groups(host: Host, guest: Guest) -> None:
    before = guest.run.find("scenario", host.dpdk.cid)["drivers_before"]
    assert [before[a] for a in GUEST_ADDRESSES] == ["e1000e", "e1000e"]
    result = result_of(guest, host.dpdk)
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
    result = result_of(guest, host.dpdk)
    out = result["stdout"] + result["stderr"]
    (host.top / "testpmd.out").write_text(out)
    assert result["rc"] == 0, out + guest.run.console[-3000:]
    assert "Cannot set up DMA remapping" not in out, out
    for addr in GUEST_ADDRESSES:
        assert re.search(rf"Probe PCI driver: net_e1000_em \(8086:10d3\) device: {addr}", out), \
            out
    stats = port_stats(out)
    print(f"\ntestpmd in the guest: {len(stats)} port statistics, last: {stats[-2:]}")
    for port in (0, 1):
        mine = [(rx, tx) for p, rx, tx in stats if p == port]
        assert len(mine) >= 2, out
        assert mine[-1][0] > 0 and mine[-1][1] > 0, out
        assert mine[-1][0] > mine[0][0] and mine[-1][1] > mine[0][1], out


def test_absent_device_fails_the_container_with_the_hooks_line(host: Host,
                                                                guest: Guest) -> None:
    result = result_of(guest, host.absent)
    assert result["rc"] != 0
    assert (f"kata-vfio-hook: host device {HOST_ABSENT} [1b36:0010 class 010802] not found "
            f"in the guest after {HOTPLUG_TIMEOUT:g} s") in result["stderr"], result["stderr"]
    assert ABSENT_MARK not in result["stdout"]
    # the whole runc run, hook included, ends before kata-agent would kill the hook (10 s)
    assert result["seconds"] < 10, result["seconds"]
    failed = [e for e in result["hook_log"] if e["event"] == "failed"]
    assert failed and failed[-1]["container_id"] == host.absent.cid, result["hook_log"]
    before = guest.run.find("scenario", host.absent.cid)["drivers_before"]
    assert result["drivers_after"] == before
