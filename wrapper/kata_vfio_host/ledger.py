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

import fcntl
import os
import time
from _thread import get_ident

from kata_vfio import build, value
from kata_vfio.errors import DeviceError, KataVfioError
from kata_vfio.jsoncodec import dumps, loads
from kata_vfio.pci import IommuGroup, PciAddress
from kata_vfio.rebind import MODPROBE, write_attr
from kata_vfio_host.lockwait import flock_bounded

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from kata_vfio.types import InUse as InUse  # noqa: PLC0414 (re-exported for bindings.py until it is split)
    from kata_vfio.types import StrPath, SysfsWrite

ADMIN = "kata-vfio-ctl"
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


@value(init=False)
class Host:
    """The host's kernel interfaces and kata-vfio's state directory (paths as strings)."""

    sysfs: str
    state_dir: str
    write: SysfsWrite
    modprobe: tuple[str, ...]
    boot_id: str
    netlink: Any  # VF settings on the PF (vfconfig.Netlink when None)

    def __new__(cls, sysfs: StrPath, state_dir: StrPath, write: SysfsWrite = write_attr,
                modprobe: tuple[str, ...] = MODPROBE, boot_id: str | None = None,
                netlink: Any = None) -> Host:
        return build(cls, (os.fspath(sysfs), os.fspath(state_dir), write, modprobe,
                           read_boot_id() if boot_id is None else boot_id, netlink))

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


@value
class DeviceEntry:
    """A device kata-vfio moved: what to give it back to, its group and owner."""

    driver: str | None
    override: str | None
    group: int
    owner: str
    boot_id: str | None = None
    since: float = 0.0

    def to_obj(self) -> dict[str, Any]:
        return {"driver": self.driver, "override": self.override, "group": self.group,
                "owner": self.owner, "boot_id": self.boot_id, "since": self.since}


@value
class Claim:
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
        obj = {"container": self.container, "boot_id": self.boot_id, "bundle": self.bundle,
               "since": self.since}
        if self.instance is not None:
            obj["instance"] = self.instance
        return obj


@value
class VfOriginal:
    """What a PF had for one of its VFs before a container's io.kata-vfio.vf-config."""

    owner: str
    pf_interface: str
    index: int
    mac: str | None
    vlan: int | None
    boot_id: str | None = None
    group: int | None = None  # the VF's IOMMU group (None in entries of older versions)

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
    return name == HOST_FILE or (name.startswith("group-") and name.endswith(".json")
                                 and name[6:-5].isdigit() and name[6:-5].isascii())


def _load(path: str) -> dict[str, Any] | None:
    """A ledger file's object (None: no such file); DeviceError when unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise DeviceError(f"{path} is a directory, not part of kata-vfio's ledger",
                          "move it away; the ledger's files are JSON files") from None
    except OSError as exc:
        raise DeviceError(f"cannot read {path}: {exc.strerror}", "run as root") from None
    try:
        data = loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise DeviceError(f"{path} is damaged (not JSON)",
                          "check it by hand; it records which drivers to give devices back to"
                          ) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(t, {}), dict)
                                             for t in _TABLES):
        raise DeviceError(f"{path} is damaged (not a kata-vfio journal object)",
                          "check it by hand; it records which drivers to give devices back to")
    return data


def _parse_into(journal: Journal, data: dict[str, Any], name: str,
                groups: set[int] | None) -> None:
    """Add one file's entries (of `groups`, None: all) to the journal; remember what the
    file held as the entries' own objects, to write back only what changed."""
    seen: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    kept = data.get("damaged_devices") or {}
    for key, obj in kept.items():
        journal.kept[str(key)] = obj
        journal.kept_in[str(key)] = name
        seen["damaged_devices"][str(key)] = obj
    for key, obj in data.get("devices", {}).items():
        if groups is not None and type(obj) is dict and type(obj.get("group")) is int \
                and obj["group"] not in groups:
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
            raise DeviceError(f"cannot read {directory}: {exc.strerror}", "run as root"
                              ) from None
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
        table(_group_file(int(key)) if key.isdigit() and key.isascii() else HOST_FILE,
              "claims")[key] = obj
    for kind in ("devices", "vf_configs"):
        for key, obj in data.get(kind, {}).items():
            group = obj.get("group") if type(obj) is dict else None
            table(_file_of_group(group if type(group) is int and group >= 0 else None),
                  kind)[key] = obj
    for key, obj in data.get("damaged_devices", {}).items():
        table(HOST_FILE, "damaged_devices")[key] = obj
    return files


