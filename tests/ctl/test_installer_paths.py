"""Issue 15: what the installers must never do to a file that is not theirs.

- Defect 9: an admin's own `kata-vfio` runtime in containerd's config is refused, never
  replaced, and unregister leaves it (byte-identical).
- Defect 10: a config that writes the runtimes as dotted keys gets our runtime where
  containerd reads it (containerd's own `config dump`), for version 2 and 3 layouts.
- A tool given a wrong path never deletes or rewrites what it installed before, nor a
  file it did not write (containerd, CRI-O, podman, Kata, CDI, the install records).
- Every file the ctl tools and installers read may be a FIFO, a device or huge: one line,
  non-zero, no hang, nothing changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kata_vfio.errors import ConfigError
from kata_vfio_ctl.containerd_conf import (
    register_containerd,
    registered_containerd,
    unregister_containerd,
)
from kata_vfio_ctl.engine_shim import ShimRuntime
from kata_vfio_ctl.kata3 import GENERATED_NAME

from fakesys import FakeSysfs
from wrapper_run import SOURCE_PATH

SHIM = "/usr/local/bin/containerd-shim-kata-vfio-v2"
KATA_CONF = "/etc/kata-containers/kata-vfio.toml"
PROG = "kata-vfio-ctl: "

ADMINS_OWN = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata-vfio]
  runtime_type = "io.containerd.kata.v2"  # the admin's own, pointing at plain Kata
  privileged_without_host_devices = false
"""

KATA3 = """\
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
image = "/opt/kata/share/kata-containers/kata-containers.img"
hot_plug_vfio = "no-port"

[runtime]
vfio_mode = "guest-kernel"
"""


