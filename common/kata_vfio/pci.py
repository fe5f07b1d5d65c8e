"""PCI addresses, IOMMU groups and the facts sysfs gives about a device.

Every function that reads sysfs takes the sysfs root as a path (``/sys`` in
production, a fake tree in tests) and gives paths back as strings. Untrusted strings
are parsed into `PciAddress` / `IommuGroup` before they are ever joined to a path.

On the hot paths (the lean-import rule, see `kata_vfio`): paths are `os.path` strings.

Hex numbers and MAC addresses are read here, the one strict way every reader shares: PCI
addresses, vendor/device/class IDs (devices -d, io.kata-vfio.select, the persistent-bind
file, pci.ids, the manifest), the ledger's keys, the MACs of VFs (the manifest,
io.kata-vfio.vf-config). Lower-case digits only, an exact width, nothing else:
`int(text, 16)` alone would also take `0x`, a sign, `_` between digits and surrounding
white space. Callers that accept upper case from an operator lower-case the text first.
(Here, not in a module of their own: every reader of them reads PCI text too, and each
module more costs the hook's start.)
"""

from __future__ import annotations

import os

from kata_vfio.errors import DeviceError
from kata_vfio.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import StrPath

_join = os.path.join

VFIO_PCI = "vfio-pci"
PCI_STUB = "pci-stub"
CLASS_BRIDGE_PCI = 0x0604  # base class 0x06 (bridge), subclass 0x04 (PCI-to-PCI)
CLASS_NETWORK = 0x02

HEX_DIGITS = frozenset("0123456789abcdef")


def hex_number(text: str, *widths: int) -> int | None:
    """`text` as a number when it is exactly one of `widths` lower-case hex digits, else None."""
    if text and len(text) in widths and set(text) <= HEX_DIGITS:
        return int(text, 16)
    return None


def parse_mac(text: object) -> str | None:
    """A MAC address (six `:`-separated octets of two hex digits, either case), lower-cased;
    None when `text` is not one."""
    if not isinstance(text, str):
        return None
    mac = text.lower()
    octets = mac.split(":")
    if len(octets) == 6 and all(hex_number(o, 2) is not None for o in octets):
        return mac
    return None


def _hex_field(text: str, width: int, what: str, original: str) -> int:
    number = hex_number(text, width)
    if number is None:
        raise DeviceError(
            f"malformed PCI address {original!r}: {what} must be {width} hex digits",
            "write addresses as DDDD:BB:SS.F, e.g. 0000:03:00.0",
        )
    return number


class PciAddress(Value):
    """A PCI function address, ``DDDD:BB:SS.F``; prints canonically (lower-case).
    Ordered and hashed as (domain, bus, slot, function)."""

    domain: int
    bus: int
    slot: int
    function: int

    def __repr__(self) -> str:
        return f"PciAddress({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        raw = text.strip().lower()
        parts = raw.split(":")
        if len(parts) != 3 or raw.count(".") != 1 or not parts[2].count("."):
            raise DeviceError(
                f"malformed PCI address {text!r}",
                "write addresses as DDDD:BB:SS.F, e.g. 0000:03:00.0",
            )
        domain_s, bus_s, rest = parts
        slot_s, func_s = rest.split(".")
        # Domains are 4 hex digits, or 5 behind an Intel VMD controller.
        domain_width = 5 if len(domain_s) == 5 else 4
        domain = _hex_field(domain_s, domain_width, "the domain", text)
        bus = _hex_field(bus_s, 2, "the bus", text)
        slot = _hex_field(slot_s, 2, "the slot", text)
        function = _hex_field(func_s, 1, "the function", text)
        if slot > 0x1F or function > 7:
            raise DeviceError(
                f"malformed PCI address {text!r}: slot must be <= 1f and function <= 7",
                "write addresses as DDDD:BB:SS.F, e.g. 0000:03:00.0",
            )
        return cls(domain, bus, slot, function)

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


class IommuGroup(Value):
    """An IOMMU group number, as in ``/dev/vfio/<N>``."""

    number: int

    def __repr__(self) -> str:
        return f"IommuGroup({self.number})"

    @classmethod
    def parse(cls, text: str) -> IommuGroup:
        if not text or not text.isascii() or not text.isdigit() or len(text) > 9:
            raise DeviceError(
                f"{text!r} is not an IOMMU group number",
                "IOMMU groups are plain decimal numbers, as in /dev/vfio/12",
            )
        return cls(int(text))

    def __str__(self) -> str:
        return str(self.number)


class PciIdentity(Value):
    """What a PCI function is, as opposed to where it sits: the IDs that do not change
    when the function is passed from host to guest."""

    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int  # 24 bits: base class, subclass, programming interface

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"

    def describe(self) -> str:
        return f"{self.ids} class {self.class_code:06x}"