def _file_bytes(tables: dict[str, dict[str, Any]]) -> bytes:
    data: dict[str, Any] = {"version": LEDGER_VERSION}
    for kind in _TABLES:
        if tables.get(kind):
            items = tables[kind].items()
            data[kind] = dict(sorted(items, key=lambda kv: (len(kv[0]), kv[0]))
                              if kind == "claims" else sorted(items))
    return dumps(data).encode()


def _write_journal_file(host: Host, journal: Journal) -> None:
    """Write back the files whose entries changed, each atomically and durably, group
    files in group order, host.json last. What changed is applied to each file as it is
    now (read again just before): entries of the file that this edit did not change stay
    as they are, whoever wrote them."""
    now = _tables(journal)
    empty: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    changed = [name for name in set(now) | set(journal.read)
               if name != _V2 and now.get(name, empty) != journal.read.get(name, empty)]
    if not changed:
        return
    from kata_vfio.files import write_atomically

    os.makedirs(host.ledger_dir, mode=0o700, exist_ok=True)

    def order(name: str) -> tuple[int, int]:
        return (1, 0) if name == HOST_FILE else (0, int(name[6:-5]))

    for name in sorted(changed, key=order):
        before, after = journal.read.get(name, empty), now.get(name, empty)
        path = _join(host.ledger_dir, name)
        # each file is read again and written under its lock: the group's (which the
        # caller holds: re-entrant), the journal lock for host.json (no group's)
        lock = _join(host.state_dir, "journal.lock") if name == HOST_FILE else \
            _join(host.state_dir, "locks", f"group-{name[6:-5]}")
        with Locks([lock]):
            current = _load(path) or {}
            tables = {t: dict(current.get(t) or {}) for t in _TABLES}
            for kind in _TABLES:
                for key in before[kind].keys() | after[kind].keys():
                    if key in after[kind]:
                        if before[kind].get(key) != after[kind][key]:
                            tables[kind][key] = after[kind][key]
                    elif key in before[kind]:
                        tables[kind].pop(key, None)
            if any(tables.values()):
                write_atomically(path, _file_bytes(tables), mode=0o600)
            else:  # nothing left of the group: no file (a released group costs nothing)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        journal.read[name] = after


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


_HELD: set[tuple[int, str]] = set()  # (thread, lock path) this process holds now
_OUT_OF_ORDER_WAIT = 10.0  # seconds a lock taken out of group order may be waited for


def _group_number(path: str) -> int | None:
    name = os.path.basename(path)
    return int(name[6:]) if name.startswith("group-") and name[6:].isdigit() else None


class Locks:
    """flock(2) on lock files, taken in the order given, released in reverse when the
    block ends (or the process dies). Re-entrant per thread: a path this thread holds
    already is skipped (flock on a second open file would wait for ourselves).

    Group locks are always taken in ascending group order, also across nested blocks:
    a thread that holds group 7's lock and needs group 3's would deadlock with one that
    holds 3 and waits for 7. Callers take every lock they need up front; should a nested
    block still ask for a lower group than one it holds, it never waits blindly: it tries
    for up to 10 s and then fails with one line instead of deadlocking."""

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
                number = _group_number(path)
                highest = None if number is None else max(
                    (n for t, p in _HELD if t == thread and os.path.dirname(p) == made
                     if (n := _group_number(p)) is not None), default=None)
                try:
                    if highest is not None and number is not None and number < highest:
                        _flock_out_of_order(fd, number, highest)
                    else:
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


def _flock_out_of_order(fd: int, number: int, highest: int) -> None:
    deadline = time.monotonic() + _OUT_OF_ORDER_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DeviceError(f"IOMMU group {number}'s lock is held by another process "
                                  f"while this one holds group {highest}'s",
                                  "try again; locks are taken in group order") from None
            time.sleep(0.01)


def group_locks(host: Host, groups: list[IommuGroup]) -> Locks:
    """Every group's lock, taken in group order so two creates never deadlock."""
    return Locks([_join(host.state_dir, "locks", f"group-{g}") for g in sorted(set(groups))])


class editing:
    """The ledger, to change in place; the files whose entries changed are written back
    when the block ends without an exception. With `groups`, only those groups' entries
    are read (the caller holds their locks); without, every group's. Either way a change
    to a group's entries is made under that group's lock (the caller's), and what this
    edit did not change in a file stays as it is there."""

    def __init__(self, host: Host, *, groups: set[int] | None = None) -> None:
        self._host = host
        self._groups = groups

    def __enter__(self) -> Journal:
        _ensure_layout(self._host)
        self._journal = read_journal_file(self._host, groups=self._groups)
        return self._journal

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            _write_journal_file(self._host, self._journal)


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
