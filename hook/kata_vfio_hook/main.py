"""`kata-vfio-hook`: the OCI prestart hook that gives a Kata container its VFIO devices.

kata-agent runs it as ``[name, "prestart"]`` with an empty environment and the OCI
state on stdin, after the rootfs is ready and before pivot_root, and kills it
after 10 s. Most containers have no VFIO devices: for them it reads stdin, finds
no manifest and exits, having imported the standard library's json only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from kata_vfio.errors import HookError, KataVfioError
from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import MANIFEST_ANNOTATION, Manifest, ManifestDevice
from kata_vfio.pci import VFIO_PCI, PciAddress, PciDevice, is_vfio_driver
from kata_vfio.rebind import MODPROBE, SysfsWrite, write_attr

PROG = "kata-vfio-hook"
LOG_PATH = Path("/tmp/kata-vfio-hook.log")
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class State(NamedTuple):
    """The OCI state the runtime passes on stdin."""

    id: str
    pid: int
    bundle: str
    annotations: dict[str, str]


class GuestRoots(NamedTuple):
    """Where the guest's kernel interfaces are (fake trees in tests)."""

    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")
    cgroupfs: Path = Path("/sys/fs/cgroup")
    libcontainer: Path = Path("/run/libcontainer")
    modprobe: tuple[str, ...] = MODPROBE
    via_proc_root: bool = True  # reach the rootfs through /proc/<pid>/root (its mount ns)
    write: SysfsWrite = write_attr  # the seam tests put a fake kernel behind
    uevents: bool = True  # False: fake trees send no uevents, re-check by polling


class Outcome:
    def __init__(self) -> None:
        self.mapping: dict[str, str] = {}   # host address -> guest address
        self.groups: dict[str, str] = {}    # host group -> guest group
        self.steps_ms: dict[str, float] = {}


def parse_state(text: str) -> State:
    try:
        data = json.loads(text)
    except ValueError:
        raise HookError("stdin is not the OCI state JSON",
                        "run me as an OCI prestart hook") from None
    if not isinstance(data, dict):
        raise HookError("stdin is not the OCI state JSON", "run me as an OCI prestart hook")
    cid, pid, bundle = data.get("id"), data.get("pid"), data.get("bundle")
    if not isinstance(cid, str) or not cid or not set(cid) <= _ID_CHARS or cid.startswith("."):
        raise HookError(f"OCI state has no usable container id ({cid!r})",
                        "run me as an OCI prestart hook")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise HookError(f"OCI state of {cid} has no container pid",
                        "run me as a prestart hook, when the container's init exists")
    annotations = data.get("annotations") or {}
    return State(cid, pid, bundle if isinstance(bundle, str) else "",
                 annotations if isinstance(annotations, dict) else {})


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_manifest(state: State, roots: GuestRoots) -> tuple[Manifest, dict[str, Any]] | None:
    """The manifest from the state's annotations, the bundle's config.json, or Kata 1.x's
    copy under /run/libcontainer; with the spec (empty if none could be read)."""
    specs = []
    if state.bundle:
        specs.append(Path(state.bundle) / "config.json")
    specs.append(roots.libcontainer / state.id / "config.json")
    spec: dict[str, Any] = {}
    for path in specs:
        loaded = _load_json(path)
        if loaded is not None:
            spec = loaded
            break
    text = state.annotations.get(MANIFEST_ANNOTATION)
    if text is None:
        text = (spec.get("annotations") or {}).get(MANIFEST_ANNOTATION)
    if not text:
        return None
    return Manifest.from_json(text), spec


def _describe(want: ManifestDevice) -> str:
    return (f"{want.host_address} [{want.identity.describe()}"
            f"{' mac ' + want.mac if want.mac else ''}]")


def locate(manifest: Manifest, roots: GuestRoots, wakeups: Any) -> list[PciDevice]:
    """The guest device for each manifest device, waiting (bounded) for late hot-plugs."""
    from kata_vfio_hook.events import wait_for
    from kata_vfio_hook.match import assign, scan

    wanted = manifest.devices
    missing: list[int] = []

    def attempt() -> list[PciDevice] | None:
        nonlocal missing
        found, missing = assign(roots.sysfs, wanted, scan(roots.sysfs))
        return [found[i] for i in range(len(wanted))] if not missing else None

    devices = wait_for(attempt, wakeups, manifest.hotplug_timeout)
    if devices is None:
        names = ", ".join(_describe(wanted[i]) for i in missing)
        raise HookError(
            f"host device {names} not found in the guest after {manifest.hotplug_timeout:g} s",
            "was it passed to the VM? check the hypervisor log and the guest's PCI devices")
    return devices


def ensure_vfio_driver(roots: GuestRoots) -> None:
    from kata_vfio.rebind import load_vfio_pci

    if not load_vfio_pci(roots.sysfs, roots.modprobe):
        raise HookError("the vfio-pci driver is not available in the guest",
                        "build the guest image with kata-vfio's dracut module (make initrd)")