class PciDevice(Value):
    """What sysfs says about one PCI function."""

    address: PciAddress
    identity: PciIdentity
    driver: str | None
    iommu_group: IommuGroup | None
    driver_override: str | None = None
    physfn: PciAddress | None = None  # the PF of an SR-IOV VF
    net_interfaces: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"PciDevice({self.address}, {self.identity.describe()}, driver={self.driver}, "
            f"group={self.iommu_group})"
        )

    @property
    def vendor(self) -> int:
        return self.identity.vendor

    @property
    def device(self) -> int:
        return self.identity.device

    @property
    def subsystem_vendor(self) -> int:
        return self.identity.subsystem_vendor

    @property
    def subsystem_device(self) -> int:
        return self.identity.subsystem_device

    @property
    def class_code(self) -> int:
        return self.identity.class_code

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 8 == CLASS_BRIDGE_PCI

    @property
    def is_network(self) -> bool:
        return self.class_code >> 16 == CLASS_NETWORK

    @property
    def ids(self) -> str:
        return self.identity.ids


def is_vfio_driver(driver: str | None) -> bool:
    """vfio-pci itself or a vendor variant such as mlx5_vfio_pci."""
    return driver is not None and (driver == VFIO_PCI or driver.endswith("_vfio_pci"))


def usable_by_vfio(dev: PciDevice) -> bool:
    """The kernel's group viability rule for one member of an IOMMU group."""
    return (
        dev.driver is None or dev.driver == PCI_STUB or is_vfio_driver(dev.driver) or dev.is_bridge
    )


# --- sysfs paths: the kernel contract in one place ------------------------------------


def device_dir(sysfs: StrPath, addr: PciAddress) -> str:
    return _join(sysfs, "bus/pci/devices", str(addr))


def group_devices_dir(sysfs: StrPath, group: IommuGroup) -> str:
    return _join(sysfs, "kernel/iommu_groups", str(group), "devices")


def driver_dir(sysfs: StrPath, driver: str) -> str:
    return _join(sysfs, "bus/pci/drivers", driver)


def drivers_probe_path(sysfs: StrPath) -> str:
    return _join(sysfs, "bus/pci/drivers_probe")


def vfio_group_class_dir(sysfs: StrPath, group: IommuGroup) -> str:
    return _join(sysfs, "class/vfio", str(group))


def read_attr(path: StrPath) -> str:
    """A sysfs attribute as text; a non-ASCII byte or an unreadable file is a DeviceError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # no io objects: 250 reads a create
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise DeviceError(
            f"{path} holds bytes that are not ASCII",
            "is this a sysfs tree? check the attribute by hand",
        ) from None
    except PermissionError:
        raise DeviceError(f"cannot read {path}: permission denied", "run as root") from None


def _read_hex(path: StrPath) -> int:
    text = read_attr(path)
    try:
        return int(text, 16)
    except ValueError:
        raise DeviceError(
            f"{path} holds {text!r}, not a hex number",
            "is this a sysfs tree? check the attribute by hand",
        ) from None


def read_link(path: StrPath) -> str | None:
    """The last component of a sysfs symlink's target; None when the link is absent.

    Absent (no driver, no IOMMU group) is a fact about the device; unreadable
    (EACCES, EIO) is not, and is reported as such instead of being taken for absent.
    """
    try:
        return os.path.basename(os.readlink(path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == 22:  # EINVAL: a plain file where a link was expected
            raise DeviceError(f"{path} is not a symlink", "is this a sysfs tree?") from None
        raise DeviceError(
            f"cannot read the link {path}: {exc.strerror}", "run as root, and check the kernel log"
        ) from None


def read_identity(base: str) -> PciIdentity:
    return PciIdentity(
        vendor=_read_hex(_join(base, "vendor")),
        device=_read_hex(_join(base, "device")),
        subsystem_vendor=_read_hex(_join(base, "subsystem_vendor")),
        subsystem_device=_read_hex(_join(base, "subsystem_device")),
        class_code=_read_hex(_join(base, "class")),
    )


def read_device(sysfs: StrPath, addr: PciAddress) -> PciDevice:
    """Read one device's facts; `DeviceError` when sysfs has no such device."""
    base = device_dir(sysfs, addr)
    if not os.path.isdir(base):
        raise DeviceError(
            f"no PCI device {addr} on this host",
            "list the host's devices with: kata-vfio-ctl devices",
        )
    group_name = read_link(_join(base, "iommu_group"))
    physfn_name = read_link(_join(base, "physfn"))
    override_path = _join(base, "driver_override")
    override = read_attr(override_path) if os.path.exists(override_path) else ""
    net_dir = _join(base, "net")
    nets = tuple(sorted(os.listdir(net_dir))) if os.path.isdir(net_dir) else ()
    return PciDevice(
        address=addr,
        identity=read_identity(base),
        driver=read_link(_join(base, "driver")),
        iommu_group=IommuGroup.parse(group_name) if group_name else None,
        driver_override=None if override in ("", "(null)") else override,
        physfn=PciAddress.parse(physfn_name) if physfn_name else None,
        net_interfaces=nets,
    )


