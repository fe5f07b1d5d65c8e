"""The one-level DPDK path without Kata, shared by tests/e2e/test_dpdk_vm.py and `make demo`.

podman 4.3 runs `--runtime kata-vfio` (our wrapper, registered with kata-vfio-ctl's own
code; its host view of PCI is a fake sysfs and its inner runtime a spec recorder standing
in for kata-runtime); the recorded spec is changed as Kata 1.x changes it on its way to
the agent (`kata1_agent_spec`); a QEMU/TCG guest booted from `make initrd`'s image runs it
with runc and kata-vfio-hook, and dpdk-testpmd forwards between the guest's two e1000e.
tests/e2e/test_dpdk_vm.py's docstring says what is real and what stands in for Kata.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpdk import TESTPMD_FROM_ENV
from kata_vfio.pci import PciIdentity
from kata_vfio_ctl.podman_conf import register

import vmtools
from fakesys import FakeSysfs
from kata import harness, rootfs
from kata.env import HOST_ABSENT, HOTPLUG_TIMEOUT, annotation
from kata.env import HOST_NICS as ALL_HOST_NICS
from vmtools import GuestRun, Scenario

HOST_NICS = ALL_HOST_NICS[:2]
# the guest's two e1000e, on one hub so that each receives what the other sends
GUEST_NICS = (
    vmtools.e1000e_on_hub("52:54:00:00:00:11", "kvfioh1", addr="0x3"),
    vmtools.e1000e_on_hub("52:54:00:00:00:12", "kvfioh2", addr="0x4"),
)
GUEST_ADDRESSES = ("0000:00:03.0", "0000:00:04.0")
IMAGE = "localhost/kata-vfio-dpdk-vm"
GUEST_ROOTFS = "/kvfio/ctr/dpdk-rootfs"
TESTPMD_SECONDS = 30
# runc's whole run in the guest: testpmd's 30 s plus the hook, EAL start and port shutdown,
# which took 6 s on an idle machine and 16 s at load 5 (TCG slows with the host)
RUNC_TIMEOUT = 150


class Missing(Exception):
    """A piece of the set-up is not installed; the message names it and its make target."""


class RunFailed(Exception):
    """A step of the path did not happen; the message says which."""


def check_ready(initrd: Path, kver: str) -> None:
    """Raise Missing for the first thing this path needs that is not there."""
    if os.geteuid() != 0:
        raise Missing("root")
    if shutil.which("podman") is None:
        raise Missing("podman (make deps)")
    if not (initrd.is_file() and kver and vmtools.kernel_image(kver).exists()):
        raise Missing(
            "the guest image and kernel (`make initrd`; KATA_VFIO_INITRD, KATA_VFIO_KVER)"
        )
    if not wrapper().is_file():
        raise Missing("kata-vfio installed beside this Python (make venv)")


def wrapper() -> Path:
    return Path(sys.executable).with_name("kata-vfio")


@dataclass
class Created:
    """One `podman run` through the wrapper and the spec its inner runtime recorded."""

    cid: str
    returncode: int
    stderr: str
    seconds: float
    spec: dict[str, Any]


@dataclass
class Podman:
    """podman with `kata-vfio` registered, its storage and the DPDK image under `top`."""

    base: list[str]
    env: dict[str, str]
    specs: Path
    rootfs: Path

    def run(self, *args: str) -> Created:
        """`podman run --rm` through the wrapper; the create fails by design (no Kata)."""
        cidfile = self.specs.parent / f"cid-{time.monotonic_ns()}"
        started = time.monotonic()
        result = subprocess.run(
            [*self.base, "run", "--rm", "--cidfile", str(cidfile), *args],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=120,
        )
        took = time.monotonic() - started
        cid = cidfile.read_text().strip() if cidfile.exists() else ""
        recorded = self.specs / f"{cid}.json"
        if not (cid and recorded.is_file()):
            raise RunFailed(
                f"podman recorded no spec (exit {result.returncode}): {result.stderr.strip()}"
            )
        return Created(
            cid, result.returncode, result.stderr, took, json.loads(recorded.read_text())
        )

    def run_testpmd(self, seconds: int = TESTPMD_SECONDS) -> Created:
        """testpmd on the two NICs, with no podman flag beyond the device request: what
        DPDK needs is the wrapper's."""
        return self.run(
            *annotation(*HOST_NICS),
            IMAGE,
            "sh",
            "-c",
            TESTPMD_FROM_ENV.replace("SECONDS", str(seconds)),
        )