def run_ctl(args: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    """kata-vfio-ctl in its own process; the timeout is the test for "no hang"."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": SOURCE_PATH,
        "KATA_VFIO_CONFIG": str(config),
    }
    return subprocess.run(
        [sys.executable, "-m", "kata_vfio_ctl.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode not in (0, 70), (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "kata-vfio.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\nlog_file = "{tmp_path / "log"}"\n')
    return path


@pytest.fixture
def shim(tmp_path: Path) -> str:
    path = tmp_path / "bin" / "containerd-shim-kata-vfio-v2"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


# --- defect 9: the admin's own kata-vfio runtime ---------------------------------------------


def test_an_admins_own_kata_vfio_runtime_is_refused_and_left_alone(
    tmp_path: Path, config: Path
) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(ADMINS_OWN)
    with pytest.raises(ConfigError, match=r"already has a kata-vfio runtime .* did not add"):
        register_containerd(conf, ShimRuntime(SHIM, KATA_CONF))
    assert conf.read_text() == ADMINS_OWN
    assert not unregister_containerd(conf)
    assert conf.read_text() == ADMINS_OWN
    # as the admin meets it: one line and non-zero for register, "left alone" for unregister
    line = one_line_error(run_ctl(["containerd-register", "--conf", str(conf)], config))
    assert "did not add" in line and str(conf) in line
    done = run_ctl(["containerd-unregister", "--conf", str(conf)], config)
    assert done.returncode == 0 and "left alone" in done.stdout
    assert conf.read_text() == ADMINS_OWN


def test_our_own_registration_is_still_updated_and_removed(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text("version = 2\n")
    assert register_containerd(conf, ShimRuntime())
    assert register_containerd(conf, ShimRuntime(SHIM, KATA_CONF))  # ours: replaced
    assert registered_containerd(conf)["runtime_path"] == SHIM  # type: ignore[index]
    assert unregister_containerd(conf)
    assert conf.read_text() == "version = 2\n"


# --- defect 10: runtimes as dotted keys --------------------------------------------------------

DOTTED = {
    2: 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n'
    '  containerd.runtimes.runc.runtime_type = "io.containerd.runc.v2"\n',
    3: "version = 3\n[plugins.'io.containerd.cri.v1.runtime']\n"
    "  containerd.runtimes.runc.runtime_type = 'io.containerd.runc.v2'\n",
}
PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}


@pytest.mark.parametrize("version", [2, 3])
def test_dotted_runtimes_get_ours_where_containerd_reads_them(tmp_path: Path, version: int) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(DOTTED[version])
    assert register_containerd(conf, ShimRuntime(SHIM, KATA_CONF))
    runtimes = tomllib.loads(conf.read_text())["plugins"][PLUGIN[version]]["containerd"]["runtimes"]
    assert set(runtimes) == {"runc", "kata-vfio"}  # beside runc, not in a table of its own
    assert runtimes["kata-vfio"]["runtime_type"] == "io.containerd.kata-vfio.v2"
    assert "containerd" not in tomllib.loads(conf.read_text())  # no top-level table
    assert unregister_containerd(conf)
    assert conf.read_text() == DOTTED[version]


@pytest.mark.host
@pytest.mark.skipif(
    not shutil.which("containerd") and not os.environ.get("KATA_VFIO_NO_SKIPS"),
    reason="needs containerd",
)
def test_real_containerd_reads_a_dotted_registration(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(DOTTED[2])
    register_containerd(conf, ShimRuntime(SHIM, KATA_CONF))
    dumped = subprocess.run(
        ["containerd", "-c", str(conf), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    runtimes = tomllib.loads(dumped)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"][
        "runtimes"
    ]
    assert runtimes["kata-vfio"]["runtime_type"] == "io.containerd.kata-vfio.v2"
    assert runtimes["kata-vfio"]["options"] == {"ConfigPath": KATA_CONF}
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"


# --- a wrong path never deletes what was installed before ---------------------------------------


def test_unregister_pointed_at_another_containerd_config(tmp_path: Path, config: Path) -> None:
    right, wrong = tmp_path / "config.toml", tmp_path / "other.toml"
    right.write_text("version = 2\n")
    wrong.write_text(ADMINS_OWN)
    register_containerd(right, ShimRuntime(SHIM))
    registered = right.read_bytes()
    done = run_ctl(["containerd-unregister", "--conf", str(wrong)], config)
    assert done.returncode == 0 and "left alone" in done.stdout
    assert wrong.read_text() == ADMINS_OWN and right.read_bytes() == registered


def test_crio_never_replaces_nor_removes_a_dropin_it_did_not_write(
    tmp_path: Path, config: Path, shim: str
) -> None:
    dropin = tmp_path / "crio.conf.d" / "10-crun.conf"
    dropin.parent.mkdir()
    theirs = '[crio.runtime.runtimes.crun]\nruntime_path = "/usr/bin/crun"\n'
    dropin.write_text(theirs)
    line = one_line_error(
        run_ctl(["crio-register", "--dropin", str(dropin), "--shim-path", shim], config)
    )
    assert "not written by kata-vfio-ctl" in line
    done = run_ctl(["crio-unregister", "--dropin", str(dropin)], config)
    assert done.returncode == 0 and "left alone" in done.stdout
    assert dropin.read_text() == theirs
    # a link at the drop-in's place is not ours either: never replaced by a file
    link = tmp_path / "crio.conf.d" / "50-kata-vfio.conf"
    link.symlink_to(dropin)
    one_line_error(run_ctl(["crio-register", "--dropin", str(link), "--shim-path", shim], config))
    run_ctl(["crio-unregister", "--dropin", str(link)], config)
    assert link.is_symlink() and dropin.read_text() == theirs


def test_podman_unregister_pointed_at_another_file(tmp_path: Path, config: Path) -> None:
    right, wrong = tmp_path / "containers.conf", tmp_path / "user.conf"
    theirs = (
        '[engine]\nruntime_supports_json = ["runc", "kata-vfio"]\n\n'
        '[engine.runtimes]\nkata-vfio = ["/home/me/kata-vfio"]\n'
    )
    wrong.write_text(theirs)
    assert (
        run_ctl(
            ["podman-register", "--conf", str(right), "--runtime-path", "/x/kata-vfio"], config
        ).returncode
        == 0
    )
    registered = right.read_bytes()
    done = run_ctl(["podman-unregister", "--conf", str(wrong)], config)
    assert done.returncode == 0 and "left alone" in done.stdout
    assert wrong.read_text() == theirs and right.read_bytes() == registered
    # and a register there refuses to replace the admin's runtime with ours
    line = one_line_error(
        run_ctl(["podman-register", "--conf", str(wrong), "--runtime-path", "/x/kata-vfio"], config)
    )
    assert "did not add" in line
    assert wrong.read_text() == theirs


def test_uninstall_pointed_at_another_kata_configuration(tmp_path: Path, config: Path) -> None:
    """Kata >= 2: the generated file and its record stay when uninstall names another
    installed configuration; uninstall of the right one then removes them."""
    kata = tmp_path / "kata" / "configuration.toml"
    kata.parent.mkdir()
    kata.write_text(KATA3)
    other = tmp_path / "other" / "configuration.toml"
    other.parent.mkdir()
    other.write_text(KATA3)
    podman = tmp_path / "containers.conf"
    args = ["--conf", str(podman)]
    assert (
        run_ctl(
            [
                "install",
                "--kata-config",
                str(kata),
                "--kata-version",
                "3.30",
                "--runtime-path",
                "/x/kata-vfio",
                *args,
            ],
            config,
        ).returncode
        == 0
    )
    generated = kata.with_name(GENERATED_NAME)
    record = tmp_path / "state" / "install-kata.json"
    before = (generated.read_bytes(), record.read_bytes(), config.read_bytes())
    done = run_ctl(["uninstall", "--kata-config", str(other), *args], config)
    assert done.returncode == 0, done.stderr
    assert "left alone" in done.stdout
    assert (generated.read_bytes(), record.read_bytes(), config.read_bytes()) == before
    done = run_ctl(["uninstall", "--kata-config", str(kata), *args], config)
    assert done.returncode == 0 and not generated.exists()
    assert "kata_config_path" not in tomllib.loads(config.read_text())


def test_kata1_uninstall_of_another_file_keeps_the_record(tmp_path: Path) -> None:
    from kata_vfio_ctl.kata_conf import install, uninstall

    right, wrong = tmp_path / "configuration.toml", tmp_path / "other.toml"
    text = '[hypervisor.qemu]\npath = "/usr/bin/qemu"\nmachine_type = "pc"\n'
    right.write_text(text)
    wrong.write_text(text)
    state = tmp_path / "state"
    assert install(right, state, "/usr/share/oci/hooks", {})
    edited, record = right.read_bytes(), (state / "install.json").read_bytes()
    assert uninstall(wrong, state) == []
    assert wrong.read_text() == text and right.read_bytes() == edited
    assert (state / "install.json").read_bytes() == record
    assert uninstall(right, state) and right.read_text() == text


def test_cdi_never_removes_nor_replaces_a_spec_it_did_not_write(
    fakesys: FakeSysfs, tmp_path: Path, config: Path
) -> None:
    fakesys.add_device("0000:05:00.0", group=14, driver="nvme")  # no usable group
    spec = tmp_path / "cdi" / "vendor.json"
    spec.parent.mkdir()
    theirs = json.dumps({"cdiVersion": "0.5.0", "kind": "vendor.com/gpu", "devices": []})
    spec.write_text(theirs)
    done = run_ctl(["cdi", "--sysfs", str(fakesys.root), "--output", str(spec)], config)
    assert done.returncode == 1 and "removed" not in done.stderr
    assert spec.read_text() == theirs


# --- every file read may be a FIFO, a device or huge --------------------------------------------


def _make(kind: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: a blocking open would hang the tool
    elif kind == "device":
        path.symlink_to("/dev/zero")  # a real char device: an unbounded read never ends
    else:
        path.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")


ENTRY_POINTS = {
    "containerd-register": lambda f, shim: [
        "containerd-register",
        "--conf",
        f,
        "--config-version",
        "2",
    ],
    "containerd-unregister": lambda f, shim: ["containerd-unregister", "--conf", f],
    "crio-register": lambda f, shim: ["crio-register", "--dropin", f, "--shim-path", shim],
    "crio-unregister": lambda f, shim: ["crio-unregister", "--dropin", f],
    "podman-register": lambda f, shim: ["podman-register", "--conf", f, "--runtime-path", "/x"],
    "podman-unregister": lambda f, shim: ["podman-unregister", "--conf", f],
    "install --kata-config": lambda f, shim: [
        "install",
        "--kata-config",
        f,
        "--kata-version",
        "1.13",
        "--conf",
        f + ".podman",
    ],
    "uninstall --kata-config": lambda f, shim: [
        "uninstall",
        "--kata-config",
        f,
        "--conf",
        f + ".podman",
    ],
    "install --containerd": lambda f, shim: [
        "install",
        "--kata-config",
        "KATA",
        "--kata-version",
        "3.30",
        "--conf",
        f + ".podman",
        "--containerd",
        f,
    ],
    "install --conf": lambda f, shim: [
        "install",
        "--kata-config",
        "KATA1",
        "--kata-version",
        "1.13",
        "--conf",
        f,
    ],
    "doctor --conf": lambda f, shim: ["doctor", "--kata-config", "KATA", "--conf", f],
    "doctor --kata-config": lambda f, shim: ["doctor", "--kata-config", f, "--conf", f + ".x"],
    "install record": lambda f, shim: [
        "install",
        "--kata-config",
        "KATA1",
        "--conf",
        f + ".podman",
    ],
    "uninstall record": lambda f, shim: [
        "uninstall",
        "--kata-config",
        "KATA1",
        "--conf",
        f + ".podman",
    ],
    "install-kata record": lambda f, shim: ["uninstall", "--conf", f + ".podman"],
    "install-kata record (install)": lambda f, shim: [
        "install",
        "--kata-config",
        "KATA",
        "--kata-version",
        "3.30",
        "--conf",
        f + ".podman",
    ],
}


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_file_that_is_no_plain_file_is_one_line_and_no_hang(
    tmp_path: Path, config: Path, shim: str, entry: str, kind: str
) -> None:
    kata = tmp_path / "kata" / "configuration.toml"
    kata.parent.mkdir()
    kata.write_text(KATA3)
    kata1 = tmp_path / "kata1" / "configuration.toml"
    kata1.parent.mkdir()
    kata1.write_text('[hypervisor.qemu]\npath = "/usr/bin/qemu"\n\n[proxy.kata]\n')
    state = tmp_path / "state"
    if "record" in entry:
        name = "install-kata.json" if entry.startswith("install-kata") else "install.json"
        bad = state / name
    else:
        bad = tmp_path / "etc" / "file"
    _make(kind, bad)
    argv = [
        a.replace("KATA1", str(kata1)).replace("KATA", str(kata))
        for a in ENTRY_POINTS[entry](str(bad), shim)
    ]
    done = run_ctl(argv, config)
    if entry == "crio-unregister":  # not a drop-in crio-register wrote: never removed
        assert done.returncode == 0 and "left alone" in done.stdout, done
    elif entry.startswith("doctor"):  # doctor reports the file among its checks
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert str(bad) in done.stdout, done.stdout
    else:
        line = one_line_error(done)
        assert str(bad) in line, line
        assert entry == "crio-register" or "regular file" in line or "larger than" in line, line
    assert kata.read_text() == KATA3
    assert not kata.with_name(GENERATED_NAME).exists()  # refused before anything was written
    assert not (state / "install-kata.json").exists() or "record" in entry
    assert "kata_config_path" not in config.read_text()
    if kind == "fifo":
        assert bad.is_fifo()
    elif kind == "device":
        assert bad.is_symlink()
