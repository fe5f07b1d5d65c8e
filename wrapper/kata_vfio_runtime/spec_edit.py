"""The create-time edit of config.json: plan it as values, then apply it in one place.

The plan resolves every VFIO group the container asks for (``/dev/vfio/<N>``
entries and the ``io.kata-vfio.devices`` annotation) against the host's sysfs,
refuses groups the host has not handed to vfio-pci, and yields the device entries,
allow rules and annotations to add. `apply_plan` is pure; `edit_bundle` writes
the result atomically, or not at all when nothing changes.
"""

from __future__ import annotations

import os
import time

from kata_vfio.defaults import MAX_CONFIG_JSON_BYTES
from kata_vfio.errors import DeviceError, SpecError
from kata_vfio.files import read_regular, write_atomically
from kata_vfio.jsoncodec import dumps, loads
from kata_vfio.manifest import (
    DEVICES_ANNOTATION,
    GUEST_HOOK_PATH_ANNOTATION,
    MANIFEST_ANNOTATION,
    RESOURCE_ANNOTATION_PREFIX,
    RESOURCE_DOMAIN,
    Manifest,
    ManifestDevice,
    ManifestGroup,
    is_resource_name_part,
)
from kata_vfio.pci import (
    VFIO_CONTAINER_DEVNUM,
    IommuGroup,
    PciAddress,
    PciDevice,
    group_members,
    group_of,
    read_device,
    usable_by_vfio,
    vfio_group_devnum,
)
from kata_vfio.value import Value
from kata_vfio_host.settings import GUEST_AGENT, Settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import StrPath

VFIO_DIR = "/dev/vfio/"
VFIO_CONTAINER_PATH = "/dev/vfio/vfio"
# Kata >= 2 reads neither behind enable_annotations (src/runtime/pkg/annotations).
KATA_CONFIG_PATH_ANNOTATION = "io.katacontainers.config_path"
KATA_VFIO_MODE_ANNOTATION = "io.katacontainers.config.runtime.vfio_mode"
# Annotations only the wrapper writes: a container that brings its own (on CRI engines
# annotations come from pod specs) would steer the guest hook to devices of its choice.
ALLOCATED_ANNOTATION = "io.kata-vfio.allocated"
OWN_ANNOTATIONS = (MANIFEST_ANNOTATION, GUEST_HOOK_PATH_ANNOTATION, ALLOCATED_ANNOTATION)


class DeviceNode(Value):
    path: str
    major: int
    minor: int

    def spec_entry(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": "c",
            "major": self.major,
            "minor": self.minor,
            "fileMode": 0o666,
            "uid": 0,
            "gid": 0,
        }

    def allow_rule(self) -> dict[str, Any]:
        return {
            "allow": True,
            "type": "c",
            "major": self.major,
            "minor": self.minor,
            "access": "rwm",
        }


class SpecPlan(Value):
    nodes: tuple[DeviceNode, ...]  # every VFIO node the container gets, /dev/vfio/vfio first
    annotations: dict[str, str]
    manifest: Manifest
    memlock: int | None = None  # RLIMIT_MEMLOCK to raise process.rlimits to, if lower
    run_tmpfs: bool = False  # a tmpfs on DPDK's runtime directory, unless /run is


# A userspace driver pins its DMA memory: without CAP_IPC_LOCK or a large RLIMIT_MEMLOCK,
# DPDK fails with "Cannot set up DMA remapping, error 12". Inside a Kata VM the memory
# locked is the guest's own, so VFIO containers get it unlimited unless config.toml says
# raise_memlock = false.
RLIM_INFINITY = (1 << 64) - 1
# DPDK's runtime directory as root. Its multi-process channel is a Unix socket there, and
# Kata 1.x serves the container's rootfs over 9p, where bind() of a socket fails (ENXIO:
# "EAL: failed to bind /var/run/dpdk/rte/mp_socket"). A tmpfs there (inside the VM) fixes it.
DPDK_RUN_DIRS = ("/run", "/var/run", "/run/dpdk", "/var/run/dpdk")
DPDK_RUN_TMPFS = {
    "destination": "/run/dpdk",
    "type": "tmpfs",
    "source": "tmpfs",
    "options": ["nosuid", "nodev", "mode=755", "size=64m"],
}


def parse_address_list(text: str, annotation: str = DEVICES_ANNOTATION) -> list[PciAddress]:
    """The io.kata-vfio.devices annotation: PCI addresses separated by commas or blanks
    (podman's --annotation splits its argument at commas unless it is CSV-quoted)."""
    parts = text.replace(",", " ").split()
    if not parts:
        raise DeviceError(
            f"annotation {annotation} is empty",
            "list PCI addresses, e.g. 0000:03:00.0,0000:03:00.1",
        )
    return [PciAddress.parse(p) for p in parts]


