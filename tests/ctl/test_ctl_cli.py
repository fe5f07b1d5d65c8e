"""kata-vfio-ctl as a user meets it: one line on every failure, the input forms of
dpdk-devbind and driverctl, and devices in use however deep their interfaces sit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_vfio.errors import KataVfioError
from kata_vfio.pci import PciAddress
from kata_vfio_ctl.main import main as ctl
from kata_vfio_host.ledger import Host, read_journal

from fakesys import NVME, FakeKernel, FakeSysfs
from wrapper_run import SOURCE_PATH

PROG = "kata-vfio-ctl: "


@pytest.fixture
def ctl_config(vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "kv.toml"
    config.write_text(
        f'runtime = "/bin/true"\nsysfs = "{vfio_host.root}"\nstate_dir = "{tmp_path / "state"}"\n'
    )
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(config))
    return config


def closed_to_others(paths: list[Path]) -> Path | None:
    """The first directory on the way to `paths` that other users cannot enter, if any."""
    for path in paths:
        for step in reversed([path, *path.parents]):
            if step.is_dir() and not step.stat().st_mode & 0o001:
                return step
    return None


def run_ctl(
    args: list[str],
    config: Path,
    *,
    path: str | None = None,
    user: str | None = None,
    **kwargs: object,
) -> subprocess.CompletedProcess[str]:
    """kata-vfio-ctl in its own process, as a user starts it."""
    env = {
        "PATH": path if path is not None else os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": str(config),
    }
    argv = [sys.executable, "-m", "kata_vfio_ctl.main", *args]
    if user is not None:
        closed = closed_to_others([Path(sys.prefix), *map(Path, SOURCE_PATH.split(os.pathsep))])
        if closed is not None:
            mode = closed.stat().st_mode & 0o777
            pytest.fail(
                f"{closed} is closed to other users (mode {mode:o}):"
                f" this test runs kata-vfio-ctl from this venv and tree as user {user};"
                " keep the checkout where other users can read it (not under /root)",
                pytrace=False,
            )
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(argv, env=env, stderr=subprocess.PIPE, text=True, timeout=60, **kwargs)  # type: ignore[call-overload, no-any-return]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG), result.stderr
    return lines[0]


def sysfs_snapshot(fs: FakeSysfs) -> dict[str, str]:
    return {str(p): p.read_text() for p in fs.root.rglob("driver_override")}


# --- no tracebacks, ever -------------------------------------------------------------


@pytest.mark.parametrize("journal", ["null", "[]", '{"devices": []}', "directory"])
@pytest.mark.parametrize(
    "argv",
    [["devices"], ["bind", "0000:05:00.0"], ["restore", "--all"], ["restore", "0000:03:00.0"]],
)
def test_a_damaged_journal_is_one_line_naming_it(
    ctl_config: Path, vfio_host: FakeSysfs, tmp_path: Path, journal: str, argv: list[str]
) -> None:
    path = tmp_path / "state/bindings.json"
    path.parent.mkdir(parents=True)
    if journal == "directory":
        path.mkdir()
    else:
        path.write_text(journal)
    before = sysfs_snapshot(vfio_host)
    line = one_line_error(run_ctl(argv, ctl_config))
    assert str(path) in line and "internal error" not in line
    assert sysfs_snapshot(vfio_host) == before


@pytest.mark.host
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare for a read-only bind mount",
)
def test_bind_with_a_read_only_state_dir(
    ctl_config: Path, vfio_host: FakeSysfs, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    before = sysfs_snapshot(vfio_host)
    env_argv = [sys.executable, "-m", "kata_vfio_ctl.main", "bind", "0000:05:00.0"]
    script = f'mount --bind -o ro "{state}" "{state}" && exec "$@"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *env_argv],
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": SOURCE_PATH,
            "KATA_VFIO_CONFIG": str(ctl_config),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = one_line_error(result)
    assert "Read-only file system" in line and str(state) in line
    assert sysfs_snapshot(vfio_host) == before


def test_a_bad_name_pattern_is_a_usage_error(ctl_config: Path) -> None:
    result = run_ctl(["devices", "--name", "("], ctl_config)
    line = one_line_error(result)
    assert result.returncode == 2 and "--name" in line and "'('" in line


def test_a_non_ascii_sysfs_attribute_names_the_file(ctl_config: Path, vfio_host: FakeSysfs) -> None:
    (vfio_host.dev_dir("0000:05:00.0") / "vendor").write_bytes(b"0x1b\xff6\n")
    for argv in (["devices"], ["devices", "--json"], ["bind", "0000:05:00.0"]):
        line = one_line_error(run_ctl(argv, ctl_config))
        assert "0000:05:00.0/vendor holds bytes that are not ASCII" in line


def fake_tool(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(exist_ok=True)
    tool = directory / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return tool


@pytest.fixture
def bare_config(fakesys: FakeSysfs, tmp_path: Path) -> Path:
    """A host without vfio-pci registered: doctor asks modinfo."""
    config = tmp_path / "bare.toml"
    config.write_text(f'sysfs = "{fakesys.root}"\nstate_dir = "{tmp_path / "state"}"\n')
    return config


@pytest.fixture
def kata_with_initrd(tmp_path: Path) -> Path:
    kata = tmp_path / "configuration.toml"
    kata.write_text(f'[hypervisor.qemu]\ninitrd = "{tmp_path / "guest.img"}"\n')
    (tmp_path / "guest.img").write_bytes(b"")
    return kata


def test_doctor_without_modinfo_says_so(bare_config: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()  # nothing on PATH: no modinfo, no lsinitrd
    result = run_ctl(["doctor", "--conf", str(tmp_path / "c.conf")], bare_config, path=str(bin_dir))
    one_line_error(result)
    assert "modinfo not found" in result.stdout


def test_doctor_without_lsinitrd_says_so(
    ctl_config: Path, tmp_path: Path, kata_with_initrd: Path
) -> None:
    result = run_ctl(
        ["doctor", "--kata-config", str(kata_with_initrd), "--conf", str(tmp_path / "c.conf")],
        ctl_config,
        path=str(tmp_path / "x"),
    )
    one_line_error(result)
    assert "lsinitrd not found" in result.stdout


def test_doctor_reads_lsinitrd_output_that_is_not_utf8(
    bare_config: Path, tmp_path: Path, kata_with_initrd: Path
) -> None:
    bin_dir = tmp_path / "bin"
    fake_tool(
        bin_dir,
        "lsinitrd",
        r"printf '\377\376 not text\n-rwxr-xr-x   1 root root  212 Nov 24 08:00 "
        r"usr/share/oci/hooks/prestart/kata-vfio-hook\n'",
    )
    fake_tool(bin_dir, "modinfo", "echo 'modinfo: ERROR: Module vfio-pci not found.' >&2; exit 1")
    result = run_ctl(
        [
            "doctor",
            "--json",
            "--kata-config",
            str(kata_with_initrd),
            "--conf",
            str(tmp_path / "c.conf"),
        ],
        bare_config,
        path=str(bin_dir),
    )
    one_line_error(result)
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    assert checks["kata:initrd"]["status"] == "ok"
    # the tool's own words are kept (run() seam)
    assert "Module vfio-pci not found" in checks["vfio-modules"]["detail"]


@pytest.fixture
def world_readable_host() -> Iterator[tuple[FakeSysfs, Path]]:
    """A fake sysfs a non-root user can read but not write, as /sys is for them."""
    top = Path(tempfile.mkdtemp(prefix="kvfio-nonroot."))
    try:
        top.chmod(0o755)
        fs = FakeSysfs(top / "sys")
        fs.add_driver("vfio-pci")
        fs.add_device("0000:03:00.0", group=12, driver="e1000e")
        state = top / "state"
        state.mkdir(mode=0o777)
        state.chmod(0o777)
        config = top / "kv.toml"
        config.write_text(f'sysfs = "{fs.root}"\nstate_dir = "{state}"\n')
        yield fs, config
    finally:
        shutil.rmtree(top)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run as another user",
)
def test_bind_as_non_root_names_the_attribute(world_readable_host: tuple[FakeSysfs, Path]) -> None:
    fs, config = world_readable_host
    before = sysfs_snapshot(fs)
    line = one_line_error(run_ctl(["bind", "0000:03:00.0"], config, user="65534"))
    assert "permission denied" in line and "root" in line
    assert str(fs.root / "bus/pci/devices/0000:03:00.0/driver_override") in line
    assert sysfs_snapshot(fs) == before


def test_devices_into_a_closed_pipe_exits_quietly(ctl_config: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, every time
    try:
        result = run_ctl(["devices", "--json"], ctl_config, stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert result.stderr == ""


def test_devices_piped_into_head(ctl_config: Path) -> None:
    command = f'"{sys.executable}" -m kata_vfio_ctl.main devices --json | head -c 10'
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": SOURCE_PATH,
            "KATA_VFIO_CONFIG": str(ctl_config),
        },
    )
    assert result.returncode == 0 and result.stderr == ""
    assert len(result.stdout) == 10


def test_a_damaged_pci_ids_costs_names_not_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kata_vfio_host import pciids

    ids = tmp_path / "pci.ids"
    ids.write_bytes(
        b"8086  Intel Corporation\n\t10d3  82574L\nzz\xff garbage\n\tq  x\n"
        b"1b36  Red Hat\n\t0010  QEMU NVM Express\n"
    )
    monkeypatch.setattr(pciids, "PCI_IDS", (ids,))
    pciids._table.cache_clear()
    try:
        assert pciids.device_name(0x8086, 0x10D3) == "Intel Corporation 82574L"
        assert pciids.device_name(0x1B36, 0x0010) == "Red Hat QEMU NVM Express"
    finally:
        pciids._table.cache_clear()


def test_debug_shows_the_traceback(ctl_config: Path) -> None:
    result = run_ctl(["--debug", "devices", "--name", "("], ctl_config)
    assert result.returncode != 0 and "Traceback" in result.stderr


# --- devices in use, however deep their interfaces sit (defect 9) -------------------


def test_an_interface_below_a_virtio_function_is_in_use(
    ctl_config: Path, vfio_host: FakeSysfs, tmp_path: Path
) -> None:
    from kata_vfio_host.usage import uses

    # "lo" exists and is up with addresses on every host: the fake virtio NIC's name
    vfio_host.add_device("0000:00:03.0", (0x1AF4, 0x1041, 0x020000), group=30, driver="virtio-pci")
    vfio_host.add_child_interface("0000:00:03.0", "lo", "virtio2")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mounts").write_text("")
    reasons = uses(vfio_host.root, proc, PciAddress.parse("0000:00:03.0"))
    assert any(r.startswith("interface lo is up with addresses 127.0.0.1") for r in reasons)
    result = run_ctl(["devices", "--json", "0000:00:03.0"], ctl_config)
    record = json.loads(result.stdout)[0]
    assert record["interfaces"] == ["lo"] and record["in_use"], result.stderr
    line = one_line_error(run_ctl(["bind", "0000:00:03.0"], ctl_config))
    assert "is in use: interface lo is up with addresses" in line


def test_a_disk_below_a_virtio_function_is_in_use(vfio_host: FakeSysfs, tmp_path: Path) -> None:
    from kata_vfio_host.usage import uses

    vfio_host.add_device("0000:00:05.0", (0x1AF4, 0x1042, 0x010000), group=31, driver="virtio-pci")
    vfio_host.add_child_block("0000:00:05.0", "vdz", ("vdz1",))
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mounts").write_text("/dev/vdz1 /srv ext4 rw 0 0\n")
    assert uses(vfio_host.root, proc, PciAddress.parse("0000:00:05.0")) == [
        "block device /dev/vdz1 is mounted on /srv"
    ]


@pytest.mark.parametrize(
    ("mounts", "swaps", "holder", "reason"),
    [
        ("", "/dev/vdz2 partition 1048572 0 -2\n", None, "block device /dev/vdz2 is active swap"),
        (
            "/dev/dm-0 / ext4 rw 0 0\n",
            "",
            "vdz1",
            "block device /dev/vdz1 is under dm-0, which is mounted on /",
        ),
        (
            "",
            "/dev/dm-0 partition 1 0 -2\n",
            "vdz",
            "block device /dev/vdz is under dm-0, which is active swap",
        ),
        ("", "", "vdz1", "block device /dev/vdz1 is held by dm-0 (device-mapper or md)"),
    ],
)
def test_a_disk_the_host_stands_on_is_in_use(
    vfio_host: FakeSysfs, tmp_path: Path, mounts: str, swaps: str, holder: str | None, reason: str
) -> None:
    """Beyond a mounted partition: active swap, and a device-mapper/md device (LVM,
    dm-crypt, RAID) stacked on the disk or a partition, mounted, swap or merely there."""
    from kata_vfio_host.usage import uses

    vfio_host.add_device("0000:00:05.0", (0x1AF4, 0x1042, 0x010000), group=31, driver="virtio-pci")
    vfio_host.add_child_block("0000:00:05.0", "vdz", ("vdz1", "vdz2"))
    dm = vfio_host.root / "devices/virtual/block/dm-0"
    dm.mkdir(parents=True)
    os.symlink("../../devices/virtual/block/dm-0", vfio_host.root / "class/block/dm-0")
    if holder is not None:
        holders = vfio_host.root / "class/block" / holder / "holders"
        holders.mkdir()
        os.symlink("../../../../../../../virtual/block/dm-0", holders / "dm-0")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mounts").write_text(mounts)
    (proc / "swaps").write_text("Filename Type Size Used Priority\n" + swaps)
    got = uses(vfio_host.root, proc, PciAddress.parse("0000:00:05.0"))
    assert got == [reason], got


def default_route_function() -> tuple[str, str] | None:
    """(interface, PCI function) of this machine's default route, if a PCI device has it."""
    try:
        routes = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in routes:
        fields = line.split()
        if len(fields) > 1 and fields[1] == "00000000":
            target = Path(os.path.realpath(f"/sys/class/net/{fields[0]}"))
            for part in reversed(target.parts):
                try:
                    return fields[0], str(PciAddress.parse(part))
                except KataVfioError:
                    continue
    return None


