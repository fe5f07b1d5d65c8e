"""Who owns which host devices: one ledger for every way a container gets VFIO groups.

The podman wrapper, the shim wrapper, auto-bind and the host tools all go through
here. The ledger is one file per IOMMU group, `<state_dir>/ledger/group-<N>.json`
(`host.json` for what belongs to no group; see "the ledger's files" below for the
layout and the one-time conversion of the single `bindings.json` of version 2), so a
create reads and writes only its own groups' files. Its tables:

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
per thread (a release inside a create's failure path takes nothing twice) and taken in
ascending group order, also across nested blocks (see `Locks`); the journal lock
(conversion, host.json) is taken last, with nothing taken under it.
"""

from __future__ import annotations

import os

from kata_vfio.defaults import ID_HINT, id_problem, plain_container_id
from kata_vfio.errors import DeviceError, KataVfioError
from kata_vfio.files import edited
from kata_vfio.jsoncodec import dumps, loads
from kata_vfio.pci import HEX_DIGITS, IommuGroup, PciAddress, group_of
from kata_vfio.rebind import MODPROBE, write_attr
from kata_vfio.value import Value, build
from kata_vfio_host.locks import Locks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import StrPath, SysfsWrite

ADMIN = "kata-vfio-ctl"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
INSTANCE_FILE = "kata-vfio.instance"  # in a claimed container's bundle directory
_join = os.path.join


UNKNOWN_BOOT = "unknown"  # what read_boot_id gives when /proc cannot tell


def read_boot_id(path: StrPath = BOOT_ID_PATH) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return UNKNOWN_BOOT


def earlier_boot(host: Host, boot_id: str | None) -> bool:
    """Was a record made in an earlier boot? Only a boot id that was read (neither None,
    from older versions, nor unknown) and differs from this boot's says so. No driver
    move and no container outlives the kernel that made it."""
    return (
        boot_id is not None
        and host.boot_id != UNKNOWN_BOOT
        and boot_id not in (UNKNOWN_BOOT, host.boot_id)
    )


class Host(Value, init=False):
    """The host's kernel interfaces and kata-vfio's state directory (paths as strings)."""

    sysfs: str
    state_dir: str
    write: SysfsWrite
    modprobe: tuple[str, ...]
    boot_id: str
    netlink: Any  # VF settings on the PF (vfconfig.Netlink when None)

    def __new__(
        cls,
        sysfs: StrPath,
        state_dir: StrPath,
        write: SysfsWrite = write_attr,
        modprobe: tuple[str, ...] = MODPROBE,
        boot_id: str | None = None,
        netlink: Any = None,
    ) -> Host:
        return build(
            cls,
            (
                os.fspath(sysfs),
                os.fspath(state_dir),
                write,
                modprobe,
                read_boot_id() if boot_id is None else boot_id,
                netlink,
            ),
        )

    @property
    def journal(self) -> str:
        """The single-file ledger of version 2: converted once (see `migrate`)."""
        return _join(self.state_dir, "bindings.json")

    @property
    def ledger_dir(self) -> str:
        """The ledger: one file per IOMMU group, and host.json."""
        return _join(self.state_dir, "ledger")

    def __repr__(self) -> str:
        return f"Host(sysfs={self.sysfs!r}, state_dir={self.state_dir!r})"


class ContainerId(str):
    """A container id that can safely name a file: engines use hex or simple names."""

    @classmethod
    def parse(cls, text: str | None) -> ContainerId:
        if not plain_container_id(text):
            raise DeviceError(id_problem(text), ID_HINT)
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


class DeviceEntry(Value):
    """A device kata-vfio moved: what to give it back to, its group and owner."""

    driver: str | None
    override: str | None
    group: int
    owner: str
    boot_id: str | None = None
    since: float = 0.0

    def to_obj(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "override": self.override,
            "group": self.group,
            "owner": self.owner,
            "boot_id": self.boot_id,
            "since": self.since,
        }


