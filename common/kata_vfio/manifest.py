"""The device manifest: what the host wrapper tells the guest hook.

It travels as the annotation ``io.kata-vfio.manifest`` (annotations reach the
guest; ``/dev/vfio`` entries do not). Versioned JSON, parsed strictly on both ends.
Keys a reader does not know are ignored, so an optional key (a device's ``mac`` or
``resource``) added later keeps version 1: an older hook reads a newer host's manifest.
"""

from __future__ import annotations

from kata_vfio import defaults
from kata_vfio.defaults import HOTPLUG_TIMEOUT_DEFAULT, HOTPLUG_TIMEOUT_MAX
from kata_vfio.errors import SpecError
from kata_vfio.jsoncodec import dumps, loads
from kata_vfio.pci import IommuGroup, PciAddress, PciIdentity, hex_number, parse_mac
from kata_vfio.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MANIFEST_ANNOTATION = defaults.MANIFEST_ANNOTATION  # defined there for the hook's lean path
DEVICES_ANNOTATION = "io.kata-vfio.devices"
GUEST_HOOK_PATH_ANNOTATION = "io.katacontainers.config.hypervisor.guest_hook_path"
MANIFEST_VERSION = 1
# `io.kata-vfio.resource.<name>` = host addresses: the container asks for those devices
# (as with io.kata-vfio.devices) and they are resource kata-vfio.io/<name>, as a device
# plugin allocated them. One key per resource: kubelet merges the annotations of all
# the allocations of a container, and keeps only one value of a key they share.
RESOURCE_ANNOTATION_PREFIX = "io.kata-vfio.resource."
RESOURCE_DOMAIN = "kata-vfio.io"
# The environment variable of the devices without a resource name (named by address,
# /dev/vfio/<N> or io.kata-vfio.select): as if they were resource kata-vfio.io/devices.
UNNAMED_RESOURCE = RESOURCE_DOMAIN + "/devices"

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_CHARS = _ALNUM | frozenset("-_.")
_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def is_resource_name_part(text: str) -> bool:
    """Kubernetes' name part of a qualified name (an extended resource's after the '/'):
    at most 63 letters, digits, '-', '_', '.', a letter or digit at each end."""
    return (
        0 < len(text) <= 63
        and set(text) <= _NAME_CHARS
        and text[0] in _ALNUM
        and text[-1] in _ALNUM
    )


def is_resource_name(text: object) -> bool:
    """An extended resource name, DOMAIN/NAME (kata-vfio.io/nvme, intel.com/sriov_net)."""
    if not isinstance(text, str) or text.count("/") != 1:
        return False
    domain, name = text.split("/")
    return (
        0 < len(domain) <= 253
        and set(domain) <= _DOMAIN_CHARS
        and domain[0] in _ALNUM
        and domain[-1] in _ALNUM
        and is_resource_name_part(name)
    )


def resource_env_name(resource: str | None) -> str:
    """The variable a Kubernetes device plugin sets for a resource's PCI addresses:
    PCIDEVICE_ and the name upper-cased, every other character '_'
    (kata-vfio.io/nvme -> PCIDEVICE_KATA_VFIO_IO_NVME); None is UNNAMED_RESOURCE's."""
    name = (resource or UNNAMED_RESOURCE).upper()
    return "PCIDEVICE_" + "".join(c if c in _ALNUM else "_" for c in name)


def _parse_mac(value: object) -> str | None:
    if value is None:
        return None
    mac = parse_mac(value)
    if mac is not None:
        return mac
    raise SpecError(f"manifest: {value!r} is not a MAC address", "regenerate the manifest")