@pytest.mark.host
def test_this_machines_own_nic_is_in_use(tmp_path: Path) -> None:
    found = default_route_function()
    if found is None:
        pytest.skip("no default route through a PCI device here")
    ifname, function = found
    config = tmp_path / "kv.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    result = run_ctl(["devices", "--json", function], config)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)[0]
    assert ifname in record["interfaces"]
    assert any(f"interface {ifname}" in use for use in record["in_use"]), record
    table = run_ctl(["devices", function], config).stdout
    assert f"IN USE: interface {ifname}" in table


# --- input forms users know: BB:SS.F, interface names, --dry-run ---------------------


@pytest.fixture
def fake_host(
    ctl_config: Path, vfio_host: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeSysfs, FakeKernel, Host]:
    """kata-vfio-ctl in-process, its sysfs writes played by a fake kernel."""
    import kata_vfio_ctl.base

    vfio_host.add_device("0000:08:00.0", group=40, driver="e1000e", net=("kvfio-enp8",))
    vfio_host.add_device(
        "0000:08:00.1", group=40, driver="e1000e", net=("kvfio-enp8f1",), mac="52:54:00:12:34:57"
    )
    vfio_host.add_device("0000:00:03.0", (0x1AF4, 0x1041, 0x020000), group=30, driver="virtio-pci")
    vfio_host.add_child_interface("0000:00:03.0", "kvfio-virt0", "virtio2")
    kernel = FakeKernel(vfio_host)
    host = Host(sysfs=vfio_host.root, state_dir=tmp_path / "state", write=kernel.write)
    monkeypatch.setattr(kata_vfio_ctl.base, "_host", lambda args: host)
    return vfio_host, kernel, host


