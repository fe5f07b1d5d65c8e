"""Records of an earlier boot: told apart by the boot id, and dropped (the reboot ended
every bind and container they describe)."""

from __future__ import annotations

import os

from kata_vfio.errors import DeviceError
from kata_vfio.jsoncodec import loads
from kata_vfio.pci import IommuGroup
from kata_vfio_host.ledger import (
    BOOT_ID_PATH,
    UNKNOWN_BOOT,
    ContainerId,
    DeviceEntry,
    Host,
    VfOriginal,
    _join,
    _opt_str,
    earlier_boot,
    editing,
    group_locks,
    read_journal_file,
)


class EarlierBoot:
    """What `forget_earlier_boots` dropped."""

    def __init__(self) -> None:
        self.claims: dict[str, list[int]] = {}  # container -> the groups it claimed
        self.devices: dict[str, DeviceEntry] = {}
        self.vf_configs: dict[str, VfOriginal] = {}
        self.markers: list[str] = []  # containers whose marker went


def forget_earlier_boots(host: Host) -> EarlierBoot:
    """Drop what earlier boots left: their claims (no container survives a reboot), their
    device entries and VF settings records (the reboot reset those devices: there is
    nothing left to give back) and their containers' markers. Records of this boot stay.
    Under the locks of every group involved, as a release takes them."""
    if host.boot_id == UNKNOWN_BOOT:
        raise DeviceError(
            f"cannot read this boot's id ({BOOT_ID_PATH})",
            "mount /proc: earlier boots' records are told apart by it",
        )
    first = read_journal_file(host)
    groups = {g for g, c in first.claims.items() if earlier_boot(host, c.boot_id)}
    groups |= {e.group for e in first.devices.values() if earlier_boot(host, e.boot_id)}
    groups |= {
        v.group
        for v in first.vf_configs.values()
        if v.group is not None and earlier_boot(host, v.boot_id)
    }
    dropped = EarlierBoot()
    with group_locks(host, [IommuGroup(g) for g in groups]), editing(host) as journal:
        current = {
            c.container for c in journal.claims.values() if not earlier_boot(host, c.boot_id)
        }
        for group, claim in sorted(journal.claims.items()):
            if earlier_boot(host, claim.boot_id):
                dropped.claims.setdefault(claim.container, []).append(group)
                del journal.claims[group]
        for addr, entry in sorted(journal.devices.items()):
            holder = (
                entry.owner[len("container ") :] if entry.owner.startswith("container ") else None
            )
            if earlier_boot(host, entry.boot_id) and holder not in current:
                dropped.devices[addr] = entry
                del journal.devices[addr]
        for addr, original in sorted(journal.vf_configs.items()):
            if earlier_boot(host, original.boot_id):
                dropped.vf_configs[addr] = original
                del journal.vf_configs[addr]
        markers = _join(host.state_dir, "containers")
        for name in sorted(os.listdir(markers)) if os.path.isdir(markers) else []:
            if name in current or ContainerId.maybe(name) is None:
                continue
            try:
                with open(_join(markers, name), "rb") as f:
                    info = loads(f.read())
                boot = _opt_str(info.get("boot_id")) if isinstance(info, dict) else None
            except (OSError, ValueError):
                boot = None
            if earlier_boot(host, boot) or name in dropped.claims:
                os.unlink(_join(markers, name))
                dropped.markers.append(name)
    return dropped
