"""Device ownership through one ledger: every create checks it, delete ends it only when
the container is really gone, earlier boots and removed bundles own nothing, a bad
journal entry blocks nobody. Each test here reproduces a defect of issue 7."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kata_vfio.errors import ConfigError, DeviceError
from kata_vfio.manifest import DEVICES_ANNOTATION
from kata_vfio.pci import IommuGroup, PciAddress
from kata_vfio_host.bindings import acquire, bind_group
from kata_vfio_host.giveback import release_gone, restore_all
from kata_vfio_host.ledger import ADMIN, ContainerId, Host, marker, read_journal
from kata_vfio_host.settings import load_settings
from kata_vfio_runtime import lifecycle
from kata_vfio_runtime import main as runtime_main
from ledgerfiles import read_ledger, write_ledger

from fakesys import NVME, FakeKernel, FakeSysfs
from wrapper_run import make_recorder, write_config


def A(text: str) -> PciAddress:
    return PciAddress.parse(text)


@pytest.fixture
def host(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Host:
    fakesys.add_device("0000:08:00.0", NVME, group=11, driver="nvme")
    fakesys.add_device("0000:09:00.0", NVME, group=12, driver="nvme")
    return Host(
        sysfs=fakesys.root, state_dir=tmp_path / "state", write=kernel.write, boot_id="boot-1"
    )


def bundle_dir(tmp_path: Path, name: str) -> str:
    d = tmp_path / "bundles" / name
    d.mkdir(parents=True)
    return str(d)


def test_device_entry_for_another_containers_group_is_refused(
    host: Host, tmp_path: Path, fakesys: FakeSysfs
) -> None:
    """Defect 3: `--device /dev/vfio/N` for a group another container auto-bound."""
    acquire(
        host, ContainerId("c1"), [], [A("0000:08:00.0")], ("1b36:0010",), bundle_dir(tmp_path, "c1")
    )
    assert fakesys.driver("0000:08:00.0") == "vfio-pci"
    with pytest.raises(DeviceError, match="IOMMU group 11 is in use by container c1"):
        acquire(host, ContainerId("c2"), [IommuGroup(11)], [], (), bundle_dir(tmp_path, "c2"))
    assert fakesys.driver("0000:08:00.0") == "vfio-pci"  # c1 keeps it
    assert not Path(marker(host.state_dir, "c2")).exists()


def test_a_removed_bundle_ends_ownership(host: Host, tmp_path: Path, fakesys: FakeSysfs) -> None:
    """The owner is gone when its bundle directory is gone: the next create takes over."""
    b1 = bundle_dir(tmp_path, "c1")
    acquire(host, ContainerId("c1"), [], [A("0000:08:00.0")], ("1b36:*",), b1)
    shutil.rmtree(b1)  # as engines remove a bundle, with what is in it
    acquire(
        host, ContainerId("c2"), [], [A("0000:08:00.0")], ("1b36:*",), bundle_dir(tmp_path, "c2")
    )
    owners = {e["owner"] for e in read_journal(host).values()}
    assert owners == {"container c2"}
    assert fakesys.driver("0000:08:00.0") == "vfio-pci"
    assert not Path(marker(host.state_dir, "c1")).exists() or "c1" in release_gone(host)[0]


def test_an_earlier_boot_owns_nothing(host: Host, tmp_path: Path, fakesys: FakeSysfs) -> None:
    """Reboots: entries from an earlier boot are restorable but own nothing."""
    acquire(host, ContainerId("old"), [], [A("0000:09:00.0")], ("*",), bundle_dir(tmp_path, "old"))
    fakesys.set_driver("0000:09:00.0", "nvme")  # what the reboot itself does
    rebooted = Host(host.sysfs, host.state_dir, host.write, boot_id="boot-2")
    acquire(rebooted, ContainerId("new"), [IommuGroup(12)], [], (), bundle_dir(tmp_path, "new"))
    gone, report = release_gone(rebooted)
    assert gone == ["old"] and report.failed == []
    # the old boot's bind ended with it: the new create dropped its record, gave nothing
    # back (issue 17)
    assert report.restored == []
    assert fakesys.driver("0000:09:00.0") == "nvme"
    assert "0000:09:00.0" not in read_journal(rebooted)
    assert not Path(marker(host.state_dir, "old")).exists()


def test_restore_all_goes_past_bad_entries(host: Host, fakesys: FakeSysfs) -> None:
    """Defect 5: a vanished device or a malformed key does not stop the others."""
    bind_group(host, A("0000:08:00.0"), ADMIN)
    data = read_ledger(host.state_dir)
    data["devices"]["0000:0a:00.0"] = {**data["devices"]["0000:08:00.0"], "group": 30}
    data["devices"]["not-an-address"] = {"driver": "x"}
    write_ledger(host.state_dir, data)
    report = restore_all(host)
    assert "0000:08:00.0" in report.restored and "0000:0a:00.0" in report.restored
    assert fakesys.driver("0000:08:00.0") == "nvme"
    assert any("not-an-address" in f for f in report.failed)
    # the unreadable entry is kept for a human, out of the way
    assert "not-an-address" in read_ledger(host.state_dir)["damaged_devices"]


def test_give_back_failure_is_reported_and_the_rest_goes_on(host: Host, fakesys: FakeSysfs) -> None:
    bind_group(host, A("0000:08:00.0"), ADMIN)
    bind_group(host, A("0000:09:00.0"), ADMIN)
    (fakesys.dev_dir("0000:08:00.0") / "driver_override").unlink()
    (fakesys.dev_dir("0000:08:00.0") / "driver_override").mkdir()  # writes now fail
    report = restore_all(host)
    assert report.restored == ["0000:09:00.0"]
    assert len(report.failed) == 1 and report.failed[0].startswith("0000:08:00.0: ")
    assert "0000:08:00.0" in read_journal(host)  # kept, to retry


@pytest.mark.parametrize("pattern", [":", "8086:", ":10d3", "", "0000:03", "80 86:10d3"])
def test_loose_allow_list_patterns_are_refused(tmp_path: Path, pattern: str) -> None:
    """Defect 8: an empty part is not a wildcard in a security allow-list."""
    config = write_config(tmp_path, autobind={"allow": [pattern]})
    with pytest.raises(ConfigError, match="allow"):
        load_settings(str(config))


# --- the runtime wrapper in-process, with its exec seam ----------------------------------


@pytest.fixture
def wrapper(tmp_path: Path, host: Host, monkeypatch: pytest.MonkeyPatch) -> Path:
    recorder = make_recorder(tmp_path)
    config = write_config(
        tmp_path,
        runtime=str(recorder),
        sysfs=str(host.sysfs),
        state_dir=str(host.state_dir),
        log_file=str(tmp_path / "kv.log"),
        autobind={"allow": ["1b36:0010"]},
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    monkeypatch.setattr(lifecycle, "host_of", lambda settings: host)
    return recorder


def make_bundle(tmp_path: Path, name: str, annotations: dict[str, str]) -> Path:
    b = tmp_path / name
    (b / "rootfs").mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(b)], check=True)
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = annotations
    (b / "config.json").write_text(json.dumps(spec))
    return b


def run_main(argv: list[str]) -> tuple[int, list[list[str]]]:
    execs: list[list[str]] = []
    code = runtime_main.main(
        ["kata-vfio", *argv], exec_fn=lambda path, args: execs.append(list(args))
    )
    return code, execs


@pytest.mark.host
def test_auto_bound_devices_go_back_when_the_edit_fails(
    wrapper: Path,
    tmp_path: Path,
    fakesys: FakeSysfs,
    host: Host,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Defect 7: an OSError in the edit (a read-only bundle) leaves nothing bound."""
    b = make_bundle(tmp_path, "ro", {DEVICES_ANNOTATION: "0000:08:00.0"})
    before = (b / "config.json").read_bytes()
    subprocess.run(["mount", "--bind", str(b), str(b)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(b)], check=True)
        code, execs = run_main(["create", "--bundle", str(b), "ro1"])
    finally:
        subprocess.run(["umount", str(b)], check=True)
    assert code != 0 and execs == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and "config.json" in err[0]
    assert fakesys.driver("0000:08:00.0") == "nvme"
    assert read_journal(host) == {} and not Path(marker(host.state_dir, "ro1")).exists()
    assert (b / "config.json").read_bytes() == before


