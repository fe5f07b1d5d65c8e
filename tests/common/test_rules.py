"""One implementation per rule (issue 18 point 4): every entry point that applies a rule
calls the same code, so they agree. Each table runs every entry point over the same inputs."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kata_vfio.defaults import id_problem
from kata_vfio.errors import HookError, KataVfioError
from kata_vfio.manifest import DEVICES_ANNOTATION, MANIFEST_ANNOTATION
from kata_vfio_hook.state import parse_state
from kata_vfio_host.ledger import ContainerId
from kata_vfio_runtime import main as runtime_main
from kata_vfio_runtime import shim

from fakesys import FakeSysfs
from wrapper_run import make_recorder, write_config

# --- container ids: kata-vfio create, the shim's start, the hook, the ledger -------------

PLAIN_IDS = ["c1", "0123abcdef" * 6, "k8s_pod.x-1", "a" * 200]
# "a" * 256: the wrapper took it, then failed writing its marker ("File name too long");
# "a" * 257: the hook took it while the wrapper and the ledger refused it
UNUSABLE_IDS = [
    "",
    ".",
    "..",
    "../x",
    ".hidden",
    "a/b",
    "x y",
    "café",
    "a" * 201,
    "a" * 256,
    "a" * 257,
    "c1\n",
]


def _with_devices(bundle: Path, where: Path) -> Path:
    """A copy of `bundle` (runc spec) asking for group 12's device."""
    where.mkdir()
    (where / "rootfs").mkdir()
    spec = json.loads((bundle / "config.json").read_text())
    spec["annotations"] = {DEVICES_ANNOTATION: "0000:03:00.0"}
    (where / "config.json").write_text(json.dumps(spec))
    return where


def _edit_or_refuse(
    main: Any, argv: list[str], bundle: Path, capsys: pytest.CaptureFixture[str]
) -> str | None:
    """Run a wrapper's main on `bundle`: None when it edited the spec and exec'd, else its
    stderr (the spec untouched, nothing exec'd)."""
    before = (bundle / "config.json").read_text()
    execs: list[list[str]] = []
    main(argv, exec_fn=lambda path, args: execs.append(list(args)))
    err: str = capsys.readouterr().err
    if execs:  # handed over (the exec seam returns, so main says 127)
        assert MANIFEST_ANNOTATION in (bundle / "config.json").read_text()
        return None
    assert (bundle / "config.json").read_text() == before
    return err


def _create(cid: str, bundle: Path, capsys: pytest.CaptureFixture[str]) -> str | None:
    """`kata-vfio create --bundle B ID`."""
    return _edit_or_refuse(
        runtime_main.main, ["kata-vfio", "create", "--bundle", str(bundle), cid], bundle, capsys
    )


