"""Giving one container its VFIO devices: locate and claim, bind, groups, nodes, cgroup.

Runs only for a container whose spec carries a manifest. Each step is named for the
error boundary. Time is one budget (HOOK_DEADLINE from the process's start, below the
agent's kill): the wait for late devices gets what is left minus GROUP_WAIT, the wait
for /dev/vfio/<N> at most GROUP_WAIT of what is left. Once the devices are claimed,
one handler gives back everything bound and drops the claims on any failure, then
re-raises: a failed hook leaves the guest's drivers as it found them.
"""

from __future__ import annotations

import os
import time

from kata_vfio.boundary import step
from kata_vfio.defaults import GROUP_WAIT, HOOK_DEADLINE
from kata_vfio.errors import HookError, KataVfioError
from kata_vfio.jsonlog import JsonLog
from kata_vfio.manifest import Manifest, ManifestDevice
from kata_vfio.pci import VFIO_PCI, PciAddress, PciDevice, is_vfio_driver
from kata_vfio_hook.events import Deadline, process_started, wait_for
from kata_vfio_hook.roots import GuestRoots
from kata_vfio_hook.state import State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import Wakeups


class Outcome:
    """What the hook did, for the log: mappings and each step's duration."""

    def __init__(self, log: JsonLog) -> None:
        self.log = log
        self.mapping: dict[str, str] = {}  # host address -> guest address
        self.groups: dict[str, str] = {}  # host group -> guest group(s)
        self.steps_ms: dict[str, float] = {}

    def phase(self, event: str, doing: str) -> _Phase:
        """A step: named for the error boundary (`doing`), timed in the log (`event`)."""
        return _Phase(self, event, doing)


class _Phase:
    def __init__(self, outcome: Outcome, event: str, doing: str) -> None:
        self._outcome, self._event, self._step = outcome, event, step(doing)

    def __enter__(self) -> None:
        self._started = time.monotonic()
        self._step.__enter__()

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self._step.__exit__(kind, value, traceback)
        if kind is None:
            outcome = self._outcome
            outcome.steps_ms[self._event] = round((time.monotonic() - self._started) * 1e3, 3)
            outcome.log.info(self._event, ms=outcome.steps_ms[self._event])


def _describe(want: ManifestDevice) -> str:
    return (
        f"{want.host_address} [{want.identity.describe()}{' mac ' + want.mac if want.mac else ''}]"
    )


class _Look:
    """What the last look at the guest saw, for the message when devices are missing."""

    missing: list[int]
    refused: list[tuple[PciDevice, str]]  # candidates the VM depends on, and why
    held: list[tuple[PciDevice, str]]  # candidates other live containers hold

    def __init__(self) -> None:
        self.missing, self.refused, self.held = [], [], []


def locate(
    manifest: Manifest,
    state: State,
    roots: GuestRoots,
    wakeups: Wakeups,
    timeout: float,
    lock_until: float,
) -> list[PciDevice]:
    """The guest device for each manifest device, waiting (bounded) for late hot-plugs,
    and claimed for the container in the ledger before this returns.

    Candidates are guest devices with the wanted identity that no other live container
    has claimed and the VM itself does not depend on."""
    from kata_vfio_hook.claims import Claim, ledger, sort_out, start_ticks
    from kata_vfio_hook.match import assign, scan
    from kata_vfio_hook.vmdeps import VmDependencies

    wanted = manifest.devices
    kinds = {w.identity for w in wanted}
    my_start = start_ticks(roots.proc, state.pid)
    look = _Look()

    def attempt() -> list[PciDevice] | None:
        guest = [d for d in scan(roots.sysfs) if d.identity in kinds]
        # afresh each look: a late hot-plug brings its interfaces and block devices
        deps = VmDependencies(roots.sysfs, roots.proc, roots.ipv4_address)
        look.refused, look.held = [], []
        with ledger(roots.claims, lock_until) as claims:
            mine, theirs = sort_out(claims, state.id, roots.proc)
            free = []
            for dev in guest:
                holder = theirs.get(str(dev.address))
                why = None if holder else deps.reason(dev)
                if holder is not None:
                    look.held.append((dev, holder.container_id))
                elif why is not None:
                    look.refused.append((dev, why))
                else:
                    free.append(dev)
            free.sort(key=lambda d: str(d.address) not in mine)  # a restart: its own first
            found, look.missing = assign(roots.sysfs, wanted, free)
            if look.missing:
                return None
            devices = [found[i] for i in range(len(wanted))]
            for addr in mine - {str(d.address) for d in devices}:
                del claims[addr]
            for dev in devices:
                claims[str(dev.address)] = Claim(state.id, state.pid, my_start)
            return devices

    devices = wait_for(attempt, wakeups, timeout)
    if devices is not None:
        return devices
    missing = [wanted[i] for i in look.missing]
    for dev, why in look.refused:
        if any(w.identity == dev.identity for w in missing):
            raise HookError(
                f"refusing guest device {dev.address} [{dev.identity.describe()}]: "
                f"the VM depends on it ({why})",
                "a manifest may name only devices passed through from the host; "
                "was the io.kata-vfio.manifest annotation forged?",
            )
    held = "".join(
        f"; guest device {dev.address} is held by container {cid}"
        for dev, cid in look.held
        if any(w.identity == dev.identity for w in missing)
    )
    names = ", ".join(_describe(w) for w in missing)
    raise HookError(
        f"host device {names} not found in the guest after {timeout:.3g} s{held}",
        "was it passed to the VM? check the hypervisor log and the guest's PCI devices",
    )


