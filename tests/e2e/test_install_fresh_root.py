"""`make install` on a real fresh Debian 12 node (issue 17, "Install on a node"): a
debootstrap minbase root with nothing but make and the Makefile's NODE_APT_PACKAGES (the
README's promise: python3, pip, kmod, pci.ids and PyPI are enough), a copy of the tree,
`make install` run inside it, the installed commands run there, `make uninstall` leaves
the root as it was. test_install.py checks the layout under DESTDIR; this checks that a
node with only the node packages can build, install and run it.

The root is cached as a tarball under $KATA_VFIO_CACHE/freshroot by suite and package
list (tests/freshroot.py): cold, debootstrap takes about a minute; warm, unpacking takes
seconds. The root's apt sources and CA certificates are the host's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakesys import FakeSysfs
from freshroot import make_root, mounts_under, root_env, run_in_root

pytestmark = pytest.mark.freshroot

REPO = Path(__file__).resolve().parents[2]
SOURCE = "/root/kata-vfio"  # where the operator put the tree, inside the root
# not the node's files: the kernel's and the run's file systems, the source copy and its
# build, pip's download cache
NOT_THE_NODE = ("proc", "sys", "dev", "run", "tmp", SOURCE.lstrip("/"), "root/.cache")


def node_packages() -> list[str]:
    """NODE_APT_PACKAGES as the Makefile has it."""
    done = subprocess.run(
        [
            "make",
            "-s",
            "--no-print-directory",
            "-C",
            str(REPO),
            "--eval",
            "freshroot-node-packages: ; @echo $(NODE_APT_PACKAGES)",
            "freshroot-node-packages",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MAKE")},
    )
    return done.stdout.split()


def listing(root: Path) -> set[str]:
    """Every path of the root (files, directories, links) but NOT_THE_NODE."""
    paths = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel != "." and (
            rel in NOT_THE_NODE or rel.startswith(tuple(p + "/" for p in NOT_THE_NODE))
        ):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            paths.add(os.path.normpath(os.path.join(rel, name)))
    return {p for p in paths if p not in NOT_THE_NODE}


def copy_tree(root: Path) -> None:
    """The tree as the operator has it: what git tracks, and what is new and not ignored."""
    names = (
        subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    target = root / SOURCE.lstrip("/")
    for name in filter(None, names):
        source = REPO / name
        if not source.is_file():  # deleted in the work tree
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name)


def in_root(root: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    done = run_in_root(root, argv, env=root_env(**env), timeout=1200)
    assert mounts_under(root) == [], "a mount of the root outlived its command"
    return done


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, set[str]]]:
    root = tmp_path_factory.mktemp("fresh") / "root"
    make_root(root, ["make", *node_packages()])
    copy_tree(root)
    before = listing(root)
    done = in_root(root, ["make", "-C", SOURCE, "install"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "installing Debian packages" not in done.stdout, (
        "make install wanted Debian packages NODE_APT_PACKAGES does not have: " + done.stdout
    )
    yield root, before
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)


def test_the_installed_commands_run_on_the_fresh_node(node: tuple[Path, set[str]]) -> None:
    root, _ = node
    version = in_root(root, ["kata-vfio-ctl", "--version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "kata-vfio-ctl 0.1.0", version

    # devices on a fake sysfs, through a config.toml as an admin points it
    fs = FakeSysfs(root / "tmp/sys")
    fs.add_device("0000:03:00.0", group=12, driver="e1000e")
    (root / "tmp/config.toml").write_text(
        'runtime = "/bin/true"\nshim = "/bin/true"\nsysfs = "/tmp/sys"\n'
        'state_dir = "/tmp/state"\nlog_file = "/tmp/kata-vfio.log"\n'
    )
    config = {"KATA_VFIO_CONFIG": "/tmp/config.toml"}
    devices = in_root(root, ["kata-vfio-ctl", "devices"], **config)
    assert devices.returncode == 0, devices.stderr
    assert "0000:03:00.0" in devices.stdout and "e1000e" in devices.stdout, devices.stdout
    # the device's name, from the node's pci.ids
    assert "82574L" in devices.stdout, devices.stdout

    # runc's form (then the inner runtime's own lines), and containerd shims' form
    for argv, lines in (
        (["kata-vfio", "--version"], ["kata-vfio version 0.1.0"]),
        (
            ["containerd-shim-kata-vfio-v2", "--version"],
            ["containerd-shim-kata-vfio-v2:", "  Version: 0.1.0"],
        ),
    ):
        ran = in_root(root, argv, **config)
        assert ran.returncode == 0, (argv, ran.stderr)
        assert ran.stdout.splitlines()[: len(lines)] == lines, (argv, ran.stdout)

    # doctor on the node's real /sys and the installed config.toml: this host has no
    # IOMMU and the root no Kata and no engine; each failure is a [fail] line with its fix,
    # then one summary line, exit 1; nothing of Python's own
    doctor = in_root(root, ["kata-vfio-ctl", "doctor"])
    out = doctor.stdout + doctor.stderr
    assert doctor.returncode == 1, out
    assert "Traceback" not in out and "ModuleNotFoundError" not in out, out
    assert any(line.startswith("[fail] iommu: ") for line in doctor.stdout.splitlines()), out
    summary = doctor.stderr.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("kata-vfio-ctl: not ready: iommu"), out
    for line in doctor.stdout.splitlines():
        assert line.startswith(("[ok  ] ", "[warn] ", "[fail] ", "       fix: ")), line


def test_the_man_page_and_completion_on_the_fresh_node(node: tuple[Path, set[str]]) -> None:
    root, _ = node
    page = root / "usr/local/share/man/man1/kata-vfio-ctl.1"
    rendered = subprocess.run(
        ["man", "-l", str(page)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MANPAGER": "cat", "MANWIDTH": "100", "LANG": "C.UTF-8"},
        check=True,
    )
    assert "kata-vfio-ctl devices" in rendered.stdout
    # the node's own bash loads the completion and offers the parser's subcommands
    words = in_root(
        root,
        [
            "bash",
            "-c",
            "source /usr/local/share/bash-completion/completions/kata-vfio-ctl"
            " && f=$(complete -p kata-vfio-ctl | sed 's/.* -F \\([^ ]*\\).*/\\1/')"
            " && COMP_WORDS=(kata-vfio-ctl re) COMP_CWORD=1 "
            "COMP_LINE='kata-vfio-ctl re' COMP_POINT=16"
            " && $f kata-vfio-ctl re && printf '%s\\n' \"${COMPREPLY[@]}\"",
        ],
    )
    assert words.returncode == 0, words.stderr
    assert "restore" in words.stdout.split(), words


def test_uninstall_leaves_the_fresh_node_as_it_was(node: tuple[Path, set[str]]) -> None:
    root, before = node
    installed = listing(root) - before
    assert "usr/local/bin/kata-vfio-ctl" in installed
    done = in_root(root, ["make", "-C", SOURCE, "uninstall"])
    assert done.returncode == 0, done.stdout + done.stderr
    after = listing(root)
    assert after - before == set(), "left behind by make uninstall"
    assert before - after == set(), "removed by make uninstall, and not ours"


def test_a_mount_namespace_entered_in_the_root_has_the_roots_files(
    node: tuple[Path, set[str]],
) -> None:
    """As on a machine, a command that enters another process's mount namespace (nsenter -m,
    as the hook's tests and engines do) sees the node's / there, not the host's."""
    root, _ = node
    (root / "tmp/only-on-this-node").write_text("")
    script = (
        "unshare -m --propagation private sleep 60 & sleep 1; "
        "nsenter -t $! -m ls -d /tmp/only-on-this-node; ok=$?; kill $!; exit $ok"
    )
    seen = in_root(root, ["sh", "-c", script])
    assert seen.returncode == 0 and seen.stdout.strip() == "/tmp/only-on-this-node", (
        seen.stdout + seen.stderr
    )