class Claim(Value):
    """A container's use of an IOMMU group."""

    container: str
    boot_id: str | None
    bundle: str | None
    since: float = 0.0
    instance: str | None = None  # the token written into the bundle (None: older claims)

    @property
    def owner(self) -> str:
        return owner_name(self.container)

    def to_obj(self) -> dict[str, Any]:
        obj = {
            "container": self.container,
            "boot_id": self.boot_id,
            "bundle": self.bundle,
            "since": self.since,
        }
        if self.instance is not None:
            obj["instance"] = self.instance
        return obj


class VfOriginal(Value):
    """What a PF had for one of its VFs before a container's io.kata-vfio.vf-config."""

    owner: str
    pf_interface: str
    index: int
    mac: str | None
    vlan: int | None
    boot_id: str | None = None
    group: int | None = None  # the VF's IOMMU group (None in entries of older versions)

    def to_obj(self) -> dict[str, Any]:
        obj = {
            "owner": self.owner,
            "pf_interface": self.pf_interface,
            "index": self.index,
            "mac": self.mac,
            "vlan": self.vlan,
            "boot_id": self.boot_id,
        }
        if self.group is not None:
            obj["group"] = self.group
        return obj


def _parse_vf_original(obj: Any) -> VfOriginal:
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("owner"), str)
        or not isinstance(obj.get("pf_interface"), str)
        or not isinstance(obj.get("index"), int)
    ):
        raise ValueError("needs owner, pf_interface and index")
    vlan, group = obj.get("vlan"), obj.get("group")
    return VfOriginal(
        obj["owner"],
        obj["pf_interface"],
        obj["index"],
        _opt_str(obj.get("mac")),
        vlan if isinstance(vlan, int) else None,
        _opt_str(obj.get("boot_id")),
        group if isinstance(group, int) else None,
    )


class Journal:
    __slots__ = ("claims", "damaged", "devices", "kept", "kept_in", "read", "vf_configs")

    def __init__(self) -> None:
        self.devices: dict[str, DeviceEntry] = {}
        self.claims: dict[int, Claim] = {}
        self.vf_configs: dict[str, VfOriginal] = {}
        self.damaged: list[str] = []  # why entries could not be read
        self.kept: dict[str, Any] = {}  # those entries, left for a human
        self.kept_in: dict[str, str] = {}  # the ledger file each kept entry was found in
        # ledger file name -> its tables as read (the entries' own objects), so that a
        # write changes only what the edit changed
        self.read: dict[str, dict[str, dict[str, Any]]] = {}


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _address_key(key: str) -> str:
    """The journal key of a device: `key` itself when it is already written as
    str(PciAddress) writes it (what the journal holds: checked in a few character tests,
    since a create reads every entry), else parsed (which refuses a malformed one)."""
    if (
        len(key) == 12
        and key[4] == ":"
        and key[7] == ":"
        and key[10] == "."
        and key[8] in "01"
        and key[11] in "01234567"
        and HEX_DIGITS.issuperset(key[:4])
        and HEX_DIGITS.issuperset(key[5:7])
        and key[9] in HEX_DIGITS
    ):
        return key
    return str(PciAddress.parse(key))


def _parse_device(obj: Any) -> DeviceEntry:
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("group"), int)
        or not isinstance(obj.get("owner"), str)
    ):
        raise ValueError("needs group and owner")
    driver = obj.get("driver")
    if driver is not None and (not isinstance(driver, str) or "/" in driver or not driver):
        raise ValueError(f"driver {driver!r}")
    since = obj.get("since", 0.0)
    return DeviceEntry(
        driver,
        _opt_str(obj.get("override")),
        obj["group"],
        obj["owner"],
        _opt_str(obj.get("boot_id")),
        float(since) if isinstance(since, int | float) else 0.0,
    )


def _parse_claim(obj: Any) -> Claim:
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    ContainerId.parse(obj.get("container"))
    since = obj.get("since", 0.0)
    return Claim(
        obj["container"],
        _opt_str(obj.get("boot_id")),
        _opt_str(obj.get("bundle")),
        float(since) if isinstance(since, int | float) else 0.0,
        _opt_str(obj.get("instance")),
    )


