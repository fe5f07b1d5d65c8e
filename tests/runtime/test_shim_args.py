"""The shim wrapper's reading of its command line, as containerd and CRI-O send it: Go's
flag package rules (`-flag value`, `-flag=value`, `--flag`, booleans alone or `=true`),
parsing stopping at the action. Until now covered only through a real containerd."""

from __future__ import annotations

import pytest

from kata_vfio_runtime.shim import parse_shim_args

SHIM = "containerd-shim-kata-vfio-v2"
CONTAINERD = [
    "-namespace",
    "k8s.io",
    "-address",
    "/run/containerd/containerd.sock",
    "-publish-binary",
    "/usr/bin/containerd",
]
# (argv after the program name) -> (action, id, namespace, bundle, version)
CASES = [
    # containerd 1.7/2.x's start, and its clean-up delete (shim v2's manager)
    ([*CONTAINERD, "-id", "abc", "start"], ("start", "abc", "k8s.io", None, False)),
    (
        [*CONTAINERD, "-id", "abc", "-bundle", "/run/b", "delete"],
        ("delete", "abc", "k8s.io", "/run/b", False),
    ),
    # -debug, a boolean, before the action (containerd with debug logging)
    ([*CONTAINERD, "-id", "abc", "-debug", "start"], ("start", "abc", "k8s.io", None, False)),
    (["-debug", "-namespace", "ns", "-id", "x", "start"], ("start", "x", "ns", None, False)),
    (["-debug=true", "-id", "x", "start"], ("start", "x", None, None, False)),
    # -flag=value and --flag, in any mix
    (["-namespace=ns", "--id=x", "--bundle", "/b", "start"], ("start", "x", "ns", "/b", False)),
    (["--namespace", "ns", "-id", "x", "start"], ("start", "x", "ns", None, False)),
    (["-id=a=b", "start"], ("start", "a=b", None, None, False)),  # split at the first =
    # value flags that take the next argument even when it looks like a flag (Go does)
    (["-id", "-debug", "start"], ("start", "-debug", None, None, False)),
    (
        ["-socket", "/s", "-debug-address", "/d", "-id", "x", "start"],
        ("start", "x", None, None, False),
    ),
    # the ttrpc server mode: no action at all
    ([*CONTAINERD, "-id", "abc"], (None, "abc", "k8s.io", None, False)),
    ([], (None, None, None, None, False)),
    # `--` ends the flags; a lone `-` is an argument
    (["-id", "x", "--", "start"], ("start", "x", None, None, False)),
    (["-id", "x", "-", "start"], ("-", "x", None, None, False)),
    # flags after the action are the action's, not ours
    (["-id", "x", "start", "-id", "y"], ("start", "x", None, None, False)),
    # a value flag last, with nothing after it: empty (Go would refuse the line)
    (["start", "-id"], ("start", None, None, None, False)),
    (["-id"], (None, "", None, None, False)),
    # an unknown flag is taken as a boolean (containerd passes none; Go would refuse it)
    (["-unknown", "-id", "x", "start"], ("start", "x", None, None, False)),
    (["-unknown", "value", "-id", "x", "start"], ("value", None, None, None, False)),
    # the version flag: -v, --v, -v=true, -version; false, 0 and f are no
    (["-v"], (None, None, None, None, True)),
    (["--v"], (None, None, None, None, True)),
    (["-v=true"], (None, None, None, None, True)),
    (["-version"], (None, None, None, None, True)),
    (["-id", "x", "-v", "start"], ("start", "x", None, None, True)),
    (["-v=false", "-id", "x", "start"], ("start", "x", None, None, False)),
    (["-v=0"], (None, None, None, None, False)),
    (["-v=f"], (None, None, None, None, False)),
    (["-v=FALSE"], (None, None, None, None, False)),
]


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_shim_command_lines(argv: list[str], expected: tuple[object, ...]) -> None:
    call = parse_shim_args([SHIM, *argv])
    assert (call.action, call.container_id, call.namespace, call.bundle, call.version) == expected
