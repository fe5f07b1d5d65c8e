"""Who owns which host devices: one ledger for every way a container gets VFIO groups.

The podman wrapper, the shim wrapper, auto-bind and the host tools all go through
here. `<state_dir>/bindings.json` holds two tables, always read and written whole
under the journal lock:

- ``devices``: per PCI address, the driver and driver_override to give back and who
  moved it to vfio-pci (``kata-vfio-ctl`` for the admin, or ``container <id>``).
  Written *before* sysfs is touched, so a process killed at any step leaves what
  to undo.
- ``claims``: per IOMMU group, the container using it now, with the boot it was
  made in, its bundle directory and the instance token of that create.

An owner is gone when its claim comes from an earlier boot (the boot id differs),
or its bundle directory no longer exists (podman's `rm`, containerd's delete and
CRI-O's removal all take the bundle away), or the bundle directory there now is not
the one it claimed from: each claim writes a random token into the bundle
(``kata-vfio.instance``) and records it, so a new container that recreated the same
bundle path under the same id is not taken for the old owner. Entries of gone owners are restorable
but own nothing: every create checks, and hands the devices of gone owners back.
Each container with claims also has a marker file ``containers/<id>``, so the
wrapper's passthrough `delete` can tell with one stat whether it has work to do.
One flock per IOMMU group serialises containers racing for the same devices, and
every release takes the same locks as a claim: a decision about a group and the
journal records it leads to happen under that group's lock. The locks are re-entrant
per thread (a release inside a create's failure path takes nothing twice).
"""

from __future__ import annotations

import os
import time
from _thread import get_ident

from kata_vfio.errors import DeviceError, KataVfioError
from kata_vfio.jsoncodec import dumps, loads
from kata_vfio.pci import IommuGroup, PciAddress
from kata_vfio.rebind import MODPROBE, write_attr
from kata_vfio_host.lockwait import flock_bounded

# `kata-vfio create` runs this once per container: no typing, dataclasses, contextlib,
# pathlib or json (each costs a good part of a bare interpreter start).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kata_vfio.pci import StrPath
    from kata_vfio.rebind import SysfsWrite

    InUse = Callable[[PciAddress], list[str]]

ADMIN = "kata-vfio-ctl"
JOURNAL_VERSION = 2
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
INSTANCE_FILE = "kata-vfio.instance"  # in a claimed container's bundle directory
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_join = os.path.join


def read_boot_id(path: StrPath = BOOT_ID_PATH) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"


class Host:
    """The host's kernel interfaces and kata-vfio's state directory (paths as strings)."""

    __slots__ = ("boot_id", "modprobe", "netlink", "state_dir", "sysfs", "write")

    def __init__(self, sysfs: StrPath, state_dir: StrPath, write: SysfsWrite = write_attr,
                 modprobe: tuple[str, ...] = MODPROBE, boot_id: str | None = None,
                 netlink: Any = None) -> None:
        self.sysfs = os.fspath(sysfs)
        self.state_dir = os.fspath(state_dir)
        self.write = write
        self.modprobe = modprobe
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.netlink = netlink  # VF settings on the PF (vfconfig.Netlink when None)

    @property
    def journal(self) -> str:
        return _join(self.state_dir, "bindings.json")

    def __repr__(self) -> str:
        return f"Host(sysfs={self.sysfs!r}, state_dir={self.state_dir!r})"


class ContainerId(str):
    """A container id that can safely name a file: engines use hex or simple names."""

    @classmethod
    def parse(cls, text: str | None) -> ContainerId:
        if not text or len(text) > 256 or not set(text) <= _ID_CHARS or text.startswith("."):
            raise DeviceError(f"container id {text!r} cannot name a state file",
                              "use a plain container id (letters, digits, _ . -)")
        return cls(text)

    @classmethod
    def maybe(cls, text: str | None) -> ContainerId | None:
        try:
            return cls.parse(text)
        except DeviceError:
            return None

    @property
    def owner(self) -> str:
        return owner_name(self)