# --- the ledger's files: one per IOMMU group ----------------------------------------------
#
# <state_dir>/ledger/group-<N>.json holds group N's claim, its device entries and its VFs'
# settings; <state_dir>/ledger/host.json what belongs to no group (VF settings recorded by
# versions that did not note the group, entries that could not be read). Each file has
# the tables of the single journal of version 2 (<state_dir>/bindings.json), restricted
# to its group, so a create reads, writes and fsyncs only the files of its own groups;
# whole-ledger views read them all.
#
# Migration from bindings.json (once, under the journal lock, by the first edit): every
# file is written into ledger.migrating/, that directory is renamed to ledger/ in one
# step, then bindings.json is removed. The rule for a reader: ledger/ exists -> it is the
# ledger, whole (it only ever appears by that rename); a bindings.json beside it is the
# leftover of a migration killed after the rename, ignored (and removed by the next
# edit). No ledger/ -> bindings.json is the ledger, and ledger.migrating/ is the leftover
# of a migration killed before the rename (removed by the next migration). A SIGKILL at
# any step loses nothing.

LEDGER_VERSION = 3
_TABLES = ("claims", "devices", "vf_configs", "damaged_devices")
HOST_FILE = "host.json"


def _group_file(group: int) -> str:
    return f"group-{group}.json"


def _is_ledger_file(name: str) -> bool:
    return name == HOST_FILE or (
        name.startswith("group-")
        and name.endswith(".json")
        and name[6:-5].isdigit()
        and name[6:-5].isascii()
    )


def _load(path: str) -> dict[str, Any] | None:
    """A ledger file's object (None: no such file); DeviceError when unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise DeviceError(
            f"{path} is a directory, not part of kata-vfio's ledger",
            "move it away; the ledger's files are JSON files",
        ) from None
    except OSError as exc:
        raise DeviceError(f"cannot read {path}: {exc.strerror}", "run as root") from None
    try:
        data = loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DeviceError(
            f"{path} is damaged (not JSON)",
            "check it by hand; it records which drivers to give devices back to",
        ) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(t, {}), dict) for t in _TABLES):
        raise DeviceError(
            f"{path} is damaged (not a kata-vfio journal object)",
            "check it by hand; it records which drivers to give devices back to",
        )
    return data


def _parse_into(journal: Journal, data: dict[str, Any], name: str, groups: set[int] | None) -> None:
    """Add one file's entries (of `groups`, None: all) to the journal; remember what the
    file held as the entries' own objects, to write back only what changed."""
    seen: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    kept = data.get("damaged_devices") or {}
    for key, obj in kept.items():
        journal.kept[str(key)] = obj
        journal.kept_in[str(key)] = name
        seen["damaged_devices"][str(key)] = obj
    for key, obj in data.get("devices", {}).items():
        if (
            groups is not None
            and type(obj) is dict
            and type(obj.get("group")) is int
            and obj["group"] not in groups
        ):
            continue  # another group's (in bindings.json): not this read's business
        try:
            entry = _parse_device(obj)
            address = _address_key(key)
        except (ValueError, KataVfioError) as exc:
            journal.damaged.append(f"journal entry {key!r} is unreadable ({exc})")
            journal.kept[str(key)] = obj
            journal.kept_in[str(key)] = name
            seen["devices"][key] = obj  # moves to damaged_devices on the next write
            continue
        journal.devices[address] = entry
        seen["devices"][address] = entry.to_obj()
    for key, obj in data.get("claims", {}).items():
        if groups is not None and not (key.isdigit() and int(key) in groups):
            continue
        try:
            number = IommuGroup.parse(key).number
            claim = _parse_claim(obj)
        except (ValueError, KataVfioError) as exc:
            journal.damaged.append(f"claim entry {key!r} is unreadable ({exc})")
            seen["claims"][key] = obj  # dropped on the next write, as always
            continue
        journal.claims[number] = claim
        seen["claims"][str(number)] = claim.to_obj()
    for key, obj in data.get("vf_configs", {}).items():
        group = obj.get("group") if type(obj) is dict else None
        if groups is not None and type(group) is int and group not in groups:
            continue
        try:
            address = str(PciAddress.parse(key))
            original = _parse_vf_original(obj)
        except (ValueError, KataVfioError) as exc:
            journal.damaged.append(f"VF settings entry {key!r} are unreadable ({exc})")
            seen["vf_configs"][key] = obj
            continue
        journal.vf_configs[address] = original
        seen["vf_configs"][address] = original.to_obj()
    journal.read[name] = seen