def _shim_start(
    cid: str, bundle: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> str | None:
    """containerd's `<shim> -namespace NS -address A -id ID start` in the bundle."""
    monkeypatch.chdir(bundle)
    return _edit_or_refuse(
        shim.main,
        [
            "containerd-shim-kata-vfio-v2",
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-id",
            cid,
            "start",
        ],
        bundle,
        capsys,
    )


def _hook(cid: str) -> str | None:
    try:
        parse_state(json.dumps({"id": cid, "pid": 4242, "bundle": ""}))
    except HookError as exc:
        return exc.one_line()
    return None


def _ledger(cid: str) -> str | None:
    try:
        ContainerId.parse(cid)
    except KataVfioError as exc:
        return exc.one_line()
    return None


@pytest.mark.parametrize("cid", PLAIN_IDS + UNUSABLE_IDS)
def test_every_entry_point_takes_the_same_container_ids(
    cid: str,
    vfio_host: FakeSysfs,
    bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = make_recorder(tmp_path)
    config = write_config(
        tmp_path,
        runtime=str(recorder),
        shim=str(recorder),
        sysfs=str(vfio_host.root),
        log_file=str(tmp_path / "kv.log"),
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    answers = {
        "kata-vfio create": _create(cid, _with_devices(bundle, tmp_path / "b1"), capsys),
        "shim start": _shim_start(cid, _with_devices(bundle, tmp_path / "b2"), capsys, monkeypatch),
        "hook": _hook(cid),
        "ledger": _ledger(cid),
    }
    if cid in PLAIN_IDS:
        assert answers == dict.fromkeys(answers), answers
        return
    for where, line in answers.items():
        assert line is not None, f"{where} took {cid!r}"
        lines = line.strip().splitlines() if "\n" not in cid else [line.strip()]
        assert len(lines) == 1 and id_problem(cid) in lines[0], (where, line)
        assert "use a plain container id" in lines[0], (where, line)
    assert not os.path.exists(tmp_path / "state" / "containers")  # nothing claimed


# --- hex IDs: devices -d and select, the persistent-bind file, the manifest, addresses,
# the auto-bind allow-list ---------------------------------------------------------------

HEX_IDS = {  # text: the number every reader makes of it, or None where all refuse it
    "8086": 0x8086,
    "10d3": 0x10D3,
    "0000": 0,
    "ffff": 0xFFFF,
    # the manifest's reader took these (int(text, 16) does), every other reader not
    "80_6": None,
    "808 ": None,
    "808": None,
    "00008086": None,
    "+808": None,
    "808660": None,
    "80g6": None,
    "0x86": None,
    "": None,
}


def _ids_reader_answers(text: str) -> dict[str, int | None]:
    from kata_vfio.manifest import ManifestDevice
    from kata_vfio.pci import PciAddress
    from kata_vfio_host.allocate import parse_ids
    from kata_vfio_host.allowlist import parse_rule
    from kata_vfio_host.persist import parse_binds

    answers: dict[str, int | None] = {}

    def attempt(where: str, read: Callable[[], int | None]) -> None:
        try:
            answers[where] = read()
        except KataVfioError:
            answers[where] = None

    attempt("devices -d / select", lambda: parse_ids(f"{text}:10d3", "devices -d").vendor)
    attempt(
        "persistent binds", lambda: parse_binds(f"0000:03:00.0 {text}:10d3\n", "binds")[0].vendor
    )
    device = {
        "host_address": "0000:03:00.0",
        "vendor": f"0x{text}",
        "device": "0x10d3",
        "subsystem_vendor": "0x8086",
        "subsystem_device": "0x0000",
        "class": "0x020000",
    }
    attempt("manifest", lambda: ManifestDevice.from_obj(device).identity.vendor)
    attempt("PCI address domain", lambda: PciAddress.parse(f"{text}:03:00.0").domain)
    attempt("autobind allow", lambda: int(parse_rule(f"{text}:10d3").vendor or "-", 16))
    return answers


@pytest.mark.parametrize("text", list(HEX_IDS))
def test_every_reader_takes_the_same_hex_ids(text: str) -> None:
    answers = _ids_reader_answers(text)
    assert answers == dict.fromkeys(answers, HEX_IDS[text]), answers


# --- MACs: the manifest (the guest hook's side) and io.kata-vfio.vf-config ---------------

MACS = {  # text: the MAC both readers make of it, or None
    "52:54:00:12:34:56": "52:54:00:12:34:56",
    "52:54:00:AB:cd:EF": "52:54:00:ab:cd:ef",
    "52:54:00:12:34": None,
    "52:54:00:12:34:56:78": None,
    "52-54-00-12-34-56": None,
    "52:54:00:12:34:5g": None,
    "52:54:00:12:34:+5": None,
    "52:54:00:12:34:5": None,
    "52:54:0:012:34:56": None,
}


@pytest.mark.parametrize("text", list(MACS))
def test_manifest_and_vf_config_take_the_same_macs(text: str) -> None:
    from kata_vfio.manifest import ManifestDevice
    from kata_vfio_host.vfconfig import parse_vf_config

    device = {
        "host_address": "0000:03:00.0",
        "vendor": "0x8086",
        "device": "0x10ca",
        "subsystem_vendor": "0x8086",
        "subsystem_device": "0x0000",
        "class": "0x020000",
        "mac": text,
    }
    answers: dict[str, str | None] = {}
    try:
        answers["manifest"] = ManifestDevice.from_obj(device).mac
    except KataVfioError:
        answers["manifest"] = None
    try:
        answers["vf-config"] = parse_vf_config(f"0000:03:00.0 mac={text}")[0].mac
    except KataVfioError as exc:
        assert "is not a unicast MAC" in exc.one_line()
        answers["vf-config"] = None
    assert answers == dict.fromkeys(answers, MACS[text]), answers


@pytest.mark.parametrize("text", ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"])
def test_vf_config_also_wants_a_unicast_mac(text: str) -> None:
    """What a VF may be given is narrower than what a manifest may name: no multicast,
    no all-zero (that clears the VF's MAC)."""
    from kata_vfio_host.vfconfig import parse_vf_config

    with pytest.raises(KataVfioError, match="is not a unicast MAC"):
        parse_vf_config(f"0000:03:00.0 mac={text}")


# --- read-modify-write of state under a lock: the journal, the hook's claims, the binds ---


class _Edit:
    """One of the states kept by kata_vfio.files.edited: how to open an edit of it in
    `directory`, change its one entry (the n-th way), and the files that hold it."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.dir = directory

    def editing(self) -> Any:
        if self.name == "journal":
            from kata_vfio_host.ledger import Host, editing

            return editing(Host(self.dir / "sys", self.dir / "state", lambda *a: None, boot_id="b"))
        if self.name == "claims":
            from kata_vfio_hook.claims import ledger

            return ledger(self.dir / "claims", time.monotonic() + 5)
        if self.name == "plugin records":
            from kata_vfio_ctl.plugin_ledger import editing_records
            from kata_vfio_host.ledger import Host

            return editing_records(
                Host(self.dir / "sys", self.dir / "state", lambda *a: None, boot_id="b")
            )
        from kata_vfio_host.persist import editing_binds

        return editing_binds(str(self.dir / "etc/binds"))

    def change(self, value: Any, n: int) -> None:
        if self.name == "journal":
            from kata_vfio_host.ledger import Claim

            value.claims[1] = Claim(f"c{n}", "b", None)
        elif self.name == "plugin records":
            from kata_vfio_ctl.plugin_ledger import Allocation

            cid = "kubernetes-allocation-0000-03-00.0"
            value[cid] = Allocation(
                cid, "kata-vfio.io/nic", ("0000:03:00.0",), frozenset({12}), float(n)
            )
        elif self.name == "claims":
            from kata_vfio_hook.claims import Claim as GuestClaim

            value["0000:00:01.0"] = GuestClaim(f"c{n}", 4242, n)
        else:
            from kata_vfio.pci import PciAddress
            from kata_vfio_host.persist import PersistentBind

            value[:] = [PersistentBind(PciAddress.parse("0000:01:00.0"), 0x8086, 0x10D0 + n)]

    def files(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.dir)): p.read_bytes()
            for p in sorted(self.dir.rglob("*"))
            if p.is_file()
            and "lock" not in str(p.relative_to(self.dir))
            and not p.name.startswith(".")
        }


@pytest.mark.parametrize("name", ["journal", "claims", "persistent binds", "plugin records"])
def test_every_state_is_edited_the_same_way(name: str, tmp_path: Path) -> None:
    state = _Edit(name, tmp_path)
    with state.editing() as value:
        state.change(value, 1)
    first = state.files()
    assert len(first) == 1, first  # a change is written
    with pytest.raises(RuntimeError), state.editing() as value:
        state.change(value, 2)
        raise RuntimeError("the caller failed")
    assert state.files() == first  # nothing of a failed block is written
    (path,) = [tmp_path / p for p in first]
    inode = path.stat().st_ino
    with state.editing() as value:
        pass
    assert path.stat().st_ino == inode  # no change, no rewrite
    with state.editing() as value:
        state.change(value, 2)
    assert state.files() != first and path.stat().st_ino != inode  # a new file, renamed in


# --- the one thread pool: the host's binds and give-backs, the hook's binds -------------


@pytest.mark.parametrize(("items", "threads"), [(1, 8), (5, 1), (5, 2), (32, 8), (3, 8)])
def test_the_thread_pool_bounds_orders_and_waits(items: int, threads: int) -> None:
    from kata_vfio.threads import in_threads

    lock = threading.Lock()
    running, most, done = [0], [0], []

    def work(n: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
            done.append(n)
        return n * n

    assert in_threads(list(range(items)), work, threads) == [n * n for n in range(items)]
    assert most[0] <= min(items, threads) and sorted(done) == list(range(items))
    if items > 1 and threads > 1:
        assert most[0] > 1  # they did overlap


@pytest.mark.parametrize("stop_on_error", [False, True])
def test_the_thread_pool_raises_once_every_started_item_is_done(stop_on_error: bool) -> None:
    from kata_vfio.threads import in_threads

    done: list[int] = []

    def work(n: int) -> None:
        if n == 0:
            raise OSError(5, "Input/output error")
        time.sleep(0.02)
        done.append(n)

    with pytest.raises(OSError, match="Input/output"):
        in_threads(list(range(6)), work, 2, stop_on_error=stop_on_error)
    finished = list(done)
    time.sleep(0.1)
    assert done == finished  # nothing still running after the raise
    # without stop_on_error every item ran; with it at most what the other thread had started
    assert len(finished) == 5 if not stop_on_error else len(finished) <= 1


# --- the two wrappers: kata-vfio (OCI runtime) and the containerd shim ------------------

WRAPPERS = {  # name: (module, argv of a call that is handed straight over, what the inner is)
    "kata-vfio": (runtime_main, ["kata-vfio", "--root", "/run/r", "state", "c1"], "runtime"),
    "shim": (
        shim,
        ["containerd-shim-kata-vfio-v2", "-namespace", "k8s.io", "-id", "c1", "delete"],
        "shim",
    ),
}


def _run_wrapper(name: str, capsys: pytest.CaptureFixture[str]) -> tuple[list[list[str]], str]:
    module, argv, _ = WRAPPERS[name]
    execs: list[list[str]] = []
    module.main(list(argv), exec_fn=lambda path, args: execs.append(list(args)))
    return execs, capsys.readouterr().err.strip()


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_both_wrappers_find_their_inner_program_the_same_way(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kata_vfio_runtime import wrapping

    _, argv, setting = WRAPPERS[name]
    recorder = make_recorder(tmp_path)
    # a config.toml naming the inner program: handed over with the very same argv
    config = write_config(tmp_path, **{setting: str(recorder)})
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    execs, err = _run_wrapper(name, capsys)
    assert execs == [[str(recorder), *argv[1:]]] and err == ""
    # one it cannot find: one line, naming the file it came from
    config.write_text(f'{setting} = "no-such-{setting}"\n')
    execs, err = _run_wrapper(name, capsys)
    assert execs == [] and len(err.splitlines()) == 1
    assert f"inner {setting} 'no-such-{setting}' not found (from {config})" in err
    # no config.toml at all: the default name, and a line that says it was the default
    # (kata-vfio named the missing file instead)
    missing = tmp_path / "etc/config.toml"
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(missing))
    monkeypatch.setattr(wrapping, "DEFAULT_CONFIG", str(missing))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    execs, err = _run_wrapper(name, capsys)
    assert execs == [] and len(err.splitlines()) == 1
    assert f"not found (from {wrapping.BUILT_IN})" in err, err