def test_bind_takes_the_short_address_form(
    fake_host: tuple[FakeSysfs, FakeKernel, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, _, host = fake_host
    assert ctl(["bind", "--timeout", "0", "05:00.0"]) == 0, capsys.readouterr().err
    assert fs.driver("0000:05:00.0") == "vfio-pci"
    assert "0000:05:00.0" in read_journal(host)
    assert ctl(["restore", "05:00.0"]) == 0
    assert fs.driver("0000:05:00.0") == "nvme"
    assert "0000:05:00.0: given back" in capsys.readouterr().out


def test_bind_takes_an_interface_name(
    fake_host: tuple[FakeSysfs, FakeKernel, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, _, _ = fake_host
    assert ctl(["bind", "--timeout", "0", "kvfio-enp8f1"]) == 0, capsys.readouterr().err
    assert fs.driver("0000:08:00.1") == fs.driver("0000:08:00.0") == "vfio-pci"


def test_an_interface_below_a_virtio_device_names_the_pci_function_above(
    fake_host: tuple[FakeSysfs, FakeKernel, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(["bind", "--dry-run", "kvfio-virt0"]) == 0, capsys.readouterr().err
    assert "0000:00:03.0 (1af4:1041, virtio-pci) -> vfio-pci" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("lo", "no PCI device or network interface 'lo'"),
        ("0000:03:00.0/../x", "malformed PCI address"),
        ("kvfio-enp8/../../x", "malformed PCI address"),
        ("03:00", "malformed PCI address"),
        ("1:03:00.0", "malformed PCI address"),
    ],
)
def test_bad_device_arguments(
    fake_host: tuple[FakeSysfs, FakeKernel, Host],
    capsys: pytest.CaptureFixture[str],
    argument: str,
    message: str,
) -> None:
    _, kernel, _ = fake_host
    assert ctl(["bind", argument]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PROG) and message in err[0]
    assert kernel.writes == []


def test_a_virtual_interface_is_not_a_pci_device(
    fake_host: tuple[FakeSysfs, FakeKernel, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, kernel, _ = fake_host
    (fs.root / "devices/virtual/net/kvfio-br9").mkdir(parents=True)
    (fs.root / "class/net/kvfio-br9").symlink_to("../../devices/virtual/net/kvfio-br9")
    assert ctl(["bind", "kvfio-br9"]) != 0
    assert "interface kvfio-br9 is not on a PCI device" in capsys.readouterr().err
    assert kernel.writes == []


def test_dry_run_prints_the_moves_and_changes_nothing(
    fake_host: tuple[FakeSysfs, FakeKernel, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, kernel, host = fake_host
    assert ctl(["bind", "--dry-run", "0000:08:00.0"]) == 0
    out = capsys.readouterr().out
    assert "would move 0000:08:00.0 (8086:10d3, e1000e) -> vfio-pci" in out
    assert "would move 0000:08:00.1 (8086:10d3, e1000e) -> vfio-pci" in out
    assert kernel.writes == [] and read_journal(host) == {}
    assert fs.driver("0000:08:00.0") == "e1000e"


def test_bind_names_every_member_before_moving_it(
    fake_host: tuple[FakeSysfs, FakeKernel, Host],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import kata_vfio_ctl.base

    _, kernel, host = fake_host
    said_before_first_write: list[str] = []
    lock = threading.Lock()  # the binds run in threads; sysfs writes are atomic

    def write(path: Path, text: str) -> None:
        with lock:
            if not kernel.writes:
                said_before_first_write.append(capsys.readouterr().out)
            kernel.write(path, text)

    watched = Host(host.sysfs, host.state_dir, write)
    monkeypatch.setattr(kata_vfio_ctl.base, "_host", lambda args: watched)
    assert ctl(["bind", "--timeout", "0", "08:00.1"]) == 0
    lines = said_before_first_write[0].splitlines()
    assert lines == [
        "moving 0000:08:00.0 (8086:10d3, e1000e) -> vfio-pci",
        "moving 0000:08:00.1 (8086:10d3, e1000e) -> vfio-pci",
    ]


def test_dry_run_reports_a_refusal(
    fake_host: tuple[FakeSysfs, FakeKernel, Host], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, kernel, _ = fake_host
    fs.add_device("0000:09:00.0", NVME, group=41, driver="nvme")
    fs.add_child_interface("0000:09:00.0", "lo", "virtio7")  # up with addresses everywhere
    assert ctl(["bind", "--dry-run", "09:00.0"]) == 1
    assert "is in use: interface lo" in capsys.readouterr().err
    assert kernel.writes == []


def test_one_walk_over_proc_for_the_devices_of_one_command(
    fakesys: FakeSysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10: `kata-vfio-ctl bind A B C …` checks each device before and again under
    the group locks; the walk over every process's open files (a readlink per descriptor
    of every process) is done once for all of them, not twice per device."""
    from kata_vfio_host import usage

    from fakesys import NVME

    for i in range(4):
        fakesys.add_device(f"0000:{0x40 + i:02x}:00.0", NVME, group=40 + i, driver="nvme")
    proc = tmp_path / "proc"
    fds = proc / str(os.getpid()) / "fd"
    fds.mkdir(parents=True)
    os.symlink("/dev/vfio/41", fds / "7")
    os.symlink("/dev/vfio/410", fds / "8")  # group 410, not 41
    (proc / "self").mkdir()
    (proc / "self/mounts").write_text("")
    walks: list[Path] = []
    walk = usage.vfio_holders_by_group
    monkeypatch.setattr(usage, "vfio_holders_by_group", lambda p: walks.append(p) or walk(p))
    check = usage.use_checker(fakesys.root, proc)
    found = [check(PciAddress.parse(f"0000:{0x40 + i:02x}:00.0")) for i in range(4)] * 2
    assert len(walks) == 1
    assert [len(f) for f in found[:4]] == [0, 1, 0, 0]
    assert found[1][0].startswith(f"/dev/vfio/41 is open in process {os.getpid()} (")
    assert usage.vfio_holders(proc, 410)[0].startswith("/dev/vfio/410 is open")