def group_of_entry(path: str) -> IommuGroup | None:
    """The host group of a ``/dev/vfio/<N>`` spec entry; None for /dev/vfio/vfio."""
    name = path[len(VFIO_DIR) :]
    if name == "vfio":
        return None
    try:
        return IommuGroup.parse(name)
    except DeviceError:
        raise DeviceError(
            f"config.json device {path!r} is neither /dev/vfio/vfio nor /dev/vfio/<group number>",
            "pass VFIO groups as --device /dev/vfio/<N>",
        ) from None


def _manifest_device(
    sysfs: StrPath, dev: PciDevice, macs: dict[PciAddress, str], resources: dict[PciAddress, str]
) -> ManifestDevice:
    mac = macs.get(dev.address)  # set by io.kata-vfio.vf-config just now
    if mac is None and dev.physfn is not None and dev.is_network:
        from kata_vfio_host.netinfo import vf_mac

        mac = vf_mac(sysfs, dev.address, dev.physfn)
    return ManifestDevice(dev.address, dev.identity, mac, resources.get(dev.address))


def resolve_group(
    sysfs: StrPath,
    group: IommuGroup,
    macs: dict[PciAddress, str] | None = None,
    resources: dict[PciAddress, str] | None = None,
) -> ManifestGroup:
    """The group's endpoints, after checking every member can be left to VFIO."""
    devices = []
    for addr in group_members(sysfs, group):
        dev = read_device(sysfs, addr)
        if not usable_by_vfio(dev):
            raise DeviceError(
                f"PCI device {addr} in IOMMU group {group} is bound to {dev.driver}, not vfio-pci",
                f"hand it to vfio-pci first: kata-vfio-ctl bind {addr}",
            )
        if not dev.is_bridge:  # Kata hot-plugs a group's endpoints, never its bridges
            devices.append(_manifest_device(sysfs, dev, macs or {}, resources or {}))
    return ManifestGroup(group, tuple(devices))


def _devnum(entry: dict[str, Any], key: str, path: str) -> int:
    value = entry.get(key, -1)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(
            f"config.json device {path}: {key} {value!r} is not a number",
            "let the container engine write the device entry",
        )
    return value


def requested_groups(spec: dict[str, Any]) -> dict[IommuGroup, DeviceNode | None]:
    """The groups named by ``/dev/vfio/<N>`` entries, with the node each entry gives.

    Paths are compared in canonical form: ``/dev/../dev/vfio/14`` or ``//dev/vfio/14``
    name the same node and are refused rather than passed on unchecked."""
    linux = spec.get("linux") or {}
    groups: dict[IommuGroup, DeviceNode | None] = {}
    for entry in linux.get("devices") or []:
        path = entry.get("path", "") if isinstance(entry, dict) else ""
        if not isinstance(path, str):
            continue
        canonical = os.path.normpath("/" + path.lstrip("/"))
        if (canonical + "/" == VFIO_DIR or canonical.startswith(VFIO_DIR)) and canonical != path:
            raise SpecError(
                f"config.json device path {path!r} is not canonical", f"write it as {canonical}"
            )
        if not path.startswith(VFIO_DIR):
            continue
        group = group_of_entry(path)
        if group is not None:
            groups[group] = DeviceNode(
                path, _devnum(entry, "major", path), _devnum(entry, "minor", path)
            )
    return groups


def requested_addresses(spec: dict[str, Any]) -> list[PciAddress]:
    """The devices io.kata-vfio.devices names, then those only resource annotations name."""
    wanted = (spec.get("annotations") or {}).get(DEVICES_ANNOTATION)
    if wanted is not None and not isinstance(wanted, str):
        raise DeviceError(
            f"annotation {DEVICES_ANNOTATION} is not a string",
            "list PCI addresses, e.g. 0000:03:00.0,0000:03:00.1",
        )
    addresses = parse_address_list(wanted) if wanted is not None else []
    addresses += [a for a in requested_resources(spec) if a not in addresses]
    return addresses