def owner_name(container_id: str) -> str:
    return f"container {container_id}"


class _Record:
    """Value semantics for the journal's small records (what a frozen dataclass gives,
    without the import and the class-creation cost)."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()  # type: ignore[attr-defined,unused-ignore]

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class DeviceEntry(_Record):
    """A device kata-vfio moved: what to give it back to, its group and owner."""

    __slots__ = ("boot_id", "driver", "group", "override", "owner", "since")

    def __init__(self, driver: str | None, override: str | None, group: int, owner: str,
                 boot_id: str | None = None, since: float = 0.0) -> None:
        self.driver = driver
        self.override = override
        self.group = group
        self.owner = owner
        self.boot_id = boot_id
        self.since = since

    def to_obj(self) -> dict[str, Any]:
        return {"driver": self.driver, "override": self.override, "group": self.group,
                "owner": self.owner, "boot_id": self.boot_id, "since": self.since}


class Claim(_Record):
    """A container's use of an IOMMU group."""

    __slots__ = ("boot_id", "bundle", "container", "instance", "since")

    def __init__(self, container: str, boot_id: str | None, bundle: str | None,
                 since: float = 0.0, instance: str | None = None) -> None:
        self.container = container
        self.boot_id = boot_id
        self.bundle = bundle
        self.since = since
        self.instance = instance  # the token written into the bundle (None: older claims)

    @property
    def owner(self) -> str:
        return owner_name(self.container)

    def to_obj(self) -> dict[str, Any]:
        obj = {"container": self.container, "boot_id": self.boot_id, "bundle": self.bundle,
               "since": self.since}
        if self.instance is not None:
            obj["instance"] = self.instance
        return obj


class VfOriginal(_Record):
    """What a PF had for one of its VFs before a container's io.kata-vfio.vf-config."""

    __slots__ = ("boot_id", "group", "index", "mac", "owner", "pf_interface", "vlan")

    def __init__(self, owner: str, pf_interface: str, index: int, mac: str | None,
                 vlan: int | None, boot_id: str | None = None, group: int | None = None
                 ) -> None:
        self.owner = owner
        self.pf_interface = pf_interface
        self.index = index
        self.mac = mac
        self.vlan = vlan
        self.boot_id = boot_id
        self.group = group  # the VF's IOMMU group (None in entries of older versions)

    def to_obj(self) -> dict[str, Any]:
        obj = {"owner": self.owner, "pf_interface": self.pf_interface, "index": self.index,
               "mac": self.mac, "vlan": self.vlan, "boot_id": self.boot_id}
        if self.group is not None:
            obj["group"] = self.group
        return obj


def _parse_vf_original(obj: Any) -> VfOriginal:
    if not isinstance(obj, dict) or not isinstance(obj.get("owner"), str) \
            or not isinstance(obj.get("pf_interface"), str) \
            or not isinstance(obj.get("index"), int):
        raise ValueError("needs owner, pf_interface and index")
    vlan, group = obj.get("vlan"), obj.get("group")
    return VfOriginal(obj["owner"], obj["pf_interface"], obj["index"], _opt_str(obj.get("mac")),
                      vlan if isinstance(vlan, int) else None, _opt_str(obj.get("boot_id")),
                      group if isinstance(group, int) else None)


class Journal:
    __slots__ = ("claims", "damaged", "devices", "kept", "other_claims", "other_devices",
                 "vf_configs")

    def __init__(self) -> None:
        self.devices: dict[str, DeviceEntry] = {}
        self.claims: dict[int, Claim] = {}
        self.other_claims: dict[str, Any] = {}  # read for some groups: the rest, as found
        self.other_devices: dict[str, Any] = {}  # the same for device entries
        self.vf_configs: dict[str, VfOriginal] = {}
        self.damaged: list[str] = []  # why entries could not be read
        self.kept: dict[str, Any] = {}  # those entries, left for a human


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_HEX = frozenset("0123456789abcdef")


