"""Command lines as podman/conmon, CRI-O and Kata 1.x really send them."""

from __future__ import annotations

import pytest

from kata_vfio_runtime.args import parse

ROOT = ["--root", "/run/runc"]
CASES = [
    # conmon (podman 4.x), with runtime_supports_json
    (
        [
            "kata-vfio",
            "--log=/b/ctr.log",
            "--log-format=json",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/pidfile",
            "--no-new-keyring",
            "abc123",
        ],
        ("create", "/b/ctr.log", "json", "/b", "abc123"),
    ),
    (
        [
            "kata-vfio",
            *ROOT,
            "--log",
            "/l",
            "--log-format",
            "text",
            "create",
            "--bundle=/b2",
            "--pid-file=/p",
            "--console-socket",
            "/s.sock",
            "--preserve-fds",
            "2",
            "--no-pivot",
            "cid",
        ],
        ("create", "/l", "text", "/b2", "cid"),
    ),
    (["kata-vfio", "create", "-b", "/b3", "id3"], ("create", None, None, "/b3", "id3")),
    (
        ["kata-vfio", "--rootless", "true", "create", "-b=/b4", "id4"],
        ("create", None, None, "/b4", "id4"),
    ),
    (["kata-vfio", "--rootless", "create", "id5"], ("create", None, None, None, "id5")),
    (
        [
            "kata-vfio",
            "--kata-config",
            "/etc/kata/c.toml",
            "--debug",
            "run",
            "--detach",
            "-b",
            "/b6",
            "id6",
        ],
        ("run", None, None, "/b6", "id6"),
    ),
    (
        ["kata-vfio", "--cgroup-manager", "systemd", "create", "--bundle", "/b7", "id7"],
        ("create", None, None, "/b7", "id7"),
    ),
    # passthrough verbs
    (["kata-vfio", *ROOT, "start", "abc"], ("start", None, None, None, None)),
    (["kata-vfio", *ROOT, "state", "abc"], ("state", None, None, None, None)),
    (["kata-vfio", *ROOT, "kill", "abc", "15"], ("kill", None, None, None, None)),
    (["kata-vfio", *ROOT, "kill", "--all", "abc", "9"], ("kill", None, None, None, None)),
    (["kata-vfio", *ROOT, "delete", "--force", "abc"], ("delete", None, None, None, "abc")),
    (
        ["kata-vfio", "exec", "--pid-file", "/p", "--process", "/f", "--detach", "abc"],
        ("exec", None, None, None, None),
    ),
    (["kata-vfio", "update", "--resources", "-", "abc"], ("update", None, None, None, None)),
    (["kata-vfio", "--version"], (None, None, None, None, None)),
    (["kata-vfio", "features"], ("features", None, None, None, None)),
    (
        ["kata-vfio", "--log", "/l", "--log-format", "json", "ps", "--format", "json", "x"],
        ("ps", "/l", "json", None, None),
    ),
]


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_invocation_is_read_from_real_command_lines(
    argv: list[str], expected: tuple[str | None, ...]
) -> None:
    inv = parse(argv)
    assert (inv.verb, inv.log_path, inv.log_format, inv.bundle, inv.container_id) == expected