def requested_resources(spec: dict[str, Any]) -> dict[PciAddress, str]:
    """host address -> resource name, from io.kata-vfio.resource.<name> annotations
    (a device plugin's Allocate sets one per resource)."""
    annotations = spec.get("annotations") or {}
    named: dict[PciAddress, str] = {}
    for key in sorted(k for k in annotations if k.startswith(RESOURCE_ANNOTATION_PREFIX)):
        name = key[len(RESOURCE_ANNOTATION_PREFIX) :]
        if not is_resource_name_part(name):
            raise DeviceError(
                f"annotation {key}: {name!r} is not a resource name",
                "use the device plugin's name: at most 63 letters, digits, "
                "'-', '_' or '.', a letter or digit first and last",
            )
        value = annotations[key]
        if not isinstance(value, str):
            raise DeviceError(
                f"annotation {key} is not a string",
                "list PCI addresses, e.g. 0000:03:00.0,0000:03:00.1",
            )
        resource = f"{RESOURCE_DOMAIN}/{name}"
        for addr in parse_address_list(value, key):
            other = named.setdefault(addr, resource)
            if other != resource:
                raise DeviceError(
                    f"PCI device {addr} is named by two resources, {other} and {resource}",
                    "name each device in one io.kata-vfio.resource.* annotation",
                )
    return named


def plan_edit(
    spec: dict[str, Any],
    settings: Settings,
    allocated: tuple[PciAddress, ...] = (),
    macs: dict[PciAddress, str] | None = None,
) -> SpecPlan | None:
    """What to add to `spec`; None when the container asks for no VFIO device.
    `allocated`: devices the wrapper chose for an io.kata-vfio.select request."""
    sysfs = settings.sysfs
    groups = requested_groups(spec)
    for addr in [*requested_addresses(spec), *allocated]:
        groups.setdefault(group_of(sysfs, addr), None)
    if not groups:
        return None

    resources = requested_resources(spec)
    resolved = [resolve_group(sysfs, g, macs, resources) for g in sorted(groups)]
    nodes = [DeviceNode(VFIO_CONTAINER_PATH, *VFIO_CONTAINER_DEVNUM)]
    for group in sorted(groups):
        node = groups[group]
        host_devnum = vfio_group_devnum(sysfs, group)
        if node is None or node.major < 0:
            node = DeviceNode(f"{VFIO_DIR}{group}", *host_devnum)
        elif (node.major, node.minor) != host_devnum:
            raise DeviceError(
                f"config.json gives {node.path} as {node.major}:{node.minor}, but the host's "
                f"/dev/vfio/{group} is {host_devnum[0]}:{host_devnum[1]}",
                f"pass the host's node: --device /dev/vfio/{group}",
            )
        nodes.append(node)
    manifest = Manifest(tuple(resolved), settings.hotplug_timeout)
    annotations = {
        **settings.annotations,
        **kata_annotations(settings),
        MANIFEST_ANNOTATION: manifest.to_json(),
    }
    if allocated:
        annotations[ALLOCATED_ANNOTATION] = ",".join(str(a) for a in allocated)
    return SpecPlan(
        tuple(nodes),
        annotations,
        manifest,
        RLIM_INFINITY if settings.raise_memlock else None,
        settings.dpdk_run_tmpfs,
    )


def kata_annotations(settings: Settings) -> dict[str, str]:
    """How a VFIO container tells Kata what it needs.

    Kata 1.x (no kata_config_path): the guest_hook_path annotation. Kata >= 2 refuses
    that one unless enable_annotations lists it, so there the container names the
    configuration file `kata-vfio-ctl install` generated (hook path, IOMMU, root-port
    plugging, vfio_mode all inside); neither key below is gated."""
    if not settings.kata_config_path:
        return {GUEST_HOOK_PATH_ANNOTATION: settings.guest_hook_path}
    annotations = {KATA_CONFIG_PATH_ANNOTATION: settings.kata_config_path}
    if settings.guest == GUEST_AGENT:
        annotations[KATA_VFIO_MODE_ANNOTATION] = "vfio"
    return annotations


def _has_allow_rule(rules: list[Any], node: DeviceNode) -> bool:
    return any(
        isinstance(r, dict)
        and r.get("allow") is True
        and r.get("type") in ("c", "a")
        and r.get("major", node.major) == node.major
        and r.get("minor", node.minor) == node.minor
        and set("rw") <= set(r.get("access", "rwm"))
        for r in rules
    )


def _json_copy(value: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists and immutable scalars only): what
    copy.deepcopy gives here, without its import."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v) for v in value]
    return value


def apply_plan(spec: dict[str, Any], plan: SpecPlan) -> dict[str, Any]:
    """A new spec with the plan's nodes, allow rules and annotations; `spec` is untouched."""
    new: dict[str, Any] = _json_copy(spec)
    linux = new.setdefault("linux", {})
    devices = linux.get("devices")
    if devices is None:
        devices = linux["devices"] = []
    present = {d.get("path") for d in devices if isinstance(d, dict)}
    resources = linux.get("resources")
    if resources is None:
        resources = linux["resources"] = {}
    rules = resources.get("devices")
    if rules is None:
        rules = resources["devices"] = []
    for node in plan.nodes:
        if node.path not in present:
            devices.append(node.spec_entry())
        if not _has_allow_rule(rules, node):
            rules.append(node.allow_rule())
    annotations = new.get("annotations")
    if annotations is None:
        annotations = new["annotations"] = {}
    annotations.update(plan.annotations)
    if plan.memlock is not None and isinstance(new.get("process"), dict):
        raise_memlock(new["process"], plan.memlock)
    mounts = new.get("mounts")
    if (
        plan.run_tmpfs
        and isinstance(mounts, list)
        and not any(isinstance(m, dict) and m.get("destination") in DPDK_RUN_DIRS for m in mounts)
    ):
        mounts.append(_json_copy(DPDK_RUN_TMPFS))
    return new