def ensure_vfio_driver(roots: GuestRoots) -> None:
    from kata_vfio.rebind import load_vfio_pci

    if not load_vfio_pci(roots.sysfs, roots.modprobe):
        raise HookError(
            "the vfio-pci driver is not available in the guest",
            "build the guest image with kata-vfio's dracut module (make initrd)",
        )


def bind_all(
    roots: GuestRoots, devices: list[PciDevice], log: JsonLog, moved: list[PciDevice]
) -> None:
    """Rebind every device to vfio-pci concurrently. Each device is added to `moved`
    before the first write to it, so the caller can give back everything touched."""
    from kata_vfio.rebind import bind_to

    errors: dict[PciAddress, KataVfioError | OSError] = {}

    def bind(dev: PciDevice) -> None:
        started = time.monotonic()
        try:
            bind_to(roots.sysfs, dev.address, VFIO_PCI, roots.write)
        except (KataVfioError, OSError) as exc:
            errors[dev.address] = exc
        log.info(
            "bind",
            guest_address=str(dev.address),
            from_driver=dev.driver,
            ok=dev.address not in errors,
            ms=round((time.monotonic() - started) * 1e3, 3),
        )

    todo = [d for d in devices if not is_vfio_driver(d.driver)]
    moved.extend(todo)
    if len(todo) > 1:  # a thread a device: each only waits on sysfs
        from kata_vfio.threads import in_threads

        in_threads(todo, bind, len(todo))
    else:  # one device binds here, without loading the pool (most containers have one)
        for dev in todo:
            bind(dev)
    if errors:
        failed, failure = next(iter(errors.items()))
        detail = failure.one_line() if isinstance(failure, KataVfioError) else str(failure)
        raise HookError(
            f"cannot bind guest device {failed} to vfio-pci: {detail}",
            "devices were given back to their drivers",
        )


def give_back_all(roots: GuestRoots, moved: list[PciDevice], log: JsonLog) -> None:
    """Each device back to the driver and override it had; failures are logged, not
    raised: the error being handled is what the caller reports."""
    from kata_vfio.rebind import give_back

    for dev in moved:
        try:
            give_back(roots.sysfs, dev.address, dev.driver, dev.driver_override, roots.write)
            log.info("given back", guest_address=str(dev.address), driver=dev.driver)
        except (KataVfioError, OSError) as exc:
            log.error("give back failed", guest_address=str(dev.address), error=str(exc))


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
                    "pass the whole host group to the VM, or hot-plug on a root port",
                )
    return [g.number for g in groups]


def group_devnums(
    roots: GuestRoots, groups: list[int], wakeups: Wakeups, timeout: float
) -> dict[int, tuple[int, int]]:
    from kata_vfio.pci import IommuGroup, vfio_group_devnum

    def attempt() -> dict[int, tuple[int, int]] | None:
        try:
            return {g: vfio_group_devnum(roots.sysfs, IommuGroup(g)) for g in groups}
        except KataVfioError:
            return None

    numbers = wait_for(attempt, wakeups, timeout)
    if numbers is None:
        raise HookError(
            f"/dev/vfio/{groups} did not appear {timeout:.3g} s after binding",
            "check the guest kernel log for vfio errors",
        )
    return numbers


def give_devices(
    state: State,
    manifest: Manifest,
    spec: dict[str, Any],
    roots: GuestRoots,
    log: JsonLog,
    wakeups: Wakeups,
    started: float,
) -> Outcome:
    """Everything the hook does for one container that has VFIO devices. On failure, the
    /run/kata-vfio files an earlier start of the container left are removed too (Kata >= 2
    starts a container whose hook failed)."""
    try:
        return _give_devices(state, manifest, spec, roots, log, wakeups, started)
    except BaseException:
        _forget_files(state, spec, roots, log)
        raise