class BindState(Value):
    """What moving a PCI function between drivers needs to know, and to give back."""

    address: PciAddress
    driver: str | None
    driver_override: str | None
    is_bridge: bool


def read_bind_state(sysfs: StrPath, addr: PciAddress) -> BindState:
    """A device's driver, its driver_override and whether it is a bridge (bridges stay
    where they are): 3 of `read_device`'s 12 reads, for binds of many devices at once."""
    base = device_dir(sysfs, addr)
    try:
        class_code = _read_hex(_join(base, "class"))
    except FileNotFoundError:
        read_device(sysfs, addr)  # "no PCI device ..."
        raise
    try:
        override = read_attr(_join(base, "driver_override"))
    except FileNotFoundError:
        override = ""
    return BindState(
        addr,
        read_link(_join(base, "driver")),
        None if override in ("", "(null)") else override,
        class_code >> 8 == CLASS_BRIDGE_PCI,
    )


def list_addresses(sysfs: StrPath) -> list[PciAddress]:
    """Every PCI function sysfs knows, sorted."""
    root = _join(sysfs, "bus/pci/devices")
    if not os.path.isdir(root):
        return []
    return sorted(PciAddress.parse(name) for name in os.listdir(root))


def group_of(sysfs: StrPath, addr: PciAddress) -> IommuGroup:
    """The IOMMU group of a device, or a `DeviceError` saying how to get one."""
    base = device_dir(sysfs, addr)
    group_name = read_link(_join(base, "iommu_group"))
    if group_name:
        return IommuGroup.parse(group_name)
    if not os.path.isdir(base):
        read_device(sysfs, addr)  # "no PCI device ..."
    raise DeviceError(
        f"PCI device {addr} has no IOMMU group",
        "enable the IOMMU: boot the host with intel_iommu=on (Intel) or amd_iommu=on (AMD)",
    )


def group_members(sysfs: StrPath, group: IommuGroup) -> list[PciAddress]:
    members_dir = group_devices_dir(sysfs, group)
    if not os.path.isdir(members_dir):
        raise DeviceError(
            f"IOMMU group {group} does not exist on this host",
            "list groups and their devices with: kata-vfio-ctl devices",
        )
    return sorted(PciAddress.parse(name) for name in os.listdir(members_dir))


def vfio_group_devnum(sysfs: StrPath, group: IommuGroup) -> tuple[int, int]:
    """major:minor of ``/dev/vfio/<group>`` (dynamic: read from sysfs)."""
    dev_file = _join(vfio_group_class_dir(sysfs, group), "dev")
    try:
        major_s, minor_s = read_attr(dev_file).split(":")
        return int(major_s), int(minor_s)
    except FileNotFoundError:
        raise DeviceError(
            f"/dev/vfio/{group} does not exist: IOMMU group {group} is not bound to vfio-pci",
            f"bind its devices first: kata-vfio-ctl bind <address of a device in group {group}>",
        ) from None
    except ValueError:
        raise DeviceError(f"cannot parse {dev_file}", "is this a sysfs tree?") from None


VFIO_CONTAINER_DEVNUM = (10, 196)  # /dev/vfio/vfio, misc device


class ClassIndex:
    """Where each entry of /sys/class/<cls> lives (its resolved device path), resolved once:
    asking about several devices then costs no more realpath walks of sysfs."""

    def __init__(self, sysfs: StrPath) -> None:
        self._sysfs = sysfs
        self._paths: dict[str, dict[str, str]] = {}

    def paths(self, cls: str) -> dict[str, str]:
        found = self._paths.get(cls)
        if found is None:
            class_dir = _join(self._sysfs, "class", cls)
            try:
                names = os.listdir(class_dir)
            except OSError:
                names = []
            found = self._paths[cls] = {
                name: os.path.realpath(_join(class_dir, name)) for name in names
            }
        return found


def _class_entries_below(
    sysfs: StrPath, cls: str, addr: PciAddress, index: ClassIndex | None
) -> set[str]:
    """Names in /sys/class/<cls> whose device lies anywhere below the PCI function:
    a virtio NIC's interface sits at <function>/virtio2/net/eth0, not <function>/net/."""
    base = os.path.realpath(device_dir(sysfs, addr)) + "/"
    paths = (index or ClassIndex(sysfs)).paths(cls)
    return {name for name, path in paths.items() if path.startswith(base)}


def interfaces_below(
    sysfs: StrPath, addr: PciAddress, index: ClassIndex | None = None
) -> list[str]:
    """Network interfaces the PCI function provides, directly or through a child device.
    `index`: /sys/class resolved once for several calls."""
    direct = _join(device_dir(sysfs, addr), "net")
    names = set(os.listdir(direct)) if os.path.isdir(direct) else set()
    return sorted(names | _class_entries_below(sysfs, "net", addr, index))


def block_devices_below(
    sysfs: StrPath, addr: PciAddress, index: ClassIndex | None = None
) -> list[str]:
    """Block devices (disks and partitions) the PCI function provides, at any depth."""
    return sorted(_class_entries_below(sysfs, "block", addr, index))