def raise_memlock(process: dict[str, Any], limit: int) -> None:
    """RLIMIT_MEMLOCK at least `limit` (soft and hard); a higher one is kept."""
    rlimits = process.get("rlimits")
    if not isinstance(rlimits, list):
        rlimits = process["rlimits"] = []
    for entry in rlimits:
        if isinstance(entry, dict) and entry.get("type") == "RLIMIT_MEMLOCK":
            for key in ("soft", "hard"):
                if not isinstance(entry.get(key), int) or entry[key] < limit:
                    entry[key] = limit
            return
    rlimits.append({"type": "RLIMIT_MEMLOCK", "hard": limit, "soft": limit})


# On CRI engines a pod's annotations reach the pod sandbox's spec as well as each of its
# containers' specs; these say which one a spec is (Kata's shim tells them apart the same way)
CONTAINER_TYPE_ANNOTATIONS = (
    "io.kubernetes.cri.container-type",  # containerd
    "io.kubernetes.cri-o.ContainerType",
)  # CRI-O
SANDBOX = "sandbox"


def is_sandbox(spec: dict[str, Any]) -> bool:
    annotations = spec.get("annotations")
    return isinstance(annotations, dict) and any(
        annotations.get(key) == SANDBOX for key in CONTAINER_TYPE_ANNOTATIONS
    )


def sandbox_spec(spec: dict[str, Any], settings: Settings, asks: bool) -> dict[str, Any]:
    """A pod sandbox never gets devices: they go to the container that asked. When the pod
    asks for some, the sandbox gets only how Kata must start the VM (the configuration
    file, or Kata 1.x's guest hook path): Kata reads those when it creates the sandbox."""
    new = strip_own_annotations(spec)
    if asks:
        new = dict(new)
        new["annotations"] = {**(new.get("annotations") or {}), **kata_annotations(settings)}
    return new


def strip_own_annotations(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without manifest or guest-hook annotations the wrapper did not write:
    a container that asks for no VFIO device gets none of them."""
    annotations = spec.get("annotations")
    if not isinstance(annotations, dict) or not any(k in annotations for k in OWN_ANNOTATIONS):
        return spec
    new = dict(spec)
    new["annotations"] = {k: v for k, v in annotations.items() if k not in OWN_ANNOTATIONS}
    return new


def load_spec(bundle: StrPath) -> tuple[dict[str, Any], bytes]:
    if not os.path.isdir(bundle):
        raise SpecError(
            f"bundle directory {bundle} does not exist", "pass the OCI bundle with --bundle"
        )
    path = os.path.join(bundle, "config.json")
    try:
        raw = read_regular(path, MAX_CONFIG_JSON_BYTES, "config.json")
    except OSError as exc:
        raise SpecError(
            f"cannot read {path}: {exc.strerror}",
            "the bundle must hold the container's config.json",
        ) from None
    try:
        spec = loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(
            f"{path} is not valid JSON ({exc})", "let the container engine write the bundle"
        ) from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path} is not a JSON object", "let the container engine write the bundle")
    return spec, raw


class EditResult(Value):
    plan: SpecPlan | None
    written: bool
    seconds: float


def edit_bundle(
    bundle: StrPath,
    settings: Settings,
    allocated: tuple[PciAddress, ...] = (),
    macs: dict[PciAddress, str] | None = None,
    spec: dict[str, Any] | None = None,
) -> EditResult:
    """Plan and apply the VFIO edit to <bundle>/config.json; raises before any write.
    `spec`: config.json as the caller has just read it (load_spec), to skip a re-read."""
    started = time.perf_counter()
    if spec is None:
        spec, _raw = load_spec(bundle)
    plan = plan_edit(spec, settings, allocated, macs)
    new = apply_plan(spec, plan) if plan is not None else strip_own_annotations(spec)
    written = False
    if new != spec:
        write_atomically(os.path.join(bundle, "config.json"), dumps(new).encode(), durable=False)
        written = True
    return EditResult(plan, written, time.perf_counter() - started)