def test_delete_keeps_devices_while_the_container_still_exists(
    wrapper: Path, tmp_path: Path, fakesys: FakeSysfs, host: Host
) -> None:
    """Defect 4: the inner delete failed and the runtime still knows the container."""
    b = make_bundle(tmp_path, "k", {DEVICES_ANNOTATION: "0000:08:00.0"})
    code, execs = run_main(["create", "--bundle", str(b), "keep1"])
    assert code == 127 and execs and fakesys.driver("0000:08:00.0") == "vfio-pci"
    inner = tmp_path / "inner.sh"  # delete fails, state succeeds: the container lives on
    inner.write_text('#!/bin/sh\nfor a; do [ "$a" = state ] && exit 0; done\nexit 1\n')
    inner.chmod(0o755)
    config = write_config(
        tmp_path,
        runtime=str(inner),
        sysfs=str(host.sysfs),
        state_dir=str(host.state_dir),
        log_file=str(tmp_path / "kv.log"),
    )
    os.environ["KATA_VFIO_CONFIG"] = str(config)
    code, _ = run_main(["delete", "keep1"])
    assert code == 1
    assert fakesys.driver("0000:08:00.0") == "vfio-pci"
    assert Path(marker(host.state_dir, "keep1")).exists()
    log = (tmp_path / "kv.log").read_text()
    assert "still exists" in log
    # the runtime no longer knows it (state fails too): now the devices go back
    inner.write_text("#!/bin/sh\nexit 1\n")
    code, _ = run_main(["delete", "keep1"])
    assert code == 1
    assert fakesys.driver("0000:08:00.0") == "nvme"
    assert not Path(marker(host.state_dir, "keep1")).exists()


