"""`containerd-shim-kata-vfio-v2`: the same VFIO edit for containerd and CRI-O.

containerd maps runtime ``io.containerd.kata-vfio.v2`` to this binary and runs
``<shim> -namespace NS -address A -publish-binary B -id ID [-debug] start`` with
the bundle as working directory (config.json already written); CRI-O does the
same for ``runtime_type = "vm"``. On ``start`` the bundle is claimed and edited
exactly as ``kata-vfio create`` does, then the inner shim (config.toml ``shim``,
default ``containerd-shim-kata-v2``) is exec'd with the very same argv, stdin and
fds. ``start`` must print nothing on success: containerd reads its combined
output as the shim's address. Every other action (``delete``, ``-v``, ``-info``,
the ttrpc server mode) goes to the inner shim unchanged; ``delete`` (containerd's
clean-up after a shim died) also gives the container's devices back once the
inner shim's delete succeeded.

How ownership ends: containerd normally deletes a task over ttrpc, straight to
the running shim server, never through this wrapper. The ledger therefore takes
an owner as gone when its bundle directory is gone (containerd and CRI-O remove
it with the container) or the boot changed; every later create for the same
devices, the shim ``delete`` action and ``kata-vfio-ctl restore --stale`` act on it.

Standard library only on the passthrough path, like `kata-vfio`.
"""

from __future__ import annotations

import os
import sys

from kata_vfio.defaults import (
    DEFAULT_SHIM,
    SHIM_WRAPPER,
)
from kata_vfio.errors import ConfigError
from kata_vfio.value import Value
from kata_vfio_host.cache import config_path, which
from kata_vfio_runtime.handover import hand_over
from kata_vfio_runtime.wrapping import Wrapper, holds_devices, passthrough, prepare

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kata_vfio.types import ExecFn

PROG = SHIM_WRAPPER
# Go flag-package flags of containerd's shim command line that take a value
VALUE_FLAGS = frozenset(
    {"namespace", "address", "publish-binary", "id", "bundle", "socket", "debug-address"}
)


# containerd's shim flag set has a boolean -v ("show the shim version and exit"); Go's
# flag package takes -v, --v and -v=true alike. -version is ours (operators type it).
VERSION_FLAGS = frozenset({"v", "version"})


class ShimCall(Value):
    action: str | None
    container_id: str | None
    namespace: str | None
    bundle: str | None
    version: bool = False


def parse_shim_args(argv: list[str]) -> ShimCall:
    """Go's flag rules: -flag or --flag, `-flag=value` or `-flag value` for value flags;
    parsing stops at the first argument that is not a flag: the action."""
    values: dict[str, str] = {}
    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "--" or not token.startswith("-") or token == "-":
            break
        name, eq, value = token.lstrip("-").partition("=")
        if not eq and name in VALUE_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        values[name] = value
        i += 1
    if i < len(argv) and argv[i] == "--":
        i += 1
    action = argv[i] if i < len(argv) else None
    version = any(
        values.get(f, "false") not in ("false", "0", "f", "F", "FALSE", "False")
        for f in VERSION_FLAGS
    )
    return ShimCall(
        action, values.get("id"), values.get("namespace"), values.get("bundle"), version
    )


def inner_shim(name: str, source: str, me: str) -> str:
    """The inner shim's path; never this wrapper itself (that would exec forever)."""
    found = which(name)
    if found is None:
        raise ConfigError(
            f"inner shim {name!r} not found (from {source})",
            f'install it, or set shim = "/path/to/shim" in {config_path()}',
        )
    mine = which(me) if "/" not in me else me
    if os.path.basename(found) == SHIM_WRAPPER or (
        mine is not None and os.path.realpath(found) == os.path.realpath(mine)
    ):
        raise ConfigError(
            f"inner shim {found} is {SHIM_WRAPPER} itself (from {source})",
            f'set shim = "{DEFAULT_SHIM}" (or another real shim) in {config_path()}',
        )
    return found


def shim_wrapper(me: str) -> Wrapper:
    """This wrapper's description; `me` (argv[0]) is what the inner shim must not be."""
    return Wrapper(PROG, "shim", DEFAULT_SHIM, 2, lambda name, source: inner_shim(name, source, me))


def delete_and_release(shim: str, argv: list[str], call: ShimCall) -> int:
    """The shim's clean-up action: the inner shim's delete first (its stdout, a protobuf
    answer, goes straight to containerd), then the devices go back if it succeeded; a
    device that could not be given back makes the action fail (exit 1, one line)."""
    from kata_vfio.run import run
    from kata_vfio_host.settings import load_settings
    from kata_vfio_runtime import lifecycle

    code = run(
        [shim, *argv[1:]], what="the inner shim's delete", capture=False, timeout=None, check=False
    ).returncode
    if code != 0:
        return code
    settings = load_settings()
    failed = lifecycle.release_after_delete(
        call.container_id or "", settings, lifecycle.host_of(settings)
    )
    if failed:
        # containerd reads the answer from stdout and shows stderr with a non-zero exit
        print(
            f"{PROG}: delete {call.container_id}: could not give back {'; '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return code


def decide(argv: list[str], call: ShimCall) -> str | int:
    me = argv[0]
    if call.version:
        # containerd's shape (name, then an indented Version line); the inner shim's
        # own -v answer follows
        from kata_vfio.version import package_version

        print(f"{PROG}:\n  Version: {package_version()}", flush=True)
        return passthrough(shim_wrapper(me))[0]
    if call.action == "start":
        from kata_vfio_runtime.scan import needs_edit

        if needs_edit(call.bundle or "."):
            return prepare(
                shim_wrapper(me),
                call.container_id,
                call.bundle,
                verb="shim start",
                namespace=call.namespace,
            )
    shim, state_dir = passthrough(shim_wrapper(me))
    if call.action == "delete" and holds_devices(call.container_id, state_dir):
        return delete_and_release(shim, argv, call)
    return shim


def main(argv: list[str] | None = None, exec_fn: ExecFn | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    call = parse_shim_args(argv)
    if call.version:  # the inner shim is asked in its own words: Go shims know no -version
        return hand_over(PROG, [argv[0], "-v"], lambda: decide(argv, call), exec_fn)
    return hand_over(PROG, argv, lambda: decide(argv, call), exec_fn)


if __name__ == "__main__":
    sys.exit(main())