def bind_all(roots: GuestRoots, devices: list[PciDevice], log: JsonLog) -> None:
    """Rebind every device to vfio-pci concurrently; on any failure give them all back."""
    import threading

    from kata_vfio.rebind import bind_to, give_back

    errors: dict[PciAddress, KataVfioError | OSError] = {}

    def bind(dev: PciDevice) -> None:
        started = time.monotonic()
        try:
            bind_to(roots.sysfs, dev.address, VFIO_PCI, roots.write)
        except (KataVfioError, OSError) as exc:
            errors[dev.address] = exc
        log.info("bind", guest_address=str(dev.address), from_driver=dev.driver,
                 ok=dev.address not in errors, ms=round((time.monotonic() - started) * 1e3, 3))

    threads = [threading.Thread(target=bind, args=(d,)) for d in devices
               if not is_vfio_driver(d.driver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not errors:
        return
    for dev in devices:  # all or nothing: each device back where it was
        if not is_vfio_driver(dev.driver):
            try:
                give_back(roots.sysfs, dev.address, dev.driver, dev.driver_override,
                          roots.write)
            except (KataVfioError, OSError) as exc:
                log.error("give back failed", guest_address=str(dev.address), error=str(exc))
    failed, failure = next(iter(errors.items()))
    detail = failure.one_line() if isinstance(failure, KataVfioError) else str(failure)
    raise HookError(f"cannot bind guest device {failed} to vfio-pci: {detail}",
                    "devices were given back to their drivers")


def check_groups(roots: GuestRoots, devices: list[PciDevice]) -> list[int]:
    """Guest groups of the devices, each with every member usable by VFIO."""
    from kata_vfio.pci import group_members, group_of, read_device, usable_by_vfio

    groups = sorted({group_of(roots.sysfs, d.address) for d in devices})
    for group in groups:
        for member in group_members(roots.sysfs, group):
            dev = read_device(roots.sysfs, member)
            if not usable_by_vfio(dev):
                raise HookError(
                    f"guest IOMMU group {group} also holds {member} on driver {dev.driver}",
                    "pass the whole host group to the VM, or hot-plug on a root port")
    return [g.number for g in groups]


def group_devnums(roots: GuestRoots, groups: list[int], wakeups: Any
                  ) -> dict[int, tuple[int, int]]:
    from kata_vfio.pci import IommuGroup, vfio_group_devnum
    from kata_vfio_hook.events import wait_for

    def attempt() -> dict[int, tuple[int, int]] | None:
        try:
            return {g: vfio_group_devnum(roots.sysfs, IommuGroup(g)) for g in groups}
        except KataVfioError:
            return None

    numbers = wait_for(attempt, wakeups, 2.0)
    if numbers is None:
        raise HookError(f"/dev/vfio/{groups} did not appear after binding",
                        "check the guest kernel log for vfio errors")
    return numbers


def give_devices(state: State, manifest: Manifest, spec: dict[str, Any], roots: GuestRoots,
                 log: JsonLog, wakeups: Any) -> Outcome:
    """Everything the hook does for one container that has VFIO devices."""
    from kata_vfio.pci import VFIO_CONTAINER_DEVNUM, group_of
    from kata_vfio_hook.cgroup import allow_devices, devices_cgroup
    from kata_vfio_hook.nodes import make_nodes, rootfs_view

    out = Outcome()
    clock = time.monotonic()

    def step(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        out.steps_ms[name] = round((now - clock) * 1e3, 3)
        log.info(name, ms=out.steps_ms[name])
        clock = now

    devices = locate(manifest, roots, wakeups)
    for want, dev in zip(manifest.devices, devices, strict=True):
        out.mapping[str(want.host_address)] = str(dev.address)
        log.info("found", host_address=str(want.host_address), guest_address=str(dev.address),
                 driver=dev.driver)
    step("locate")
    ensure_vfio_driver(roots)
    step("vfio driver")
    bind_all(roots, devices, log)
    step("rebind")
    guest_groups = check_groups(roots, devices)
    numbers = group_devnums(roots, guest_groups, wakeups)
    step("groups")
    for group in manifest.groups:
        guest = {group_of(roots.sysfs, PciAddress.parse(out.mapping[str(d.host_address)]))
                 for d in group.devices}
        out.groups[str(group.host_group)] = ",".join(sorted(str(g) for g in guest))
    log.info("group mapping", host_to_guest=out.groups)

    root = (spec.get("root") or {}).get("path") or "rootfs"
    rootfs = os.path.join(state.bundle, root) if not os.path.isabs(root) else root
    nodes = [("vfio", *VFIO_CONTAINER_DEVNUM)] + [(str(g), *numbers[g]) for g in guest_groups]
    make_nodes(rootfs_view(roots.proc, state.pid, rootfs) if roots.via_proc_root else rootfs,
               nodes)
    step("nodes")
    cgroup = devices_cgroup(roots.proc, state.pid)
    if cgroup is None:
        log.info("no cgroup v1 devices controller: the spec's device rules apply")
    else:
        allowed = allow_devices(roots.cgroupfs, cgroup, [(m, n) for _, m, n in nodes])
        log.info("devices cgroup", allow=str(allowed))
    step("cgroup")
    return out


def run(stdin_text: str, roots: GuestRoots, log: JsonLog) -> int:
    started = time.monotonic()
    state = parse_state(stdin_text)
    log = log.bind(container_id=state.id)
    found = find_manifest(state, roots)
    if found is None:
        return 0
    manifest, spec = found
    log.info("start", devices=[str(d.host_address) for d in manifest.devices], pid=state.pid)
    from kata_vfio_hook.events import PollWakeups, open_wakeups

    wakeups = open_wakeups() if roots.uevents else PollWakeups()
    try:
        out = give_devices(state, manifest, spec, roots, log, wakeups)
    finally:
        wakeups.close()
    log.info("done", host_to_guest=out.mapping, groups=out.groups, steps_ms=out.steps_ms,
             total_ms=round((time.monotonic() - started) * 1e3, 3))
    return 0


def main(argv: list[str] | None = None) -> int:
    log = JsonLog(LOG_PATH, {"hook": (argv or sys.argv)[1:2]})
    try:
        return run(sys.stdin.read(), GuestRoots(), log)
    except KataVfioError as err:
        message = err.one_line()
    except Exception as exc:  # a bug: still one line on stderr, details in the log
        message = f"internal error: {exc!r}"
    log.error("failed", error=message)
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