def _address_key(key: str) -> str:
    """The journal key of a device: `key` itself when it is already written as
    str(PciAddress) writes it (what the journal holds: checked in a few character tests,
    since a create reads every entry), else parsed (which refuses a malformed one)."""
    if (len(key) == 12 and key[4] == ":" and key[7] == ":" and key[10] == "."
            and key[8] in "01" and key[11] in "01234567" and _HEX.issuperset(key[:4])
            and _HEX.issuperset(key[5:7]) and key[9] in _HEX):
        return key
    return str(PciAddress.parse(key))


def _parse_device(obj: Any) -> DeviceEntry:
    if not isinstance(obj, dict) or not isinstance(obj.get("group"), int) \
            or not isinstance(obj.get("owner"), str):
        raise ValueError("needs group and owner")
    driver = obj.get("driver")
    if driver is not None and (not isinstance(driver, str) or "/" in driver or not driver):
        raise ValueError(f"driver {driver!r}")
    since = obj.get("since", 0.0)
    return DeviceEntry(driver, _opt_str(obj.get("override")), obj["group"], obj["owner"],
                       _opt_str(obj.get("boot_id")),
                       float(since) if isinstance(since, int | float) else 0.0)


def _parse_claim(obj: Any) -> Claim:
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    ContainerId.parse(obj.get("container"))
    since = obj.get("since", 0.0)
    return Claim(obj["container"], _opt_str(obj.get("boot_id")), _opt_str(obj.get("bundle")),
                 float(since) if isinstance(since, int | float) else 0.0,
                 _opt_str(obj.get("instance")))


def read_journal_file(host: Host, *, groups: set[int] | None = None) -> Journal:
    """The journal as typed entries; entries that cannot be read are listed in `damaged`
    (and kept out of the way) instead of stopping everything. With `groups`, only the
    claims and device entries of those groups are read (a create's decisions need no
    others: its work does not grow with the containers on the host); the rest stay as
    found, to write back."""
    path = host.journal
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return Journal()
    except IsADirectoryError:
        raise DeviceError(f"{path} is a directory, not kata-vfio's journal",
                          "move it away; the journal is a JSON file") from None
    except OSError as exc:
        raise DeviceError(f"cannot read {path}: {exc.strerror}", "run as root") from None
    try:
        data = loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DeviceError(f"{path} is damaged (not JSON)",
                          "check it by hand; it records which drivers to give devices back to"
                          ) from None
    if not isinstance(data, dict) or not isinstance(data.get("devices", {}), dict) \
            or not isinstance(data.get("claims", {}), dict):
        raise DeviceError(f"{path} is damaged (not a kata-vfio journal object)",
                          "check it by hand; it records which drivers to give devices back to")
    journal = Journal()
    kept = data.get("damaged_devices")
    journal.kept = dict(kept) if isinstance(kept, dict) else {}
    numbers = groups
    for key, obj in data.get("devices", {}).items():
        if numbers is not None and type(obj) is dict and type(obj.get("group")) is int \
                and obj["group"] not in numbers:
            journal.other_devices[key] = obj  # another group's: written back as found
            continue
        try:
            journal.devices[_address_key(key)] = _parse_device(obj)
        except (ValueError, KataVfioError) as exc:
            journal.damaged.append(f"journal entry {key!r} is unreadable ({exc})")
            journal.kept[str(key)] = obj
    wanted = None if groups is None else {str(g) for g in groups}
    for key, obj in data.get("claims", {}).items():
        if wanted is not None and key not in wanted:
            journal.other_claims[key] = obj
            continue
        try:
            journal.claims[IommuGroup.parse(key).number] = _parse_claim(obj)
        except (ValueError, KataVfioError) as exc:
            journal.damaged.append(f"claim entry {key!r} is unreadable ({exc})")
    vf_configs = data.get("vf_configs", {})
    for key, obj in (vf_configs.items() if isinstance(vf_configs, dict) else ()):
        try:
            journal.vf_configs[str(PciAddress.parse(key))] = _parse_vf_original(obj)
        except (ValueError, KataVfioError) as exc:
            journal.damaged.append(f"VF settings entry {key!r} are unreadable ({exc})")
    return journal