def _give_devices(
    state: State,
    manifest: Manifest,
    spec: dict[str, Any],
    roots: GuestRoots,
    log: JsonLog,
    wakeups: Wakeups,
    started: float,
) -> Outcome:
    from kata_vfio_hook.claims import release

    deadline = Deadline(HOOK_DEADLINE, process_started(roots.proc) or started)
    out = Outcome(log)
    with out.phase("locate", "locating devices"):
        wait = min(manifest.hotplug_timeout, deadline.left() - GROUP_WAIT)
        devices = locate(manifest, state, roots, wakeups, max(wait, 0.0), deadline.at - GROUP_WAIT)
    for want, dev in zip(manifest.devices, devices, strict=True):
        out.mapping[str(want.host_address)] = str(dev.address)
        log.info(
            "found",
            host_address=str(want.host_address),
            guest_address=str(dev.address),
            driver=dev.driver,
        )
    moved: list[PciDevice] = []
    try:
        if not os.path.isdir(os.path.join(roots.proc, str(state.pid))):
            raise HookError(
                f"the container's init (pid {state.pid}) has exited", "nothing to give devices to"
            )
        with out.phase("vfio driver", "loading vfio-pci"):
            ensure_vfio_driver(roots)
        with out.phase("rebind", "binding devices to vfio-pci"):
            bind_all(roots, devices, log, moved)
        _finish(state, manifest, spec, roots, out, devices, wakeups, deadline)
    except BaseException:
        give_back_all(roots, moved, log)
        try:
            release(roots.claims, state.id, deadline.at)
        except (OSError, KataVfioError) as exc:  # a damaged file: the first error stands
            log.error("cannot drop the claims", error=str(exc))
        raise
    return out


def container_root(state: State, spec: dict[str, Any], roots: GuestRoots) -> str:
    """The container's rootfs as the hook reaches it: in its mount namespace, through
    /proc/<pid>/root (unless a test's roots say otherwise)."""
    from kata_vfio_hook.nodes import rootfs_view

    root = (spec.get("root") or {}).get("path") or "rootfs"
    rootfs = os.path.join(state.bundle, root) if not os.path.isabs(root) else root
    return rootfs_view(roots.proc, state.pid, rootfs) if roots.via_proc_root else rootfs


def _forget_files(state: State, spec: dict[str, Any], roots: GuestRoots, log: JsonLog) -> None:
    from kata_vfio_hook.devfiles import forget

    try:
        forget(container_root(state, spec, roots))
    except (OSError, KataVfioError) as exc:  # the error being handled is the one to report
        log.info("no /run/kata-vfio files removed", error=str(exc))


def _finish(
    state: State,
    manifest: Manifest,
    spec: dict[str, Any],
    roots: GuestRoots,
    out: Outcome,
    devices: list[PciDevice],
    wakeups: Wakeups,
    deadline: Deadline,
) -> None:
    """After binding: the groups, the nodes in the container, the cgroup rules, and last
    the files that tell the container its guest addresses."""
    from kata_vfio.pci import VFIO_CONTAINER_DEVNUM, group_of
    from kata_vfio_hook import devfiles
    from kata_vfio_hook.nodes import allow_devices, devices_cgroup, make_nodes

    log = out.log
    with out.phase("groups", "waiting for the VFIO groups"):
        guest_groups = check_groups(roots, devices)
        numbers = group_devnums(roots, guest_groups, wakeups, min(GROUP_WAIT, deadline.left()))
    placed = [
        (
            str(want.host_address),
            str(dev.address),
            group_of(roots.sysfs, dev.address).number,
            want.resource,
        )
        for want, dev in zip(manifest.devices, devices, strict=True)
    ]
    guest_group = {host: group for host, _, group, _ in placed}
    for group in manifest.groups:
        guest = {guest_group[str(d.host_address)] for d in group.devices}
        out.groups[str(group.host_group)] = ",".join(sorted(str(g) for g in guest))
    log.info("group mapping", host_to_guest=out.groups)

    rootfs = container_root(state, spec, roots)
    nodes = [("vfio", *VFIO_CONTAINER_DEVNUM)] + [(str(g), *numbers[g]) for g in guest_groups]
    with out.phase("nodes", "creating /dev/vfio in the container"):
        make_nodes(rootfs, nodes)
    with out.phase("cgroup", "allowing the devices in the container's cgroup"):
        cgroup = devices_cgroup(roots.proc, state.pid)
        if cgroup is None:
            log.info("no cgroup v1 devices controller: the spec's device rules apply")
        else:
            allowed = allow_devices(roots.cgroupfs, cgroup, [(m, n) for _, m, n in nodes])
            log.info("devices cgroup", allow=str(allowed))
    with out.phase("addresses", f"writing {devfiles.RUN_DIR} in the container"):
        devfiles.write(rootfs, placed)
