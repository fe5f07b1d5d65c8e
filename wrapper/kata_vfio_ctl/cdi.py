"""A CDI spec naming the host's VFIO devices by PCI address.

`kata-vfio-ctl cdi` writes /etc/cdi/kata-vfio.json: kind `kata-vfio.io/pci`, one device per
endpoint of every usable IOMMU group, so `podman run --device kata-vfio.io/pci=0000:03:00.0`
works without knowing the group number. Each device brings `/dev/vfio/<group>`; any of
them brings `/dev/vfio/vfio`. Under `--runtime kata-vfio` the wrapper then resolves the
group from that `/dev/vfio/<group>` entry exactly as for `--device /dev/vfio/<group>`.

cdiVersion is 0.5.0 because podman 4.3 reads nothing newer. The device-level
`annotations` of CDI 0.6.0 are not an option: podman 4.3 refuses such a spec, and CDI
annotations are notes to the engine, not OCI annotations of the container.

The spec is a snapshot: run the command again after `bind`/`restore`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from kata_vfio.errors import DeviceError
from kata_vfio.pci import (
    VFIO_CONTAINER_DEVNUM,
    IommuGroup,
    PciAddress,
    PciDevice,
    group_members,
    list_addresses,
    read_device,
    usable_by_vfio,
    vfio_group_devnum,
)
from kata_vfio.value import Value

CDI_VERSION = "0.5.0"
CDI_KIND = "kata-vfio.io/pci"
DEFAULT_SPEC = Path("/etc/cdi/kata-vfio.json")


class UsableGroup(Value):
    """An IOMMU group a container can have: all members fit VFIO, /dev/vfio/N exists."""

    group: IommuGroup
    devnum: tuple[int, int]
    endpoints: tuple[PciAddress, ...]  # the members that are not bridges


class SkippedGroup(Value):
    group: IommuGroup
    reason: str


def _why_unusable(members: list[PciDevice]) -> str | None:
    for dev in members:
        if not usable_by_vfio(dev):
            return (
                f"{dev.address} is on {dev.driver} "
                f"(hand the group to vfio-pci: kata-vfio-ctl bind {dev.address})"
            )
    return None


def survey_groups(sysfs: Path) -> tuple[list[UsableGroup], list[SkippedGroup]]:
    """Every IOMMU group with a PCI function, sorted: usable ones and why the others are not."""
    groups = sorted(
        {
            dev.iommu_group
            for dev in (read_device(sysfs, addr) for addr in list_addresses(sysfs))
            if dev.iommu_group is not None
        }
    )
    usable, skipped = [], []
    for group in groups:
        members = [read_device(sysfs, addr) for addr in group_members(sysfs, group)]
        reason = _why_unusable(members)
        endpoints = tuple(dev.address for dev in members if not dev.is_bridge)
        if reason is None and not endpoints:
            reason = "it holds only bridges"
        if reason is None:
            try:
                devnum = vfio_group_devnum(sysfs, group)
            except DeviceError:
                reason = (
                    f"/dev/vfio/{group} does not exist (vfio-pci has not claimed it: "
                    f"kata-vfio-ctl bind {endpoints[0]})"
                )
        if reason is not None:
            skipped.append(SkippedGroup(group, reason))
        else:
            usable.append(UsableGroup(group, devnum, endpoints))
    return usable, skipped


def _char_node(path: str, devnum: tuple[int, int]) -> dict[str, Any]:
    # type, major and minor given: the engine creates the node in the container from
    # these and does not stat a host node (CDI only fills in what is missing).
    return {"path": path, "type": "c", "major": devnum[0], "minor": devnum[1]}


def build_spec(groups: list[UsableGroup]) -> dict[str, Any]:
    """The CDI spec for these groups (at least one: CDI refuses a spec without devices)."""
    by_address = sorted((addr, g) for g in groups for addr in g.endpoints)
    devices = [
        {
            "name": str(addr),
            "containerEdits": {"deviceNodes": [_char_node(f"/dev/vfio/{g.group}", g.devnum)]},
        }
        for addr, g in by_address
    ]
    return {
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": devices,
        # applied once whenever any of the devices above is asked for
        "containerEdits": {"deviceNodes": [_char_node("/dev/vfio/vfio", VFIO_CONTAINER_DEVNUM)]},
    }


SPEC_LIMIT = 4 << 20  # a spec of every function of a big host is well below this


def spec_is_ours(path: Path, kind: str = CDI_KIND) -> bool | None:
    """None: no file there; True: a CDI spec of our `kind` (ours to replace or remove;
    the device plugin writes one of kind kata-vfio.io/<resource> per resource);
    False: anything else (another vendor's spec, a FIFO, a device ...), never touched."""
    from kata_vfio.errors import ConfigError
    from kata_vfio_ctl.textfile import read_bytes

    if os.path.islink(path):
        return False
    try:
        raw = read_bytes(path, "CDI spec", SPEC_LIMIT)
    except ConfigError:
        return False
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("kind") == kind


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    from kata_vfio.errors import ConfigError
    from kata_vfio.files import write_atomically

    kind = str(spec["kind"])
    if spec_is_ours(path, kind) is False:
        raise ConfigError(
            f"{path} exists and is not a {kind} spec; nothing was changed",
            f"pass --output with a file of its own, e.g. {DEFAULT_SPEC}",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(spec, indent=2) + "\n").encode(), mode=0o644)


def cmd_cdi(args: argparse.Namespace) -> int:
    from kata_vfio_host.settings import load_settings

    sysfs = Path(args.sysfs or load_settings().sysfs)
    usable, skipped = survey_groups(sysfs)
    for group in skipped:
        print(f"IOMMU group {group.group} left out: {group.reason}", file=sys.stderr)
    if not usable:
        # a stale spec would offer devices that are gone or back on their host driver
        removed = args.output != "-" and _remove(Path(args.output))
        raise DeviceError(
            "no IOMMU group is usable by VFIO on this host, so there is no CDI device"
            + (f" ({args.output} removed)" if removed else ""),
            "hand a device to vfio-pci first: kata-vfio-ctl bind ADDRESS",
        )
    spec = build_spec(usable)
    if args.output == "-":
        print(json.dumps(spec, indent=2))
        return 0
    write_spec(Path(args.output), spec)
    names = ", ".join(f"{CDI_KIND}={d['name']}" for d in spec["devices"])
    print(f"{args.output}: {len(spec['devices'])} devices: {names}")
    return 0


def _remove(path: Path) -> bool:
    """Remove our stale spec; a file that is not ours stays where it is."""
    if not spec_is_ours(path):
        return False
    path.unlink()
    return True


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("cdi", help=f"write a CDI spec ({CDI_KIND}=ADDRESS) for usable groups")
    p.add_argument(
        "--output",
        default=str(DEFAULT_SPEC),
        metavar="PATH",
        help=f"where to write it, - for stdout (default: {DEFAULT_SPEC})",
    )
    p.add_argument("--sysfs", help="sysfs root (default: from config.toml, else /sys)")
    p.set_defaults(func=cmd_cdi)