def _write_journal_file(host: Host, journal: Journal) -> None:
    from kata_vfio.files import write_atomically

    os.makedirs(host.state_dir, exist_ok=True)
    data: dict[str, Any] = {
        "version": JOURNAL_VERSION,
        "devices": _devices_obj(journal),
        "claims": _claims_obj(journal),
    }
    if journal.vf_configs:
        data["vf_configs"] = {a: v.to_obj() for a, v in sorted(journal.vf_configs.items())}
    if journal.kept:  # entries we could not read stay in the file for a human to look at
        data["damaged_devices"] = journal.kept
    write_atomically(host.journal, dumps(data).encode(), mode=0o600)


_HELD: set[tuple[int, str]] = set()  # (thread, lock path) this process holds now


def _devices_obj(journal: Journal) -> dict[str, Any]:
    merged = {a: o for a, o in journal.other_devices.items() if a not in journal.devices}
    merged.update((a, e.to_obj()) for a, e in journal.devices.items())
    return dict(sorted(merged.items()))


def _claims_obj(journal: Journal) -> dict[str, Any]:
    if not journal.other_claims:
        return {str(g): c.to_obj() for g, c in sorted(journal.claims.items())}
    merged = dict(journal.other_claims)
    for g in journal.claims:
        merged.pop(str(g), None)
    merged.update((str(g), c.to_obj()) for g, c in journal.claims.items())
    return dict(sorted(merged.items(), key=lambda kv: (len(kv[0]), kv[0])))


