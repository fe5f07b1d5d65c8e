"""What both wrappers, `kata-vfio` (an OCI runtime) and `containerd-shim-kata-vfio-v2`
(a containerd shim v2), do before they exec the real program, in one place.

Each is described by a `Wrapper`: its name, the config.toml key naming the real program
(``runtime`` / ``shim``) and its default, and how that name is resolved to a path. Both then
1. on every call find the real program and the state directory as cheaply as possible
   (`passthrough`: the settings cache while config.toml is unchanged);
2. on the call that starts a container (``create``/``run``; the shim's ``start``) claim and
   edit the bundle for VFIO (`prepare`, then lifecycle.prepare_bundle);
3. on ``delete`` of a container that holds devices, run the real delete and give the
   devices back (each wrapper's own `delete_and_release`: their answers differ);
4. hand the process over with the very same argv, stdin and fds (handover.hand_over).
Standard library only on the passthrough path.
"""

from __future__ import annotations

import os

from kata_vfio.boundary import step
from kata_vfio.defaults import DEFAULT_CONFIG, DEFAULT_STATE_DIR, plain_container_id
from kata_vfio_host.cache import config_path, read_cache

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `typing` costs ~2 ms on every verb
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

BUILT_IN = "the built-in default"  # where the real program's name came from without a file


class Wrapper:
    """What tells the two wrappers apart."""

    __slots__ = ("cache_index", "default", "name", "resolve", "setting")

    def __init__(
        self,
        name: str,
        setting: str,
        default: str,
        cache_index: int,
        resolve: Callable[[str, str], str],
    ) -> None:
        self.name = name  # the program's name, in front of its error lines
        self.setting = setting  # config.toml's key (and Settings' field) for the real one
        self.default = default
        self.cache_index = cache_index  # its place in read_cache's answer
        self.resolve = resolve  # (name, where the name came from) -> path, or ConfigError


def passthrough(wrapper: Wrapper) -> tuple[str, str]:
    """(the real program's path, the state directory): from the settings cache when
    config.toml has not changed, else a full load (which refills it)."""
    path = config_path()
    cached = read_cache(path)
    source = path
    if cached is not None:
        inner, state_dir = cached[wrapper.cache_index], cached[1]
    elif path == DEFAULT_CONFIG and not os.path.exists(path):
        inner, state_dir, source = wrapper.default, DEFAULT_STATE_DIR, BUILT_IN
    else:
        from kata_vfio_host.settings import load_settings

        settings = load_settings(path)
        inner, state_dir = getattr(settings, wrapper.setting), settings.state_dir
    return wrapper.resolve(inner, source), state_dir


def holds_devices(container_id: str | None, state_dir: str) -> bool:
    """Does a container's delete have devices to give back? (Its ledger marker exists.)"""
    return plain_container_id(container_id) and os.path.exists(
        f"{state_dir}/containers/{container_id}"
    )


def prepare(
    wrapper: Wrapper, container_id: str | None, bundle: str | None, **log_fields: Any
) -> str:
    """Claim and edit the bundle (the working directory when None) for VFIO; returns the
    real program's path. On any failure nothing stays bound or claimed."""
    from kata_vfio.jsonlog import wrapper_log
    from kata_vfio_host.settings import load_settings
    from kata_vfio_runtime import lifecycle

    with step("loading the configuration"):
        settings = load_settings()
        inner = wrapper.resolve(getattr(settings, wrapper.setting), config_path())
    log = wrapper_log(settings.log_file, container_id=container_id, **log_fields)
    lifecycle.prepare_bundle(
        container_id,
        os.path.abspath(bundle) if bundle else os.getcwd(),
        settings,
        lifecycle.host_of(settings),
        log.bind(**{wrapper.setting: inner}),
    )
    return inner