def _parse_id(obj: dict[str, Any], key: str, bits: int) -> int:
    value = obj.get(key)
    if isinstance(value, str) and value.startswith("0x"):
        number = hex_number(value[2:], bits // 4)  # as to_obj writes it
        if number is not None:
            return number
    raise SpecError(
        f"manifest: {key}={value!r} is not a {bits}-bit hex number", "regenerate the manifest"
    )


def _parse_resource(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and is_resource_name(value):
        return value
    raise SpecError(f"manifest: {value!r} is not a resource name", "regenerate the manifest")


class ManifestDevice(Value):
    """One device of the manifest: where it sat on the host, what it is, its MAC, and
    the resource name it was allocated as (kata-vfio.io/nvme), if any."""

    host_address: PciAddress
    identity: PciIdentity
    mac: str | None = None
    resource: str | None = None

    def to_obj(self) -> dict[str, Any]:
        ident = self.identity
        obj: dict[str, Any] = {
            "host_address": str(self.host_address),
            "vendor": f"0x{ident.vendor:04x}",
            "device": f"0x{ident.device:04x}",
            "subsystem_vendor": f"0x{ident.subsystem_vendor:04x}",
            "subsystem_device": f"0x{ident.subsystem_device:04x}",
            "class": f"0x{ident.class_code:06x}",
        }
        if self.mac:
            obj["mac"] = self.mac
        if self.resource:
            obj["resource"] = self.resource
        return obj

    @classmethod
    def from_obj(cls, obj: Any) -> ManifestDevice:
        if not isinstance(obj, dict) or not isinstance(obj.get("host_address"), str):
            raise SpecError(
                "manifest: a device entry has no host_address", "regenerate the manifest"
            )
        identity = PciIdentity(
            vendor=_parse_id(obj, "vendor", 16),
            device=_parse_id(obj, "device", 16),
            subsystem_vendor=_parse_id(obj, "subsystem_vendor", 16),
            subsystem_device=_parse_id(obj, "subsystem_device", 16),
            class_code=_parse_id(obj, "class", 24),
        )
        return cls(
            PciAddress.parse(obj["host_address"]),
            identity,
            _parse_mac(obj.get("mac")),
            _parse_resource(obj.get("resource")),
        )


class ManifestGroup(Value):
    host_group: IommuGroup
    devices: tuple[ManifestDevice, ...]


class Manifest(Value):
    groups: tuple[ManifestGroup, ...]
    # how long the guest hook waits for devices the hypervisor hot-plugs late
    hotplug_timeout: float = HOTPLUG_TIMEOUT_DEFAULT

    @property
    def devices(self) -> list[ManifestDevice]:
        return [d for g in self.groups for d in g.devices]

    def to_json(self) -> str:
        return dumps(
            {
                "version": MANIFEST_VERSION,
                "hotplug_timeout": self.hotplug_timeout,
                "groups": [
                    {"host_group": g.host_group.number, "devices": [d.to_obj() for d in g.devices]}
                    for g in self.groups
                ],
            },
            compact=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = loads(text)
        except ValueError as exc:
            raise SpecError(
                f"manifest annotation is not JSON ({exc})",
                "regenerate it with the kata-vfio wrapper",
            ) from None
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            raise SpecError(
                f"manifest version {data.get('version') if isinstance(data, dict) else None!r}"
                f" is not {MANIFEST_VERSION}",
                "use the same kata-vfio release on the host and in the guest image",
            )
        groups = []
        for g in data.get("groups") or []:
            number = g.get("host_group") if isinstance(g, dict) else None
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise SpecError(
                    "manifest: a group has no host_group number", "regenerate the manifest"
                )
            devices = tuple(ManifestDevice.from_obj(d) for d in g.get("devices") or [])
            groups.append(ManifestGroup(IommuGroup(number), devices))
        timeout = data.get("hotplug_timeout", HOTPLUG_TIMEOUT_DEFAULT)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 <= timeout <= HOTPLUG_TIMEOUT_MAX
        ):
            raise SpecError(
                f"manifest: hotplug_timeout={timeout!r} is not 0..{HOTPLUG_TIMEOUT_MAX:g} seconds",
                "fix hotplug_timeout in the host's kata-vfio config.toml",
            )
        return cls(tuple(groups), float(timeout))
