"""`kata-vfio-ctl device-plugin`: a Kubernetes device plugin (API v1beta1 over gRPC) that
offers IOMMU groups by kind and allocates them through the ledger.

Per ``[[device_plugin.resource]]`` of config.toml it serves ``kata-vfio-<name>.sock`` in
the kubelet's device-plugin directory and registers ``kata-vfio.io/<name>`` with the
kubelet (``kubelet.sock``). One poll loop (every 0.25 s) reads sysfs and the ledger:
ListAndWatch streams get a new list within a poll of a change (a unit whose function is
gone is reported Unhealthy before the survey a changed PCI layout starts, whose in-use
checks can take seconds); a kubelet that restarted (its socket recreated, ours removed)
gets our socket again and a new registration.

Allocate claims the groups through the ledger (plugin_ledger.py), binds them to vfio-pci
and answers /dev/vfio/vfio and /dev/vfio/<N> (rw), ``PCIDEVICE_KATA_VFIO_IO_<NAME>`` and
the annotation ``io.kata-vfio.resource.<name>`` with the host addresses (so the shim
wrapper's edit and manifest follow, and the guest hook's /run/kata-vfio/env names the
resource; one key per resource, so two resources of one container never overwrite each
other's value), and with ``cdi = true`` the CDI name
``kata-vfio.io/<name>=<id>`` from a spec kept in the CDI directory.

A group still held by the container of a pod the kubelet no longer counts active (it
hands the device out again at once, while that container is being stopped) is waited for,
up to ``--handover-wait`` (30 s), before it is claimed; any other live holder is refused.

When an allocation is released: when none of its groups is held by a live container
(the pod's container took it over and is gone, or never came), it is older than the
grace period (``--release-grace``, 60 s: the kubelet allocates before it creates the
container) and the kubelet's pod-resources API (``List``: the devices of its active
pods) no longer lists any of its device IDs. Without a reachable pod-resources socket
nothing is released by time; an allocation whose device the kubelet hands out again is
released then (see plugin_ledger.py). A restarted plugin finds its allocations in the
ledger and its records.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_vfio.errors import DeviceError, KataVfioError
from kata_vfio.manifest import RESOURCE_ANNOTATION_PREFIX
from kata_vfio.pci import PciAddress, device_dir, read_device
from kata_vfio_ctl import plugin_ledger
from kata_vfio_ctl.plugin_devices import (
    HEALTHY,
    UNHEALTHY,
    HealthCheck,
    Resource,
    Unit,
    layout_key,
    preferred,
    resources_from_settings,
    survey,
)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_POD_RESOURCES = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_CDI_DIR = "/var/run/cdi"
POLL = 0.25
RELEASE_EVERY = 5.0


def _api() -> tuple[Any, Any]:
    try:
        from kata_vfio_ctl.kubeapi import deviceplugin_pb2, deviceplugin_pb2_grpc
    except ImportError as exc:
        raise DeviceError(
            f"the kubelet API modules are missing ({exc})",
            "build kata-vfio with its build (pip install . or make venv): "
            "it generates them from kubeapi/*.proto",
        ) from None
    return deviceplugin_pb2, deviceplugin_pb2_grpc


def _pod_resources_api() -> tuple[Any, Any]:
    from kata_vfio_ctl.kubeapi import podresources_pb2, podresources_pb2_grpc

    return podresources_pb2, podresources_pb2_grpc


Log = Callable[[str], None]


def stderr_log(line: str) -> None:
    print(f"kata-vfio-ctl device-plugin: {line}", file=sys.stderr, flush=True)


@dataclass
class Options:
    sysfs: str
    state_dir: str
    kubelet_dir: str = DEFAULT_KUBELET_DIR
    pod_resources: str = DEFAULT_POD_RESOURCES
    cdi_dir: str = DEFAULT_CDI_DIR
    vfio_dev: str = "/dev/vfio"  # host_path of the DeviceSpecs
    release_grace: float = 60.0
    handover_wait: float = 30.0
    proc: str = "/proc"
    write: Any = None  # sysfs writes (tests: the fake kernel)
    boot_id: str | None = None


@dataclass
class State:
    """What the poll loop last saw, shared with the gRPC handlers."""

    units: dict[str, dict[str, Unit]] = field(default_factory=dict)  # resource -> id -> unit
    health: dict[str, dict[str, str]] = field(default_factory=dict)
    version: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)


class Plugin:
    def __init__(self, options: Options, resources: list[Resource], log: Log = stderr_log) -> None:
        from kata_vfio_host.ledger import Host
        from kata_vfio_host.usage import use_checker

        self.options = options
        self.resources = {r.name: r for r in resources}
        self.log = log
        kwargs: dict[str, Any] = {"boot_id": options.boot_id}
        if options.write is not None:
            kwargs["write"] = options.write
        self.host = Host(options.sysfs, options.state_dir, **kwargs)
        self._checker = use_checker(options.sysfs, Path(options.proc))
        self.check = HealthCheck(options.sysfs, self._host_uses)
        self.state = State()
        self._layout: Any = None
        self._said: set[str] = set()
        self._servers: dict[str, Any] = {}
        self._kubelet_seen: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # Allocate vs the release pass
        self._refresh_lock = threading.Lock()  # the poll loop vs Allocate's CDI refresh
        self._allocating = 0  # Allocates under way (the poll loop waits for them)
        self._count_lock = threading.Lock()
        self._surveyed: dict[str, set[str]] = {}  # the unit IDs the last survey offered
        self._last_release = 0.0
        self._cdi_written: dict[str, Any] = {}

    # -- devices ------------------------------------------------------------------------
    def _host_uses(self, addr: PciAddress) -> list[str]:
        try:
            dev = read_device(self.options.sysfs, addr)
        except DeviceError:
            return []
        if dev.driver is None:
            return []  # a function without a driver has no interface, disk or open group
        return self._checker(addr)

    def refresh(self) -> bool:
        """Read sysfs and the ledger; True when some resource's list changed."""
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> bool:
        key = layout_key(self.options.sysfs)
        if key != self._layout:
            if self._layout is not None:
                self._publish_gone()  # first: the survey's in-use checks can take seconds
            units, skipped = survey(
                self.options.sysfs, list(self.resources.values()), self._host_uses
            )
            for line in skipped:
                if line not in self._said:
                    self._said.add(line)
                    self.log(line)
            self._layout = key
            new_units = {name: {u.id: u for u in found} for name, found in units.items()}
            self._surveyed = {name: set(found) for name, found in new_units.items()}
            for name, known in self.state.units.items():
                for uid, unit in known.items():  # gone (or no longer offerable): listed
                    new_units[name].setdefault(uid, unit)  # as Unhealthy, not dropped
        else:
            new_units = self.state.units
        holders, recorded = plugin_ledger.snapshot(self.host)
        ours: set[int] = set()
        for allocation in recorded.values():
            ours |= allocation.groups
        health = {
            name: {
                uid: self.check.health(u, holders.get(u.group.number), u.group.number in ours)
                if uid in self._surveyed.get(name, ())
                else UNHEALTHY
                for uid, u in found.items()
            }
            for name, found in new_units.items()
        }
        changed = new_units != self.state.units or health != self.state.health
        if changed:
            with self.state.cond:
                self.state.units = new_units
                self.state.health = health
                self.state.version += 1
                self.state.cond.notify_all()
        for name in self.resources:
            self.write_cdi(name)
        return changed

    def _publish_gone(self) -> None:
        """Units with an endpoint gone from sysfs: Unhealthy in the next message."""
        sysfs = self.options.sysfs
        health = {
            name: {
                uid: UNHEALTHY
                if any(not os.path.isdir(device_dir(sysfs, a)) for a in unit.endpoints)
                else self.state.health.get(name, {}).get(uid, HEALTHY)
                for uid, unit in found.items()
            }
            for name, found in self.state.units.items()
        }
        if health != self.state.health:
            with self.state.cond:
                self.state.health = health
                self.state.version += 1
                self.state.cond.notify_all()

    def devices_message(self, name: str) -> Any:
        pb, _ = _api()
        devices = []
        for uid, unit in sorted(self.state.units.get(name, {}).items()):
            topology = None
            if unit.numa_node is not None:
                topology = pb.TopologyInfo(nodes=[pb.NUMANode(ID=unit.numa_node)])
            devices.append(
                pb.Device(
                    ID=uid, health=self.state.health[name].get(uid, HEALTHY), topology=topology
                )
            )
        return pb.ListAndWatchResponse(devices=devices)

    # -- CDI ----------------------------------------------------------------------------
    def cdi_path(self, name: str) -> Path:
        return Path(self.options.cdi_dir) / f"kata-vfio.io-{name}.json"

    def write_cdi(self, name: str) -> None:
        """The resource's CDI spec: a device per unit whose /dev/vfio node exists (one
        bound later is added by the Allocate that binds it)."""
        if not self.resources[name].cdi:
            return
        from kata_vfio.pci import vfio_group_devnum
        from kata_vfio_ctl.cdi import UsableGroup, build_spec, write_spec

        usable = []
        for unit in sorted(self.state.units.get(name, {}).values(), key=lambda u: u.group):
            try:
                usable.append(
                    UsableGroup(
                        unit.group,
                        vfio_group_devnum(self.options.sysfs, unit.group),
                        unit.endpoints,
                    )
                )
            except DeviceError:
                continue
        spec = build_spec(usable) if usable else None
        if spec is not None:
            spec["kind"] = self.resources[name].resource_name
        if self._cdi_written.get(name, False) == spec:
            return
        path = self.cdi_path(name)
        if spec is None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        else:
            write_spec(path, spec)
        self._cdi_written[name] = spec

    # -- Allocate -----------------------------------------------------------------------
    def allocate_container(self, name: str, device_ids: list[str]) -> Any:
        pb, _ = _api()
        resource = self.resources[name]
        units = self.state.units.get(name, {})
        unknown = [d for d in device_ids if d not in units]
        if not device_ids or unknown:
            raise DeviceError(
                f"{resource.resource_name}: unknown device IDs {unknown}",
                "the kubelet asks only for devices this plugin listed",
            )
        chosen = [units[d] for d in sorted(device_ids, key=PciAddress.parse)]
        groups = [u.group for u in chosen]
        endpoints = [a for u in chosen for a in u.endpoints]
        # the kubelet gives a device again as soon as the pod that had it is no longer
        # active, while its container may still be stopping: wait for it (not counted as
        # an Allocate under way, so the poll loop goes on), then claim
        held = plugin_ledger.wait_for_stopping(self.host, groups, self.options.handover_wait)
        if held:
            self.log(
                f"{resource.resource_name}: the container of the pod that had IOMMU "
                f"group{'s' if len(held) > 1 else ''} "
                f"{', '.join(str(g) for g in sorted(held))} did not stop within "
                f"{self.options.handover_wait:g} s (--handover-wait)"
            )
        with self._count_lock:
            self._allocating += 1
        try:
            with self._lock:
                plugin_ledger.allocate(
                    self.host,
                    resource.resource_name,
                    device_ids,
                    groups,
                    endpoints,
                    self._host_uses,
                )
        finally:
            with self._count_lock:
                self._allocating -= 1
        addresses = ",".join(str(a) for a in endpoints)
        specs = [
            pb.DeviceSpec(
                container_path="/dev/vfio/vfio",
                host_path=os.path.join(self.options.vfio_dev, "vfio"),
                permissions="rw",
            )
        ]
        specs += [
            pb.DeviceSpec(
                container_path=f"/dev/vfio/{g}",
                host_path=os.path.join(self.options.vfio_dev, str(g)),
                permissions="rw",
            )
            for g in groups
        ]
        response = pb.ContainerAllocateResponse(
            envs={resource.env_name: addresses},
            devices=specs,
            annotations={RESOURCE_ANNOTATION_PREFIX + resource.name: addresses},
        )
        if resource.cdi:
            with self._refresh_lock:  # the poll loop writes it too
                self.write_cdi(name)
            response.cdi_devices.extend(
                [pb.CDIDevice(name=f"{resource.resource_name}={u.id}") for u in chosen]
            )
        return response

    # -- releases -----------------------------------------------------------------------
    def pod_resource_ids(self) -> set[tuple[str, str]] | None:
        """(resource name, device ID) of every active pod, or None without an answer."""
        path = self.options.pod_resources
        if not os.path.exists(path):
            return None
        import grpc

        podresources_pb2, podresources_pb2_grpc = _pod_resources_api()
        try:
            with grpc.insecure_channel(f"unix://{path}") as channel:
                stub = podresources_pb2_grpc.PodResourcesListerStub(channel)
                reply = stub.List(podresources_pb2.ListPodResourcesRequest(), timeout=5)
        except grpc.RpcError as exc:
            self._say_once(
                f"pod-resources {path} does not answer ({exc.code().name}); "
                "allocations are released when their devices are handed out "
                "again"
            )
            return None
        return {
            (d.resource_name, i)
            for pod in reply.pod_resources
            for c in pod.containers
            for d in c.devices
            for i in d.device_ids
        }

    def _say_once(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self.log(line)

    def release_gone(self, now: float | None = None) -> list[str]:
        """Release the allocations whose pods are gone (see the module's docstring)."""
        now = time.time() if now is None else now
        candidates = [
            a
            for a in plugin_ledger.allocations(self.host).values()
            if now - a.since >= self.options.release_grace
        ]
        if not candidates:
            return []
        holders = plugin_ledger.live_holders(self.host)
        candidates = [a for a in candidates if all(holders.get(g, a.id) == a.id for g in a.groups)]
        if not candidates:
            return []
        listed = self.pod_resource_ids()
        if listed is None:
            return []
        released = []
        for allocation in candidates:
            if self._still_listed(allocation, listed):
                continue
            with self._lock:
                try:
                    done = plugin_ledger.release_allocation(self.host, allocation)
                except KataVfioError as exc:
                    self._say_once(exc.one_line())
                    continue
            if done:
                self.log(
                    f"released {allocation.id} (its pod is gone): groups "
                    f"{', '.join(str(g) for g in sorted(allocation.groups))}"
                )
                released.append(allocation.id)
        return released

    def _still_listed(
        self, allocation: plugin_ledger.Allocation, listed: set[tuple[str, str]]
    ) -> bool:
        if allocation.resource:
            return any((allocation.resource, d) in listed for d in allocation.device_ids)
        # known only from the ledger (no record): any listed device of its groups
        for name, found in self.state.units.items():
            resource_name = self.resources[name].resource_name
            if any(
                (resource_name, uid) in listed and unit.group.number in allocation.groups
                for uid, unit in found.items()
            ):
                return True
        return False

    # -- gRPC ---------------------------------------------------------------------------
    def socket_path(self, name: str) -> str:
        return os.path.join(self.options.kubelet_dir, self.resources[name].socket_name)

    def serve(self, name: str) -> None:
        import grpc

        _, rpc = _api()
        old = self._servers.pop(name, None)
        if old is not None:
            old.stop(grace=0)
        path = self.socket_path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.makedirs(self.options.kubelet_dir, exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        rpc.add_DevicePluginServicer_to_server(Servicer(self, name), server)
        if server.add_insecure_port(f"unix://{path}") == 0:
            raise DeviceError(f"cannot listen on {path}", "check the device-plugin directory")
        server.start()
        self._servers[name] = server

    def register(self, name: str) -> None:
        import grpc

        pb, rpc = _api()
        kubelet = os.path.join(self.options.kubelet_dir, KUBELET_SOCKET)
        resource = self.resources[name]
        with grpc.insecure_channel(f"unix://{kubelet}") as channel:
            rpc.RegistrationStub(channel).Register(
                pb.RegisterRequest(
                    version=API_VERSION,
                    endpoint=resource.socket_name,
                    resource_name=resource.resource_name,
                    options=pb.DevicePluginOptions(get_preferred_allocation_available=True),
                ),
                timeout=10,
            )
        self.log(f"registered {resource.resource_name} with the kubelet ({kubelet})")

    def _kubelet_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(os.path.join(self.options.kubelet_dir, KUBELET_SOCKET))
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def keep_registered(self) -> None:
        """(Re)start our sockets and register when the kubelet's socket is new or one of
        ours is gone (a kubelet starting removes the directory's sockets)."""
        import grpc

        gone = [
            n
            for n in self.resources
            if n not in self._servers or not os.path.exists(self.socket_path(n))
        ]
        for name in gone:
            self.serve(name)
        seen = self._kubelet_identity()
        if seen is None:
            if self._kubelet_seen is not None:
                self.log("the kubelet's socket is gone; waiting for it")
            self._kubelet_seen = None
            return
        if seen == self._kubelet_seen and not gone:
            return
        for name in self.resources:
            try:
                self.register(name)
            except grpc.RpcError as exc:
                self._say_once(
                    f"registering {self.resources[name].resource_name} failed "
                    f"({exc.code().name}: {exc.details()}); retrying"
                )
                return
        self._kubelet_seen = seen

    def start(self) -> None:
        recovered = plugin_ledger.allocations(self.host)
        if recovered:
            self.log(
                f"recovered {len(recovered)} allocations from the ledger: "
                + ", ".join(sorted(recovered))
            )
        self.refresh()
        for name in self.resources:
            self.serve(name)

    def step(self) -> None:
        if self._allocating:
            return  # an Allocate runs: its latency first, the next poll catches up
        self.refresh()
        self.keep_registered()
        now = time.monotonic()
        if now - self._last_release >= RELEASE_EVERY:
            self._last_release = now
            self.release_gone()

    def run(self) -> None:
        self.start()
        while not self._stop.is_set():
            try:
                self.step()
            except KataVfioError as exc:
                self._say_once(exc.one_line())
            self._stop.wait(POLL)
        self.close()

    def stop(self) -> None:
        self._stop.set()
        with self.state.cond:
            self.state.cond.notify_all()

    def close(self) -> None:
        for name, server in list(self._servers.items()):
            server.stop(grace=0)
            try:
                os.unlink(self.socket_path(name))
            except FileNotFoundError:
                pass
        self._servers.clear()


class Servicer:
    """The DevicePlugin service of one resource (grpc calls these by name)."""

    def __init__(self, plugin: Plugin, name: str) -> None:
        self.plugin = plugin
        self.name = name

    def GetDevicePluginOptions(self, request: Any, context: Any) -> Any:
        pb, _ = _api()
        return pb.DevicePluginOptions(
            pre_start_required=False, get_preferred_allocation_available=True
        )

    def ListAndWatch(self, request: Any, context: Any) -> Iterator[Any]:
        state = self.plugin.state
        version = -1
        while context.is_active() and not self.plugin._stop.is_set():
            with state.cond:
                if state.version == version:
                    state.cond.wait(timeout=1.0)
                    if state.version == version:
                        continue
                version = state.version
                message = self.plugin.devices_message(self.name)
            yield message

    def GetPreferredAllocation(self, request: Any, context: Any) -> Any:
        pb, _ = _api()
        units = self.plugin.state.units.get(self.name, {})
        replies = [
            pb.ContainerPreferredAllocationResponse(
                deviceIDs=preferred(
                    units,
                    list(r.available_deviceIDs),
                    list(r.must_include_deviceIDs),
                    r.allocation_size,
                )
            )
            for r in request.container_requests
        ]
        return pb.PreferredAllocationResponse(container_responses=replies)

    def Allocate(self, request: Any, context: Any) -> Any:
        import grpc

        pb, _ = _api()
        done: list[list[str]] = []
        replies = []
        try:
            for container in request.container_requests:
                ids = list(container.devices_ids)
                replies.append(self.plugin.allocate_container(self.name, ids))
                done.append(ids)
        except KataVfioError as exc:
            for ids in done:  # all or nothing for the pod's request
                allocation = plugin_ledger.allocations(self.plugin.host).get(
                    plugin_ledger.allocation_id(ids)
                )
                if allocation is not None:
                    plugin_ledger.release_allocation(self.plugin.host, allocation)
            self.plugin.log(f"Allocate refused: {exc.one_line()}")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.one_line())
        return pb.AllocateResponse(container_responses=replies)

    def PreStartContainer(self, request: Any, context: Any) -> Any:
        pb, _ = _api()
        return pb.PreStartContainerResponse()


def cmd_device_plugin(args: argparse.Namespace) -> int:
    from kata_vfio_host.settings import load_settings

    settings = load_settings(args.config)
    resources = resources_from_settings(settings.device_plugin_resources)
    _api()
    options = Options(
        sysfs=args.sysfs or settings.sysfs,
        state_dir=settings.state_dir,
        kubelet_dir=args.kubelet_dir,
        pod_resources=args.pod_resources,
        cdi_dir=args.cdi_dir,
        vfio_dev=args.vfio_dev,
        release_grace=args.release_grace,
        handover_wait=args.handover_wait,
    )
    plugin = Plugin(options, resources)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: plugin.stop())
    signal.signal(signal.SIGINT, lambda *_: plugin.stop())
    plugin.log("offering " + ", ".join(r.resource_name for r in resources))
    plugin.run()
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "device-plugin", help="run the Kubernetes device plugin (kata-vfio.io/<name> resources)"
    )
    p.add_argument(
        "--kubelet-dir",
        default=DEFAULT_KUBELET_DIR,
        help=f"the kubelet's device-plugin directory (default {DEFAULT_KUBELET_DIR})",
    )
    p.add_argument(
        "--pod-resources",
        default=DEFAULT_POD_RESOURCES,
        metavar="SOCKET",
        help="the kubelet's pod-resources socket, to release allocations of "
        f"pods that are gone (default {DEFAULT_POD_RESOURCES})",
    )
    p.add_argument(
        "--cdi-dir",
        default=DEFAULT_CDI_DIR,
        help=f"where CDI specs go for cdi = true (default {DEFAULT_CDI_DIR})",
    )
    p.add_argument(
        "--vfio-dev",
        default="/dev/vfio",
        metavar="DIR",
        help="the host's /dev/vfio, as the DeviceSpecs' host paths",
    )
    p.add_argument(
        "--release-grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="an allocation no container took is kept at least this long",
    )
    p.add_argument(
        "--handover-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long Allocate waits for the container of a pod that is being "
        "stopped to let go of a group the kubelet hands out again (default "
        "30, the kubelet's default termination grace)",
    )
    p.add_argument(
        "--config", help="config.toml (default: KATA_VFIO_CONFIG, else /etc/kata-vfio/config.toml)"
    )
    p.add_argument("--sysfs", help="sysfs root (default: from config.toml, else /sys)")
    p.set_defaults(func=cmd_device_plugin)
