"""Which container holds which guest device: the claim ledger.

Two containers of one pod can ask for two different host devices with the same IDs;
in the guest the two look alike, and a device already on vfio-pci looks free. So each
hook records the guest devices it takes, keyed by guest PCI address, with the
container's id, its init's pid and that pid's start time (``/proc/<pid>/stat`` field
22, so a reused pid is not taken for the container). The record is written under an
flock *before* anything is bound; the next hook skips devices claimed by a live
container, drops claims whose container is gone, and gives a restarted container
(same id, new pid) its own devices back. One JSON file on the guest's /run tmpfs.
"""

from __future__ import annotations

import fcntl
import os
import time

from kata_vfio.errors import HookError
from kata_vfio.files import edited, file_lock, write_atomically
from kata_vfio.jsoncodec import dumps, loads
from kata_vfio.value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import StrPath

LEDGER = "claims.json"
LOCK = ".lock"


class Claim(Value):
    container_id: str
    pid: int
    start: int | None  # the pid's start time in clock ticks since boot

    def to_obj(self) -> dict[str, object]:
        return {"container_id": self.container_id, "pid": self.pid, "start": self.start}


def start_ticks(proc: StrPath, pid: int | str) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time, ticks since boot); None if the process
    is gone. The command name (field 2) may hold spaces and ')': split after the last ')'."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            text = f.read()
        return int(text[text.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_live(proc: StrPath, claim: Claim) -> bool:
    return claim.start is not None and start_ticks(proc, claim.pid) == claim.start


def _damaged(path: str, why: str) -> HookError:
    return HookError(
        f"the claims file {path} is damaged ({why}): which container holds "
        "which device is unknown, so no device is given",
        "remove it once no container of this pod holds VFIO devices",
    )


def _parse(data: bytes, path: str) -> dict[str, Claim]:
    """Every entry or none: a damaged file fails closed (a device one container holds
    must not look free to the next), never as "no claims"."""
    try:
        raw = loads(data)
    except ValueError as exc:
        raise _damaged(path, f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _damaged(path, "not an object")
    claims = {}
    for addr, obj in raw.items():
        cid, pid, start = (
            (obj.get("container_id"), obj.get("pid"), obj.get("start"))
            if isinstance(obj, dict)
            else (None, None, None)
        )
        if not (
            isinstance(cid, str)
            and cid
            and type(pid) is int
            and (start is None or type(start) is int)
        ):
            raise _damaged(path, f"entry {addr!r} is not a claim")
        claims[addr] = Claim(cid, pid, start)
    return claims


LOCK_POLL = 0.01  # seconds between tries for a lock another hook holds


class ledger(edited):  # `with ledger(root, until) as claims`
    """The claims (guest address -> Claim), held under the ledger's lock; changes made to
    the dict are written back atomically when the block ends without an exception.

    The lock is waited for until `until` (time.monotonic()), never longer: another hook
    holds it for one look at sysfs and one small write, so a lock still held at the hook's
    deadline means a stuck holder, and the hook must still end before the agent kills it."""

    def __init__(self, root: StrPath, until: float) -> None:
        self._root = os.fspath(root)
        self._until = until
        path = os.path.join(self._root, LEDGER)
        # held for one look at sysfs and one small write; the kernel drops it if we die
        super().__init__(
            file_lock(os.path.join(self._root, LOCK), self._wait, dir_mode=0o700),
            lambda: _read(path),
            lambda claims: _write(path, claims),
            snapshot=dict,
        )

    def _wait(self, fd: int, path: str) -> None:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                now = time.monotonic()
                if now >= self._until:
                    raise HookError(
                        f"waited {now - started:.1f} s for the claims lock {path}, which "
                        "another hook holds: no device is given",
                        "a hook stuck in this guest holds it; restart the pod",
                    ) from None
                time.sleep(min(LOCK_POLL, self._until - now))

    def __enter__(self) -> dict[str, Claim]:
        claims: dict[str, Claim] = super().__enter__()
        return claims


def _read(path: str) -> dict[str, Claim]:
    try:
        with open(path, "rb") as f:
            return _parse(f.read(), path)
    except FileNotFoundError:
        return {}


def _write(path: str, claims: dict[str, Claim]) -> None:
    text = dumps({a: c.to_obj() for a, c in sorted(claims.items())})
    write_atomically(path, text.encode(), 0o600)


def sort_out(
    claims: dict[str, Claim], container_id: str, proc: StrPath
) -> tuple[set[str], dict[str, Claim]]:
    """(addresses this container claimed before, claims of other live containers);
    drops the claims of containers that are gone."""
    mine: set[str] = set()
    theirs: dict[str, Claim] = {}
    for addr, claim in list(claims.items()):
        if claim.container_id == container_id:
            mine.add(addr)
        elif is_live(proc, claim):
            theirs[addr] = claim
        else:
            del claims[addr]
    return mine, theirs


def release(root: StrPath, container_id: str, until: float) -> None:
    """Drop every claim of the container (its hook failed: it holds nothing)."""
    with ledger(root, until) as claims:
        for addr in [a for a, c in claims.items() if c.container_id == container_id]:
            del claims[addr]
