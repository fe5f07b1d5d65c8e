"""Devices chosen by kind: ``io.kata-vfio.select`` (OpenNebula's model).

A request is ``VENDOR:DEVICE[:CLASS][*COUNT]`` in lspci's ``-d`` syntax: each part
hex, empty or ``*`` for any; CLASS is the class and subclass (``0200``) or the full
24-bit code. ``1b36:0010*2`` asks for two NVMe functions, ``::0200`` for any
Ethernet function. The wrapper picks COUNT free functions that match, virtual
functions before physical ones, then in address order. Free means: not held by a
live container (ledger), an IOMMU group that VFIO can use as it is or that the
admin's allow-list lets kata-vfio bind, and no other endpoint of that group picked
already. All of it happens under one allocation lock, so concurrent creates never
get the same device; the claims themselves go through the ledger like any request.
"""

from __future__ import annotations

import os
import re
from typing import Any

from kata_vfio.defaults import SELECT_ANNOTATION
from kata_vfio.errors import DeviceError, KataVfioError
from kata_vfio.pci import (
    IommuGroup,
    PciAddress,
    PciDevice,
    device_dir,
    group_members,
    hex_number,
    is_vfio_driver,
    list_addresses,
    read_device,
)
from kata_vfio.value import Value
from kata_vfio_host.allowlist import parse_allow_list
from kata_vfio_host.ledger import ContainerId, Host, read_journal_file
from kata_vfio_host.locks import Locks
from kata_vfio_host.owners import claim_gone

# ASCII digits only: \d would take other scripts' digits, which int() then reads
_REQUEST = re.compile(r"^(?P<ids>.*?)(?:\*(?P<count>[0-9]+))?$")
MAX_COUNT = 256


class SelectRequest(Value):
    text: str
    vendor: int | None
    device: int | None
    class_code: int | None  # 16 bits (class, subclass) or 24 bits
    class_bits: int
    wanted: int

    def matches(self, dev: PciDevice) -> bool:
        if self.vendor is not None and dev.vendor != self.vendor:
            return False
        if self.device is not None and dev.device != self.device:
            return False
        if self.class_code is None:
            return True
        have = dev.class_code >> 8 if self.class_bits == 16 else dev.class_code
        return have == self.class_code


IDS_SYNTAX = "VENDOR:DEVICE[:CLASS] in hex, empty or * for any"


def _part(
    text: str,
    widths: tuple[int, ...],
    whole: str,
    source: str,
    error: type[KataVfioError],
    example: str,
) -> int | None:
    if text in ("", "*"):
        return None
    number = hex_number(text, *widths)
    if number is None:
        digits = " or ".join(str(w) for w in widths)
        raise error(
            f"{source}: {whole!r}: {text!r} is not a hex ID of {digits} digits",
            f"write {IDS_SYNTAX}, e.g. {example}",
        )
    return number


def parse_ids(
    text: str,
    source: str,
    *,
    error: type[KataVfioError] = DeviceError,
    example: str = "8086:154c or ::0200",
    whole: str | None = None,
    wanted: int = 1,
) -> SelectRequest:
    """lspci's ``-d`` syntax, the one parser of ``kata-vfio-ctl devices -d`` and
    ``io.kata-vfio.select``: VENDOR:DEVICE[:CLASS], each part hex, empty or ``*``;
    CLASS is the class and subclass (``0200``) or the full 24-bit code (``020000``).
    `source` names where the text came from in the message."""
    whole = text if whole is None else whole
    fields = text.lower().split(":")
    if not 2 <= len(fields) <= 3:
        raise error(
            f"{source}: {whole!r} is not VENDOR:DEVICE[:CLASS]",
            f"write {IDS_SYNTAX}, e.g. {example}",
        )
    cls = fields[2] if len(fields) == 3 else ""
    return SelectRequest(
        whole,
        _part(fields[0], (4,), whole, source, error, example),
        _part(fields[1], (4,), whole, source, error, example),
        _part(cls, (4, 6), whole, source, error, example),
        24 if len(cls) == 6 else 16,
        wanted,
    )


def parse_select(text: str) -> list[SelectRequest]:
    """One or more requests separated by commas or blanks."""
    parts = text.replace(",", " ").split()
    example = "1b36:0010*2, 8086:154c or ::0200"
    if not parts:
        raise DeviceError(
            f"annotation {SELECT_ANNOTATION} is empty",
            "write VENDOR:DEVICE[:CLASS][*COUNT], e.g. 1b36:0010*2",
        )
    requests = []
    for raw in parts:
        m = _REQUEST.match(raw.lower())
        if m is None:
            raise DeviceError(
                f"{SELECT_ANNOTATION}: {raw!r} is not VENDOR:DEVICE[:CLASS][*COUNT]",
                f"e.g. {example}",
            )
        digits = m.group("count") or "1"
        count = int(digits) if len(digits) <= len(str(MAX_COUNT)) else MAX_COUNT + 1
        request = parse_ids(
            m.group("ids"), SELECT_ANNOTATION, example=example, whole=raw, wanted=count
        )
        if not 1 <= count <= MAX_COUNT:
            asked = digits if len(digits) <= 12 else f"{digits[:12]}… ({len(digits)} digits)"
            raise DeviceError(
                f"{SELECT_ANNOTATION}: asks for {asked} devices", f"ask for 1 to {MAX_COUNT}"
            )
        requests.append(request)
    return requests


