"""`make install` into a scratch root (DESTDIR), then the installed commands run from there
(issue 17, "Install on a node, not a venv"): no source tree, no .venv on their path."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakesys import FakeSysfs

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/usr/local"
COMMANDS = ("kata-vfio-ctl", "kata-vfio", "containerd-shim-kata-vfio-v2")
# what a node has: no venv, no source tree, nothing of the tests' environment
NODE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def make(target: str, root: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), target, f"DESTDIR={root}", f"PREFIX={PREFIX}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def installed_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("node") / "root"
    root.mkdir()
    done = make("install", root)
    assert done.returncode == 0, done.stdout + done.stderr
    yield root


def run_installed(root: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    # cwd: somewhere that is neither the repository nor the scratch root
    return subprocess.run(
        [str(root / PREFIX.lstrip("/") / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env={**NODE_ENV, **env},
        cwd="/",
        timeout=120,
    )


def test_installed_commands_run_from_the_scratch_root(root: Path, tmp_path: Path) -> None:
    bindir = root / "usr/local/bin"
    for name in COMMANDS:
        assert os.access(bindir / name, os.X_OK), name
    help_ = run_installed(root, ["kata-vfio-ctl", "--help"])
    assert help_.returncode == 0 and help_.stdout.startswith("usage: kata-vfio-ctl"), help_

    # they import the installed package, with its PyPI dependencies and the generated
    # gRPC code: even with the source tree on PYTHONPATH (the launchers run -I -S)
    payload = root / "usr/local/lib/kata-vfio/python"
    probe = subprocess.run(
        [
            "/usr/bin/python3",
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(payload)!r}); "
            "import grpc, kata_vfio_ctl.kubeapi.deviceplugin_pb2_grpc as g, kata_vfio_ctl.main; "
            "print(g.__file__)",
        ],
        capture_output=True,
        text=True,
        env=NODE_ENV,
        check=True,
    )
    assert probe.stdout.strip().startswith(str(payload))
    assert not [
        p for p in (bindir / "kata-vfio-ctl").read_text().split() if ".venv" in p or str(REPO) in p
    ]

    # devices on a fake sysfs, through config.toml as an admin points it
    fs = FakeSysfs(tmp_path / "sys")
    fs.add_device("0000:03:00.0", group=12, driver="e1000e")
    config = tmp_path / "config.toml"
    config.write_text(
        f'runtime = "/bin/true"\nshim = "/bin/true"\n'
        f'sysfs = "{fs.root}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'log_file = "{tmp_path / "log"}"\n'
    )
    listed = run_installed(
        root,
        ["kata-vfio-ctl", "devices", "--json"],
        KATA_VFIO_CONFIG=str(config),
        PYTHONPATH=f"{REPO}/common:{REPO}/wrapper:{REPO}/hook",
    )
    assert listed.returncode == 0, listed.stderr
    assert [d["address"] for d in json.loads(listed.stdout)] == ["0000:03:00.0"]

    # the register commands name the installed commands beside the kata-vfio-ctl that ran
    conf = tmp_path / "containers.conf"
    reg = run_installed(
        root,
        ["kata-vfio-ctl", "podman-register", "--conf", str(conf)],
        KATA_VFIO_CONFIG=str(config),
    )
    assert reg.returncode == 0, reg.stderr
    assert f'kata-vfio = ["{bindir}/kata-vfio"]' in conf.read_text()
    cconf = tmp_path / "containerd.toml"
    reg = run_installed(
        root,
        ["kata-vfio-ctl", "containerd-register", "--conf", str(cconf), "--config-version", "2"],
        KATA_VFIO_CONFIG=str(config),
    )
    assert reg.returncode == 0, reg.stderr
    assert f'runtime_path = "{bindir}/containerd-shim-kata-vfio-v2"' in cconf.read_text()
    # and what they name runs: a passthrough verb reaches the inner runtime / shim
    for argv in (["kata-vfio", "state", "x"], ["containerd-shim-kata-vfio-v2", "-v"]):
        done = run_installed(root, argv, KATA_VFIO_CONFIG=str(config))
        assert done.returncode == 0, (argv, done.stderr)


def test_man_page_and_completions_are_the_parsers(root: Path) -> None:
    man = root / "usr/local/share/man/man1/kata-vfio-ctl.1"
    page = subprocess.run(
        ["man", "-l", str(man)],
        capture_output=True,
        text=True,
        env={**NODE_ENV, "MANPAGER": "cat", "MANWIDTH": "100"},
        check=True,
    )
    for subcommand in ("kata-vfio-ctl devices", "kata-vfio-ctl bind", "kata-vfio-ctl restore"):
        assert subcommand in page.stdout
    bash = root / "usr/local/share/bash-completion/completions/kata-vfio-ctl"
    loaded = subprocess.run(
        ["bash", "-c", f"source {bash} && complete -p kata-vfio-ctl"],
        capture_output=True,
        text=True,
        env=NODE_ENV,
    )
    assert loaded.returncode == 0 and " -F " in loaded.stdout, loaded
    # the completion offers the parser's subcommands
    words = subprocess.run(
        [
            "bash",
            "-c",
            f"source {bash}; COMP_WORDS=(kata-vfio-ctl re); "
            "COMP_CWORD=1; COMP_LINE='kata-vfio-ctl re'; COMP_POINT=16; "
            f"{loaded.stdout.split(' -F ')[1].split()[0]} kata-vfio-ctl re; "
            "printf '%s\\n' \"${COMPREPLY[@]}\"",
        ],
        capture_output=True,
        text=True,
        env=NODE_ENV,
    )
    assert "restore" in words.stdout.split(), words
    # zsh's compinit finds it on fpath for kata-vfio-ctl and loads the function
    functions = root / "usr/local/share/zsh/site-functions"
    zsh = subprocess.run(
        [
            "zsh",
            "-f",
            "-c",
            f"fpath=({functions} $fpath); autoload -Uz compinit"
            " && compinit -u -D && print -r -- ${_comps[kata-vfio-ctl]} && "
            "autoload -Uz +X _kata-vfio-ctl && print loaded",
        ],
        capture_output=True,
        text=True,
        env=NODE_ENV,
    )
    assert zsh.stdout.split() == ["_kata-vfio-ctl", "loaded"], zsh


def test_the_rest_of_the_layout(root: Path, tmp_path: Path) -> None:
    module = root / "usr/lib/dracut/modules.d/90kata-vfio"
    assert os.access(module / "module-setup.sh", os.X_OK)
    assert os.access(module / "kata-vfio-hook", os.X_OK)
    # the logrotate snippet: logrotate reads it, and it rotates the log in place
    snippet = root / "etc/logrotate.d/kata-vfio"
    state = tmp_path / "logrotate.state"
    check = subprocess.run(
        ["logrotate", "-d", "-s", str(state), str(snippet)],
        capture_output=True,
        text=True,
        env=NODE_ENV,
    )
    assert (
        check.returncode == 0
        and "rotating pattern: /var/log/kata-vfio.log" in check.stderr + check.stdout
    ), check
    log = tmp_path / "kata-vfio.log"
    log.write_text('{"event": "bound"}\n')
    here = tmp_path / "kata-vfio.logrotate"
    here.write_text(snippet.read_text().replace("/var/log/kata-vfio.log", str(log)))
    subprocess.run(["logrotate", "-f", "-s", str(state), str(here)], env=NODE_ENV, check=True)
    assert (
        log.read_text() == ""
        and (tmp_path / "kata-vfio.log.1").read_text() == '{"event": "bound"}\n'
    )
    units = (
        sorted(p.name for p in (REPO / "systemd").glob("*.service"))
        if (REPO / "systemd").is_dir()
        else []
    )
    for unit in units:
        text = (root / "usr/local/lib/systemd/system" / unit).read_text()
        assert "@BINDIR@" not in text
    # config.toml: every setting commented out, valid as it is
    config = root / "etc/kata-vfio/config.toml"
    assert '# log_file = "/var/log/kata-vfio.log"' in config.read_text()
    listed = run_installed(
        root, ["kata-vfio-ctl", "devices", "--json"], KATA_VFIO_CONFIG=str(config)
    )
    assert listed.returncode == 0, listed.stderr


def test_uninstall_removes_what_install_put_and_keeps_a_changed_config(root: Path) -> None:
    done = make("uninstall", root)
    assert done.returncode == 0, done.stderr
    assert list(root.iterdir()) == []  # no file, and none of the directories it made

    again = make("uninstall", root)
    assert again.returncode != 0
    assert "no kata-vfio installed under /usr/local" in again.stderr

    # a directory that was there before (zsh-common leaves this one) stays
    site_functions = root / "usr/local/share/zsh/site-functions"
    site_functions.mkdir(parents=True)
    assert make("install", root).returncode == 0
    config = root / "etc/kata-vfio/config.toml"
    config.write_text('runtime = "/usr/bin/kata-runtime"\n')
    done = make("install", root)
    assert done.returncode == 0, done.stderr
    assert "present, left as it is" in done.stdout
    assert config.read_text() == 'runtime = "/usr/bin/kata-runtime"\n'
    done = make("uninstall", root)
    assert done.returncode == 0, done.stderr
    assert "changed since install, kept" in done.stdout
    assert installed_files(root) == {"etc/kata-vfio/config.toml"}
    assert site_functions.is_dir()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()) == [
        "etc",
        "etc/kata-vfio",
        "usr",
        "usr/local",
        "usr/local/share",
        "usr/local/share/zsh",
        "usr/local/share/zsh/site-functions",
    ]


def test_the_wheel_installs_with_pip_into_a_venv(tmp_path: Path) -> None:
    """The other route: `pip install` of `make wheel`'s file, the kubelet API modules in it."""
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "wheel"],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (REPO / "build/dist").glob("kata_vfio-*.whl")
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, env=NODE_ENV)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        env=NODE_ENV,
        timeout=600,
    )
    config = tmp_path / "config.toml"
    config.write_text('runtime = "/bin/true"\nshim = "/bin/true"\n')
    env = {**NODE_ENV, "KATA_VFIO_CONFIG": str(config)}
    for argv in (
        ["kata-vfio-ctl", "--help"],
        ["kata-vfio", "state", "x"],
        ["containerd-shim-kata-vfio-v2", "-v"],
    ):
        ran = subprocess.run(
            [str(venv / "bin" / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
        )
        assert ran.returncode == 0, (argv, ran.stderr)
    grpc_code = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import kata_vfio_ctl.kubeapi.deviceplugin_pb2_grpc as g; print(g.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        check=True,
    )
    assert grpc_code.stdout.startswith(str(venv))