@pytest.mark.parametrize("cid", [".", ".."])
def test_delete_dot_passes_the_inner_exit_code(wrapper: Path, host: Host, cid: str) -> None:
    """Defect 8: `delete .` was answered with 1 by the wrapper itself."""
    (Path(host.state_dir) / "containers").mkdir(parents=True)
    code, execs = run_main(["delete", cid])
    assert code == 127 and execs and execs[0][1:] == ["delete", cid]  # exec'd unchanged


def test_create_bundle_without_value_is_refused(
    wrapper: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    b = make_bundle(tmp_path, "cwd", {DEVICES_ANNOTATION: "0000:08:00.0"})
    before = (b / "config.json").read_bytes()
    monkeypatch.chdir(b)
    code, execs = run_main(["create", "ctr", "--bundle"])
    assert code == 2 and execs == []
    assert "--bundle needs a value" in capsys.readouterr().err
    assert (b / "config.json").read_bytes() == before


def test_forged_manifest_is_removed_from_a_plain_container(wrapper: Path, tmp_path: Path) -> None:
    """Defect 1 (host side): a container asking for no device keeps no manifest."""
    forged = {
        "io.kata-vfio.manifest": '{"version":1,"groups":[]}',
        "io.katacontainers.config.hypervisor.guest_hook_path": "/evil",
        "org.example.keep": "yes",
    }
    b = make_bundle(tmp_path, "plain", forged)
    code, execs = run_main(["create", "--bundle", str(b), "plain1"])
    assert code == 127 and execs
    annotations = json.loads((b / "config.json").read_text())["annotations"]
    assert annotations == {"org.example.keep": "yes"}


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_config_json_must_be_a_sane_regular_file(
    wrapper: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 8: a FIFO hung the wrapper, /dev/zero was read without bound."""
    b = tmp_path / kind
    b.mkdir()
    if kind == "fifo":
        os.mkfifo(b / "config.json")
    elif kind == "dev-zero":
        (b / "config.json").symlink_to("/dev/zero")
    else:
        with open(b / "config.json", "wb") as f:
            f.truncate(17 << 20)
    code, execs = run_main(["create", "--bundle", str(b), "x1"])
    assert code == 1 and execs == []
    err = capsys.readouterr().err
    assert ("not a regular file" if kind != "huge" else "larger than") in err


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 2: os.write may write less than asked; the file must still be whole."""
    from kata_vfio import files

    real_write = os.write

    def short_write(fd: int, data: bytes | memoryview) -> int:
        return real_write(fd, bytes(data[:4096]))

    target = tmp_path / "f.json"
    target.write_text("{}")
    payload = json.dumps({"k": "x" * 50_000}).encode()
    monkeypatch.setattr(files.os, "write", short_write)
    files.write_atomically(target, payload)
    monkeypatch.undo()
    assert target.read_bytes() == payload


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.host
def test_full_filesystem_leaves_config_json_whole(
    wrapper: Path, tiny_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 2: on a nearly full filesystem config.json was cut at 20,480 bytes, exit 0."""
    b = tiny_fs / "bundle"
    b.mkdir()
    spec = {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"]},
        "root": {"path": "rootfs"},
        "linux": {},
        "annotations": {DEVICES_ANNOTATION: "0000:09:00.0", "pad": "x" * 24_000},
    }
    original = json.dumps(spec).encode()
    (b / "config.json").write_bytes(original)
    # fill the rest so the edited copy cannot fit
    with open(tiny_fs / "filler", "wb") as f:
        try:
            f.write(b"\0" * (40 << 10))
        except OSError:
            pass
    code, execs = run_main(["create", "--bundle", str(b), "full1"])
    assert code != 0 and execs == []
    assert "No space left on device" in capsys.readouterr().err
    assert (b / "config.json").read_bytes() == original
    assert [p.name for p in b.iterdir()] == ["config.json"]  # no temp file left behind


@pytest.mark.host
def test_full_state_dir_keeps_the_journal_readable(
    tiny_fs: Path, fakesys: FakeSysfs, kernel: FakeKernel
) -> None:
    """Defect 2: bindings.json was cut at 8,192 bytes and every restore said "damaged"."""
    for i in range(60):
        fakesys.add_device(f"0000:{0x20 + i:02x}:00.0", NVME, group=100 + i, driver="nvme")
    host = Host(fakesys.root, tiny_fs / "state", kernel.write, boot_id="b")
    (tiny_fs / "filler").write_bytes(b"\0" * (28 << 10))  # leaves three pages
    bound = []
    for i in range(60):
        try:
            bind_group(host, A(f"0000:{0x20 + i:02x}:00.0"), ADMIN)
            bound.append(i)
        except OSError:
            break
    else:
        pytest.fail("the tiny filesystem never filled up")
    journal = read_journal(host)  # still whole JSON, every bound device recorded
    assert sorted(journal) == [f"0000:{0x20 + i:02x}:00.0" for i in bound]
    failed = f"0000:{0x20 + len(bound):02x}:00.0"
    assert fakesys.driver(failed) == "nvme"  # the journal came first: nothing moved


# --- issue 15: releases under the group locks, claims of one container instance ----------


def test_restore_stale_racing_a_takeover_never_leaves_a_claim_unbound(
    host: Host, tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel
) -> None:
    """Issue 15 defect 5: `restore --stale` (a slow sysfs) gives a gone owner's device back
    while a create takes the group over. The create's claim must say what is true: its
    device is on vfio-pci, not back on its host driver behind the claim's back."""
    b1 = bundle_dir(tmp_path, "gone")
    acquire(host, ContainerId("gone"), [], [A("0000:08:00.0")], ("1b36:*",), b1)
    shutil.rmtree(b1)  # the containerd way: bundle removed, no delete
    started = tmp_path / "give-back-started"

    def slow_write(path: str | Path, text: str) -> None:
        if os.path.basename(path) == "driver_override" and not started.exists():
            started.write_text("x")  # the give-back has begun; a slow sysfs from here
            import time

            time.sleep(0.6)
        kernel.write(path, text)

    pid = os.fork()
    if pid == 0:
        slow = Host(host.sysfs, host.state_dir, slow_write, boot_id=host.boot_id)
        try:
            _, report = release_gone(slow)
            os._exit(0 if report.failed == [] else 1)
        except BaseException:
            os._exit(2)
    for _ in range(500):
        if started.exists():
            break
        os.waitpid(pid, os.WNOHANG)
        import time

        time.sleep(0.005)
    assert started.exists(), "restore --stale never began giving back"
    acquire(
        host, ContainerId("new"), [], [A("0000:08:00.0")], ("1b36:*",), bundle_dir(tmp_path, "new")
    )
    assert os.waitpid(pid, 0)[1] == 0
    journal = read_journal(host)
    assert journal["0000:08:00.0"]["owner"] == "container new"
    assert fakesys.driver("0000:08:00.0") == "vfio-pci"  # what the claim says it has


def test_release_gone_keeps_a_new_instance_under_the_same_id(
    host: Host, tmp_path: Path, fakesys: FakeSysfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 defect 5's class: `restore --stale` decides "gone" and then gives back;
    a container that claimed in between under the same id must keep its devices."""
    b1 = bundle_dir(tmp_path, "x")
    acquire(host, ContainerId("x"), [], [A("0000:08:00.0")], ("1b36:*",), b1)
    shutil.rmtree(b1)
    from kata_vfio_host import owners

    seen = owners.gone_containers(host)
    assert seen == ["x"]
    acquire(
        host, ContainerId("x"), [], [A("0000:08:00.0")], ("1b36:*",), bundle_dir(tmp_path, "x2")
    )  # the new instance, before the release ran
    monkeypatch.setattr(owners, "gone_containers", lambda host: seen)  # what it saw first
    _, report = release_gone(host)
    assert report.restored == [] and report.failed == []
    assert fakesys.driver("0000:08:00.0") == "vfio-pci"
    assert Path(marker(host.state_dir, "x")).exists()


def test_a_recreated_bundle_is_not_the_old_owner(
    host: Host, tmp_path: Path, fakesys: FakeSysfs
) -> None:
    """Issue 15 defect 11: a claim belongs to one container instance. The engine removed
    container x's bundle and a new container with the same id recreated the directory:
    `restore --stale` gives x's devices back and another container can have the group."""
    b1 = bundle_dir(tmp_path, "x")
    acquire(host, ContainerId("x"), [], [A("0000:08:00.0")], ("1b36:*",), b1)
    shutil.rmtree(b1)
    os.makedirs(b1)  # the new instance's engine made the same path again
    gone, report = release_gone(host)
    assert gone == ["x"] and report.failed == []
    assert fakesys.driver("0000:08:00.0") == "nvme"
    acquire(
        host,
        ContainerId("other"),
        [IommuGroup(11)],
        [A("0000:08:00.0")],
        ("1b36:*",),
        bundle_dir(tmp_path, "other"),
    )
    assert read_journal(host)["0000:08:00.0"]["owner"] == "container other"


def test_a_recreated_bundle_does_not_block_a_create(
    host: Host, tmp_path: Path, fakesys: FakeSysfs
) -> None:
    """Defect 11 without `restore --stale`: the next create takes over the group of an
    owner whose bundle path now holds another instance."""
    b1 = bundle_dir(tmp_path, "x")
    acquire(host, ContainerId("x"), [], [A("0000:09:00.0")], ("1b36:*",), b1)
    shutil.rmtree(b1)
    os.makedirs(b1)
    acquire(host, ContainerId("y"), [], [A("0000:09:00.0")], ("1b36:*",), bundle_dir(tmp_path, "y"))
    assert read_journal(host)["0000:09:00.0"]["owner"] == "container y"
    assert fakesys.driver("0000:09:00.0") == "vfio-pci"


def test_an_edit_for_some_groups_writes_the_other_groups_entries_back_as_found(
    tmp_path: Path,
) -> None:
    """A create reads and parses only its own groups' device entries and claims; the
    rest of the journal must come back unchanged, even entries written by hand in a form
    of their own (upper-case address, extra keys)."""
    from kata_vfio_host.ledger import DeviceEntry, editing, read_journal_file

    host = Host(tmp_path / "sys", tmp_path / "state", lambda *a: None, boot_id="b")
    with editing(host) as journal:
        journal.devices["0000:03:00.0"] = DeviceEntry("nvme", None, 1, "container a", "b", 1.0)
        journal.devices["0000:04:00.0"] = DeviceEntry("igb", None, 2, "container b", "b", 2.0)
    data = read_ledger(host.state_dir)
    data["devices"]["0000:05:00.0"] = dict(data["devices"].pop("0000:04:00.0"), note="kept")
    data["devices"]["0000:05:00.0"]["group"] = 3
    data["devices"]["0000:0A:00.0"] = {"driver": "e1000e", "group": 4, "owner": "admin"}
    write_ledger(host.state_dir, data)
    others = {k: v for k, v in data["devices"].items() if k != "0000:03:00.0"}
    with editing(host, groups={1}) as journal:
        assert set(journal.devices) == {"0000:03:00.0"}  # only its own group parsed
        journal.devices["0000:03:00.1"] = DeviceEntry("nvme", None, 1, "container a", "b", 3.0)
    after = read_ledger(host.state_dir)["devices"]
    assert {k: v for k, v in after.items() if not k.startswith("0000:03:")} == others
    assert set(after) >= {"0000:03:00.0", "0000:03:00.1"}
    whole = read_journal_file(host)
    assert whole.devices["0000:0a:00.0"].owner == "admin" and not whole.damaged