def read_journal_file(host: Host, *, groups: set[int] | None = None) -> Journal:
    """The ledger as typed entries; entries that cannot be read are listed in `damaged`
    (and kept out of the way) instead of stopping everything. With `groups`, only the
    files of those groups (and host.json) are read: a create's decisions need no others,
    so its work does not grow with the containers on the host."""
    journal = Journal()
    directory = host.ledger_dir
    if not os.path.isdir(directory):
        data = _load(host.journal)  # not migrated yet: the single file of version 2
        if data is not None or not os.path.isdir(directory):
            if data is not None:
                _parse_into(journal, data, _V2, groups)
            return journal
        # bindings.json went away between the two looks: migrated meanwhile, read ledger/
    if groups is None:
        try:
            names = sorted(n for n in os.listdir(directory) if _is_ledger_file(n))
        except OSError as exc:
            raise DeviceError(f"cannot read {directory}: {exc.strerror}", "run as root") from None
    else:
        names = [_group_file(g) for g in sorted(groups)] + [HOST_FILE]
    for name in names:
        data = _load(_join(directory, name))
        if data is not None:
            _parse_into(journal, data, name, groups)
    return journal


_V2 = "bindings.json"  # Journal.read's name for the single file of version 2


def _file_of_group(group: int | None) -> str:
    return HOST_FILE if group is None else _group_file(group)


def _tables(journal: Journal) -> dict[str, dict[str, dict[str, Any]]]:
    """What each ledger file should hold now, by file name."""
    files: dict[str, dict[str, dict[str, Any]]] = {}

    def table(name: str, kind: str) -> dict[str, Any]:
        return files.setdefault(name, {t: {} for t in _TABLES})[kind]

    for number, claim in journal.claims.items():
        table(_group_file(number), "claims")[str(number)] = claim.to_obj()
    for address, entry in journal.devices.items():
        table(_group_file(entry.group), "devices")[address] = entry.to_obj()
    for address, original in journal.vf_configs.items():
        table(_file_of_group(original.group), "vf_configs")[address] = original.to_obj()
    for key, obj in journal.kept.items():
        origin = journal.kept_in.get(key, HOST_FILE)
        table(HOST_FILE if origin == _V2 else origin, "damaged_devices")[key] = obj
    return files