def virtual_function_count(host: Host, addr: PciAddress) -> int:
    import os

    try:
        return sum(1 for n in os.listdir(device_dir(host.sysfs, addr)) if n.startswith("virtfn"))
    except OSError:
        return 0


def allocation_lock(host: Host) -> Locks:
    return Locks([os.path.join(host.state_dir, "locks", "allocate")])


def _group_state(
    host: Host,
    group: IommuGroup,
    allow: tuple[str, ...],
    holders: _LiveHolders,
    cache: dict[int, str | None],
) -> str | None:
    """None when the group can be given to a container; else why not."""
    if group.number in cache:
        return cache[group.number]
    why: str | None = None
    if group.number in holders:
        why = f"held by {holders[group.number]}"
    else:
        members = [read_device(host.sysfs, m) for m in group_members(host.sysfs, group)]
        rules = parse_allow_list(allow)
        for dev in members:
            if dev.is_bridge or is_vfio_driver(dev.driver):
                continue
            if not any(rule.matches(dev) for rule in rules):  # it would have to be bound
                why = (
                    f"is in IOMMU group {group} with {dev.address} on "
                    f"{dev.driver or 'no driver'}, not in the auto-bind allow-list"
                )
                break
    cache[group.number] = why
    return why


class _LiveHolders:
    """IOMMU group -> the live container (other than the one allocating) that holds it,
    asked group by group: whether an owner is gone is looked up (its bundle, its token)
    only for the groups an allocation considers, not for every claim on the host."""

    def __init__(self, host: Host, claims: dict[int, Any], container: str | None) -> None:
        self._host = host
        self._claims = claims
        self._container = container
        self._known: dict[int, str | None] = {}

    def get(self, group: int) -> str | None:
        if group not in self._known:
            claim = self._claims.get(group)
            self._known[group] = (
                None
                if claim is None
                or claim.container == self._container
                or claim_gone(self._host, claim)
                else claim.owner
            )
        return self._known[group]

    def __contains__(self, group: object) -> bool:
        return isinstance(group, int) and self.get(group) is not None

    def __getitem__(self, group: int) -> str:
        holder = self.get(group)
        if holder is None:
            raise KeyError(group)
        return holder


class Pool:
    """The host's devices as an allocation sees them. What a device is (IDs, group) may
    be read before the allocation lock; who holds what, drivers and VF counts are read
    by `refresh` and `why_not_free`, under it."""

    def __init__(self, host: Host, allow: tuple[str, ...], container: str | None = None) -> None:
        self.host = host
        self.allow = allow
        self.container = container
        self.devices: list[PciDevice] = []
        for addr in list_addresses(host.sysfs):
            dev = read_device(host.sysfs, addr)
            if not dev.is_bridge and dev.iommu_group is not None:
                self.devices.append(dev)
        # virtual functions first (they exist to be handed out), then address order
        self.devices.sort(key=lambda d: (d.physfn is None, d.address))
        self.refresh()

    def refresh(self) -> None:
        """Who holds which group now (call under the allocation lock)."""
        self.holders = _LiveHolders(self.host, read_journal_file(self.host).claims, self.container)
        self._groups: dict[int, str | None] = {}

    def why_not_free(self, dev: PciDevice) -> str | None:
        """None when an allocation may give this device to a container; else why not."""
        vfs = virtual_function_count(self.host, dev.address)
        if vfs:  # its VFs would go with it
            return f"provides {vfs} virtual functions"
        assert dev.iommu_group is not None
        return _group_state(self.host, dev.iommu_group, self.allow, self.holders, self._groups)


def choose(
    host: Host,
    requests: list[SelectRequest],
    allow: tuple[str, ...],
    container: ContainerId,
    named: frozenset[int] = frozenset(),
    *,
    pool: Pool | None = None,
) -> list[PciAddress]:
    """The devices to give the container, or a DeviceError saying what is missing.
    `named`: the IOMMU groups the container already asks for by address or node: a
    selection adds devices beyond them, never one of them again. Call under the
    allocation lock; `pool`: the host's devices as read before it."""
    if pool is None:
        pool = Pool(host, allow, container)
    else:
        pool.refresh()
    taken_groups: set[int] = set()
    chosen: list[PciAddress] = []
    for request in requests:
        got = 0
        refused: list[str] = []
        matching = [d for d in pool.devices if request.matches(d)]
        for dev in matching:
            if got == request.wanted:
                break
            assert dev.iommu_group is not None
            if dev.iommu_group.number in named:
                refused.append(f"{dev.address} named by the container already")
                continue
            if dev.iommu_group.number in taken_groups:
                refused.append(f"{dev.address} taken by this request already")
                continue
            why = pool.why_not_free(dev)
            if why is not None:
                refused.append(f"{dev.address} {why}")
                continue
            chosen.append(dev.address)
            taken_groups.add(dev.iommu_group.number)
            got += 1
        if got < request.wanted:
            detail = "; ".join(refused[:6]) + ("; …" if len(refused) > 6 else "")
            raise DeviceError(
                f"{SELECT_ANNOTATION} {request.text}: {got} of {request.wanted} free, "
                f"{len(matching)} devices match" + (f": {detail}" if detail else ""),
                "wait for a holder to be deleted, or bind or create more devices "
                "(kata-vfio-ctl bind, kata-vfio-ctl vfs)",
            )
    return chosen