class Locks:
    """flock(2) on lock files, taken in the order given, released in reverse when the
    block ends (or the process dies). Re-entrant per thread: a path this thread holds
    already is skipped (flock on a second open file would wait for ourselves)."""

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._fds: list[tuple[int, tuple[int, str]]] = []

    def __enter__(self) -> None:
        thread = get_ident()
        try:
            made = None
            for path in self._paths:
                key = (thread, path)
                if key in _HELD:
                    continue
                if os.path.dirname(path) != made:  # once for a bind's 32 group locks
                    made = os.path.dirname(path)
                    os.makedirs(made, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    flock_bounded(fd, path)  # says what it waits for, gives up after a bound
                except BaseException:
                    os.close(fd)
                    raise
                self._fds.append((fd, key))
                _HELD.add(key)
        except BaseException:
            self._release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._release()

    def release(self) -> None:
        """End the block early (what `with` does at its end; a second call does nothing)."""
        self._release()

    def _release(self) -> None:
        while self._fds:
            fd, key = self._fds.pop()
            _HELD.discard(key)
            os.close(fd)


def group_locks(host: Host, groups: list[IommuGroup]) -> Locks:
    """Every group's lock, taken in group order so two creates never deadlock."""
    return Locks([_join(host.state_dir, "locks", f"group-{g}") for g in sorted(set(groups))])


class editing:
    """The journal, to change in place; written back whole when the block ends without
    an exception. With `groups`, only those groups' claims are in `claims` (the caller
    holds their locks); the others are written back as they were found."""

    def __init__(self, host: Host, *, groups: set[int] | None = None) -> None:
        self._host = host
        self._groups = groups
        self._lock = Locks([_join(host.state_dir, "journal.lock")])

    def __enter__(self) -> Journal:
        self._lock.__enter__()
        try:
            self._journal = read_journal_file(self._host, groups=self._groups)
        except BaseException:
            self._lock.__exit__()
            raise
        return self._journal

    def __exit__(self, kind: object, *rest: object) -> None:
        try:
            if kind is None:
                _write_journal_file(self._host, self._journal)
        finally:
            self._lock.__exit__()


def read_journal(host: Host) -> dict[str, dict[str, Any]]:
    """The device table as plain objects (for listings and tests)."""
    return {a: e.to_obj() for a, e in read_journal_file(host).devices.items()}


# --- who owns what -------------------------------------------------------------------------


def marker(state_dir: StrPath, container_id: str) -> str:
    return _join(state_dir, "containers", ContainerId.parse(container_id))


def claim_gone(host: Host, claim: Claim) -> bool:
    """Is the container behind a claim gone? Another boot, its bundle removed, or the
    bundle there now made by another container instance (its token differs)."""
    if claim.boot_id != host.boot_id:
        return True
    if claim.bundle is None:
        return False
    if claim.instance is None:  # a claim of an older version: the directory alone
        return not os.path.isdir(claim.bundle)
    return read_instance(claim.bundle) != claim.instance


def read_instance(bundle: str) -> str | None:
    """The instance token in a bundle directory (None: no bundle, or no token)."""
    try:
        fd = os.open(_join(bundle, INSTANCE_FILE), os.O_RDONLY | os.O_NOFOLLOW |
                     os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 64).decode("ascii", "replace").strip() or None
    except OSError:
        return None
    finally:
        os.close(fd)


def write_instance(bundle: str | None) -> str | None:
    """A new instance token in the bundle (the one there already when this same instance
    claims again); None when there is no bundle or it cannot be written."""
    if bundle is None or not os.path.isdir(bundle):
        return None
    current = read_instance(bundle)
    if current is not None:
        return current
    from kata_vfio.files import write_atomically

    token = os.urandom(16).hex()
    try:
        write_atomically(_join(bundle, INSTANCE_FILE), token.encode(), mode=0o600,
                         durable=False)
    except OSError:
        return None
    return token


def owner_of(host: Host, group: IommuGroup, journal: Journal | None = None) -> str | None:
    """Who holds the group now: a live container's claim, else the admin if the admin
    bound it. Devices bound for a container that is gone are restorable, owned by none."""
    journal = journal if journal is not None else read_journal_file(host)
    claim = journal.claims.get(group.number)
    if claim is not None and not claim_gone(host, claim):
        return claim.owner
    if any(e.group == group.number and e.owner == ADMIN for e in journal.devices.values()):
        return ADMIN
    return None


def gone_containers(host: Host, journal: Journal | None = None) -> list[str]:
    """Containers with claims or devices whose owner is gone."""
    journal = journal if journal is not None else read_journal_file(host)
    live = {c.container for c in journal.claims.values() if not claim_gone(host, c)}
    gone = {c.container for c in journal.claims.values() if claim_gone(host, c)}
    for entry in journal.devices.values():
        if entry.owner.startswith("container "):
            cid = entry.owner[len("container "):]
            if cid not in live:
                gone.add(cid)
    markers = _join(host.state_dir, "containers")
    if os.path.isdir(markers):
        for name in os.listdir(markers):
            if name not in live and ContainerId.maybe(name) is not None:
                try:
                    with open(_join(markers, name), "rb") as f:
                        info = loads(f.read())
                    claim = Claim(name, _opt_str(info.get("boot_id")),
                                  _opt_str(info.get("bundle")),
                                  instance=_opt_str(info.get("instance")))
                except (OSError, ValueError, AttributeError):
                    claim = Claim(name, None, None)
                if claim_gone(host, claim):
                    gone.add(name)
    return sorted(gone)


def write_marker(host: Host, container: ContainerId, bundle: str | None,
                 instance: str | None = None) -> None:
    from kata_vfio.files import write_atomically

    path = marker(host.state_dir, container)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record: dict[str, Any] = {"owner": container.owner, "boot_id": host.boot_id,
                              "bundle": bundle}
    if instance is not None:
        record["instance"] = instance
    # a marker of this boot only: no disk flush (see write_atomically)
    write_atomically(path, dumps(record).encode(), mode=0o600, durable=False)


def claim_groups(host: Host, container: ContainerId, groups: list[IommuGroup],
                 bundle: str | None) -> None:
    """Record that the container uses these groups (call under their group locks, after
    `check_free`). The claim belongs to this container instance: the token it writes
    into the bundle."""
    with editing(host, groups={g.number for g in groups}) as journal:
        record_claims(host, journal, container, groups, bundle)


def record_claims(host: Host, journal: Journal, container: ContainerId,
                  groups: list[IommuGroup], bundle: str | None) -> None:
    """`claim_groups` inside an edit of the journal the caller makes anyway (a create
    writes its claims and its devices' entries in one write)."""
    instance = write_instance(bundle)
    write_marker(host, container, bundle, instance)
    now = time.time()
    for group in groups:
        journal.claims[group.number] = Claim(container, host.boot_id, bundle, now, instance)


KUBERNETES_ALLOCATION = "kubernetes-allocation-"


def check_free(host: Host, container: ContainerId, groups: list[IommuGroup], *,
               journal: Journal | None = None) -> None:
    """Refuse groups held by another live container (call under their group locks;
    `journal`: as read under them).

    The device plugin's allocations (claims of ``kubernetes-allocation-<id>``) are held
    for the container the kubelet made them for: a container that asks for every group
    of such an allocation takes it over (its claim replaces the allocation's); one that
    asks for only some of them is refused like any other."""
    journal = journal if journal is not None else read_journal_file(host)
    wanted = {g.number for g in groups}
    whole: Journal | None = None
    for group in groups:
        current = owner_of(host, group, journal)
        if current in (None, ADMIN, container.owner):
            continue
        claim = journal.claims.get(group.number)
        if claim is not None and claim.container.startswith(KUBERNETES_ALLOCATION):
            # the allocation's other groups may lie outside the part of the journal read
            whole = whole if whole is not None else read_journal_file(host)
            allocation = {g for g, c in whole.claims.items()
                          if c.container == claim.container and not claim_gone(host, c)}
            if allocation <= wanted:
                continue
        raise DeviceError(f"IOMMU group {group} is in use by {current}",
                          "wait for that container to be deleted")


# --- earlier boots --------------------------------------------------------------------------

UNKNOWN_BOOT = "unknown"  # what read_boot_id gives when /proc cannot tell


def earlier_boot(host: Host, boot_id: str | None) -> bool:
    """Was a record made in an earlier boot? Only a boot id that was read (neither None,
    from older versions, nor unknown) and differs from this boot's says so. No driver
    move and no container outlives the kernel that made it."""
    return (boot_id is not None and host.boot_id != UNKNOWN_BOOT
            and boot_id not in (UNKNOWN_BOOT, host.boot_id))


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
        raise DeviceError(f"cannot read this boot's id ({BOOT_ID_PATH})",
                          "mount /proc: earlier boots' records are told apart by it")
    first = read_journal_file(host)
    groups = {g for g, c in first.claims.items() if earlier_boot(host, c.boot_id)}
    groups |= {e.group for e in first.devices.values() if earlier_boot(host, e.boot_id)}
    groups |= {v.group for v in first.vf_configs.values()
               if v.group is not None and earlier_boot(host, v.boot_id)}
    dropped = EarlierBoot()
    with group_locks(host, [IommuGroup(g) for g in groups]), editing(host) as journal:
        current = {c.container for c in journal.claims.values()
                   if not earlier_boot(host, c.boot_id)}
        for group, claim in sorted(journal.claims.items()):
            if earlier_boot(host, claim.boot_id):
                dropped.claims.setdefault(claim.container, []).append(group)
                del journal.claims[group]
        for addr, entry in sorted(journal.devices.items()):
            holder = entry.owner[len("container "):] if entry.owner.startswith(
                "container ") else None
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