def _split_v2(data: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """A version-2 journal's tables, as found, cut into the files of the new layout."""
    files: dict[str, dict[str, dict[str, Any]]] = {}

    def table(name: str, kind: str) -> dict[str, Any]:
        return files.setdefault(name, {t: {} for t in _TABLES})[kind]

    for key, obj in data.get("claims", {}).items():
        table(_group_file(int(key)) if key.isdigit() and key.isascii() else HOST_FILE, "claims")[
            key
        ] = obj
    for kind in ("devices", "vf_configs"):
        for key, obj in data.get(kind, {}).items():
            group = obj.get("group") if type(obj) is dict else None
            table(_file_of_group(group if type(group) is int and group >= 0 else None), kind)[
                key
            ] = obj
    for key, obj in data.get("damaged_devices", {}).items():
        table(HOST_FILE, "damaged_devices")[key] = obj
    return files


def _file_bytes(tables: dict[str, dict[str, Any]]) -> bytes:
    data: dict[str, Any] = {"version": LEDGER_VERSION}
    for kind in _TABLES:
        if tables.get(kind):
            items = tables[kind].items()
            data[kind] = dict(
                sorted(items, key=lambda kv: (len(kv[0]), kv[0]))
                if kind == "claims"
                else sorted(items)
            )
    return dumps(data).encode()


def _write_journal_file(host: Host, journal: Journal) -> None:
    """Write back the files whose entries changed, each atomically and durably, group
    files in group order, host.json last. What changed is applied to each file as it is
    now (read again just before): entries of the file that this edit did not change stay
    as they are, whoever wrote them."""
    now = _tables(journal)
    empty: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    changed = [
        name
        for name in set(now) | set(journal.read)
        if name != _V2 and now.get(name, empty) != journal.read.get(name, empty)
    ]
    if not changed:
        return
    os.makedirs(host.ledger_dir, mode=0o700, exist_ok=True)

    def order(name: str) -> tuple[int, int]:
        return (1, 0) if name == HOST_FILE else (0, int(name[6:-5]))

    for name in sorted(changed, key=order):
        before, after = journal.read.get(name, empty), now.get(name, empty)
        path = _join(host.ledger_dir, name)
        # each file is read again and written under its lock: the group's (which the
        # caller holds: re-entrant), the journal lock for host.json (no group's)
        lock = (
            _join(host.state_dir, "journal.lock")
            if name == HOST_FILE
            else _join(host.state_dir, "locks", f"group-{name[6:-5]}")
        )

        def read(path: str = path) -> dict[str, dict[str, Any]]:
            return _read_ledger_file(path)

        def write(
            tables: dict[str, dict[str, Any]],
            path: str = path,
            before: dict[str, dict[str, Any]] = before,
            after: dict[str, dict[str, Any]] = after,
        ) -> None:
            _write_ledger_file(path, tables, sync_directory=not _of_this_boot(host, before, after))

        with edited(Locks([lock]), read, write) as tables:
            for kind in _TABLES:
                for key in before[kind].keys() | after[kind].keys():
                    if key in after[kind]:
                        if before[kind].get(key) != after[kind][key]:
                            tables[kind][key] = after[kind][key]
                    elif key in before[kind]:
                        tables[kind].pop(key, None)
        journal.read[name] = after


def _read_ledger_file(path: str) -> dict[str, dict[str, Any]]:
    data = _load(path) or {}
    return {t: dict(data.get(t) or {}) for t in _TABLES}


def _write_ledger_file(
    path: str, tables: dict[str, dict[str, Any]], *, sync_directory: bool = True
) -> None:
    from kata_vfio.files import write_atomically

    if any(tables.values()):
        write_atomically(path, _file_bytes(tables), mode=0o600, sync_directory=sync_directory)
    else:  # nothing left of the group: no file (a released group costs nothing)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _of_this_boot(
    host: Host, before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> bool:
    """Does this edit of a file change only records that a reboot makes history (a
    claim or device entry of this boot or an earlier one)? Then its rename
    need not survive a power loss: the next boot is another boot, forget_earlier_boots
    drops such records whichever version of the file the disk kept, and old and new
    mean the same then. The file itself is still fsynced before its rename, so the name
    never holds a half-written file. A create's or Allocate's claim saves one of the two
    disk flushes this way; records without this boot's id (an unknown boot, the damaged
    entries kept) and VF settings keep both."""
    if host.boot_id == UNKNOWN_BOOT:
        return False
    for kind in _TABLES:
        for key in before[kind].keys() | after[kind].keys():
            old, new = before[kind].get(key), after[kind].get(key)
            if old == new:
                continue
            if kind not in ("claims", "devices"):
                return False
            for record in (old, new):
                boot = record.get("boot_id") if isinstance(record, dict) else None
                if record is not None and not (boot == host.boot_id or earlier_boot(host, boot)):
                    return False
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    """A flat directory of ours (ledger.migrating/) and what is in it."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        os.unlink(_join(path, name))
    os.rmdir(path)


def migrate(host: Host) -> bool:
    """Convert a single-file ledger (bindings.json, version 2) to one file per group, once,
    crash-safe (see the rule above); True when this call converted it. Under the journal
    lock, which no other lock is ever taken under."""
    old, directory = host.journal, host.ledger_dir
    with Locks([_join(host.state_dir, "journal.lock")]):
        if os.path.isdir(directory):
            if os.path.lexists(old):  # a migration killed after its rename: a leftover
                os.unlink(old)
                _fsync_dir(host.state_dir)
            return False
        data = _load(old)
        if data is None:
            return False
        from kata_vfio.files import write_atomically

        staging = _join(host.state_dir, "ledger.migrating")
        _remove_tree(staging)  # what a killed migration left: bindings.json still holds all
        os.mkdir(staging, 0o700)
        for name, tables in sorted(_split_v2(data).items()):
            write_atomically(_join(staging, name), _file_bytes(tables), mode=0o600)
        _fsync_dir(staging)
        os.rename(staging, directory)
        _fsync_dir(host.state_dir)
        os.unlink(old)
        _fsync_dir(host.state_dir)
        return True


def _ensure_layout(host: Host) -> None:
    """Before an edit: the ledger is in files per group (converted if still one file)."""
    if os.path.lexists(host.journal):
        migrate(host)


def group_locks(host: Host, groups: list[IommuGroup]) -> Locks:
    """Every group's lock, taken in group order so two creates never deadlock."""
    return Locks([_join(host.state_dir, "locks", f"group-{g}") for g in sorted(set(groups))])


class editing(edited):
    """The ledger, to change in place; the files whose entries changed are written back
    when the block ends without an exception. With `groups`, only those groups' entries
    are read (the caller holds their locks); without, every group's. Either way a change
    to a group's entries is made under that group's lock (the caller's), and what this
    edit did not change in a file stays as it is there."""

    def __init__(self, host: Host, *, groups: set[int] | None = None) -> None:
        super().__init__(
            None,
            lambda: _read_for_edit(host, groups),
            lambda journal: _write_journal_file(host, journal),
        )

    def __enter__(self) -> Journal:
        journal: Journal = super().__enter__()
        return journal


def _read_for_edit(host: Host, groups: set[int] | None) -> Journal:
    _ensure_layout(host)
    return read_journal_file(host, groups=groups)


def read_journal(host: Host) -> dict[str, dict[str, Any]]:
    """The device table as plain objects (for listings and tests)."""
    return {a: e.to_obj() for a, e in read_journal_file(host).devices.items()}


def _vf_group(host: Host, addr: str, recorded: int | None) -> int | None:
    if recorded is not None:
        return recorded
    try:
        return group_of(host.sysfs, PciAddress.parse(addr)).number
    except (KataVfioError, OSError, ValueError):
        return None


# --- containers' markers and bundles' instance tokens (who owns what: owners.py) ----------


def marker(state_dir: StrPath, container_id: str) -> str:
    return _join(state_dir, "containers", ContainerId.parse(container_id))


def read_instance(bundle: str) -> str | None:
    """The instance token in a bundle directory (None: no bundle, or no token)."""
    try:
        fd = os.open(
            _join(bundle, INSTANCE_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        )
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
        write_atomically(_join(bundle, INSTANCE_FILE), token.encode(), mode=0o600, durable=False)
    except OSError:
        return None
    return token


def write_marker(
    host: Host, container: ContainerId, bundle: str | None, instance: str | None = None
) -> None:
    from kata_vfio.files import write_atomically

    path = marker(host.state_dir, container)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record: dict[str, Any] = {"owner": container.owner, "boot_id": host.boot_id, "bundle": bundle}
    if instance is not None:
        record["instance"] = instance
    # a marker of this boot only: no disk flush (see write_atomically)
    write_atomically(path, dumps(record).encode(), mode=0o600, durable=False)