def _fake_host(top: Path) -> Path:
    """The host's PCI view: the two NICs on vfio-pci, a group each, with the identity QEMU's
    e1000e shows the guest (what the hook matches on), and an NVMe the guest never gets."""
    fs = FakeSysfs(top / "sys")

    def add(addr: str, ident: PciIdentity, group: int) -> None:
        fs.add_device(
            addr,
            (ident.vendor, ident.device, ident.class_code),
            group=group,
            driver="vfio-pci",
            subsystem=(ident.subsystem_vendor, ident.subsystem_device),
        )
        fs.add_vfio_group(group, minor=group - 12)

    for n, addr in enumerate(HOST_NICS):
        add(addr, GUEST_NICS[n].identity, 12 + n)
    add(HOST_ABSENT, vmtools.NVME_ID, 20)
    return fs.root


@contextlib.contextmanager
def podman_session(top: Path, timings: dict[str, float]) -> Iterator[Podman]:
    """podman with `kata-vfio` registered: a launcher of that name carries the config path
    (podman gives runtimes a clean environment and keys runtime features by basename).
    The wrapper's config: the fake host sysfs and the recording inner runtime. The DPDK
    image is built and imported; every container is removed at the end."""
    sysfs = _fake_host(top)
    specs = top / "specs"
    specs.mkdir()
    inner = top / "bin/kata-runtime-stand-in"
    inner.parent.mkdir()
    recorder = Path(vmtools.HERE) / "spec-recorder.py"
    inner.write_text(
        f'#!/bin/sh\nKVFIO_SPEC_DIR={specs} exec /usr/bin/python3 -I -S {recorder} "$@"\n'
    )
    inner.chmod(0o755)
    _, launcher = harness.write_wrapper_launcher(top, wrapper(), inner, sysfs, HOTPLUG_TIMEOUT)
    conf = top / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    register(conf, str(launcher))
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    base = [
        "podman",
        "--root",
        str(top / "storage"),
        "--runroot",
        str(top / "run"),
        "--storage-driver",
        "vfs",
        "--runtime",
        "kata-vfio",
    ]
    try:
        t = time.monotonic()
        root = rootfs.dpdk_rootfs(top / "dpdk-rootfs")
        rootfs.import_image(base, env, root, top / "dpdk.tar", IMAGE)
        timings["DPDK image built and imported"] = time.monotonic() - t
        yield Podman(base, env, specs, root)
    finally:
        subprocess.run([*base, "rm", "--all", "--force"], env=env, capture_output=True, timeout=120)


def kata1_agent_spec(spec: dict[str, Any], root: str) -> tuple[dict[str, Any], list[str]]:
    """The spec as kata-agent 1.x would get it, for runc in the guest (see
    tests/e2e/test_dpdk_vm.py's docstring), and the list of what changed."""
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
    linux["devices"] = [
        d for d in devices if not (d.get("type") == "c" and d["path"].startswith("/dev/vfio"))
    ]
    changes += [f"linux.devices: {d['path']} removed" for d in devices if d not in linux["devices"]]
    mounts = []
    for m in out.get("mounts") or []:
        if m["destination"] == "/dev/shm" and m.get("type") == "bind":
            mounts.append(
                {
                    "destination": "/dev/shm",
                    "type": "tmpfs",
                    "source": "shm",
                    "options": ["noexec", "nosuid", "nodev", "mode=1777", "size=65536k"],
                }
            )
            changes.append("mounts: /dev/shm bind -> tmpfs (handleShm)")
        elif m.get("type") == "bind":
            changes.append(
                f"mounts: {m['destination']} (bind of a host file) dropped "
                "[test-only: Kata shares it over 9p]"
            )
        else:
            mounts.append(m)
    out["mounts"] = mounts
    return out, changes


@dataclass
class Guest:
    """One guest boot that ran the recorded containers, in order, and the specs it ran."""

    run: GuestRun
    specs: dict[str, dict[str, Any]]
    changes: dict[str, list[str]]

    def result(self, created: Created) -> dict[str, Any]:
        return self.run.find("result", created.cid)

    def before(self, created: Created) -> dict[str, Any]:
        return self.run.find("scenario", created.cid)


def boot_guest(
    initrd: Path, kver: str, podman: Podman, created: list[Created], console_log: Path
) -> Guest:
    """Boot the TCG guest with the two e1000e and run each recorded spec, changed as Kata
    1.x changes it, with runc and our hook (the guest's runc names each container by
    podman's id, as kata-agent does)."""
    specs, changes, scenarios = {}, {}, []
    for one in created:
        spec, changed = kata1_agent_spec(one.spec, GUEST_ROOTFS)
        specs[one.cid], changes[one.cid] = spec, changed
        scenarios.append(Scenario(one.cid, "", spec=spec, files={"timeout": str(RUNC_TIMEOUT)}))
    run = vmtools.boot(
        initrd,
        kver,
        scenarios,
        devices=GUEST_NICS,
        memory_mb=1536,
        timeout=300,
        console_log=console_log,
        trees={GUEST_ROOTFS: podman.rootfs},
    )
    return Guest(run, specs, changes)
