"""One home for every default and bound the host and the guest agree on.

Imported by the passthrough path, the create path, the host tools and the guest
hook: constants, and the one check of a container id every entry point applies; standard
library only.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: `typing` costs ~2 ms on every verb
if TYPE_CHECKING:
    from typing import TypeGuard

# --- host: kata-vfio's own configuration -------------------------------------------------
CONFIG_ENV = "KATA_VFIO_CONFIG"
DEFAULT_CONFIG = "/etc/kata-vfio/config.toml"
DEFAULT_RUNTIME = "kata-runtime"
DEFAULT_SHIM = "containerd-shim-kata-v2"
SHIM_WRAPPER = "containerd-shim-kata-vfio-v2"
DEFAULT_STATE_DIR = "/var/lib/kata-vfio"
DEFAULT_LOG_FILE = "/var/log/kata-vfio.log"
DEFAULT_GUEST_HOOK_PATH = "/usr/share/oci/hooks"
DEFAULT_SYSFS = "/sys"
SETTINGS_CACHE_DIR = "/run/kata-vfio/settings-cache"
DEBUG_ENV = "KATA_VFIO_DEBUG"

# --- what the host tells the guest ---------------------------------------------------------
# The device manifest's annotation key. Here, not only in kata_vfio.manifest, because the
# guest hook looks for it on every container and must not import the manifest's parser
# (nor pathlib, typing) for the many containers that have none.
MANIFEST_ANNOTATION = "io.kata-vfio.manifest"

# --- guest hook timing -------------------------------------------------------------------
# kata-agent kills a prestart hook after 10 s. The hook keeps a whole budget below that:
# at most HOTPLUG_TIMEOUT_MAX waiting for late hot-plugged devices, then GROUP_WAIT for
# /dev/vfio/<N> after the rebind, and never more than HOOK_DEADLINE in all.
HOOK_KILL_AFTER = 10.0
HOOK_DEADLINE = 8.5
HOTPLUG_TIMEOUT_DEFAULT = 5.0
HOTPLUG_TIMEOUT_MAX = 6.0
GROUP_WAIT = 1.5

# --- guest hook state ----------------------------------------------------------------------
# Which container holds which guest device (identical devices in one pod): on the guest's
# /run tmpfs, so a guest reboot forgets it with the containers.
GUEST_CLAIMS_DIR = "/run/kata-vfio/claims"

# --- limits on untrusted input -----------------------------------------------------------
MAX_CONFIG_JSON_BYTES = 16 << 20  # an OCI config.json is kilobytes; refuse anything absurd
MAX_STATE_FILE_BYTES = 4 << 20

# --- container ids -----------------------------------------------------------------------
# kata-vfio create and delete, the shim's start and delete, the guest hook and the ledger
# take the same ids. An id names a file (the ledger's marker, a plugin record), so it is a
# plain name: letters, digits, `_ . -`, not starting with `.`; engines use 64 hex digits or
# simple names (containerd allows 76). At most 200: a file name has at most 255 bytes, and
# an atomic write's temp file adds ~30 to the id.
ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
MAX_ID_LENGTH = 200
ID_HINT = "use a plain container id (1 to 200 letters, digits, _ . -, not starting with .)"


def plain_container_id(text: object) -> TypeGuard[str]:
    """Could this container id name a file? (`.`, `..`, paths, empty: never.)"""
    return (
        isinstance(text, str)
        and 0 < len(text) <= MAX_ID_LENGTH
        and set(text) <= ID_CHARS
        and not text.startswith(".")
    )


def id_problem(text: object) -> str:
    """What is wrong with an id `plain_container_id` refused, in the words every entry
    point uses (each may first say where the id came from)."""
    return f"no usable container id ({text!r})"


# --- annotations a container may set (the wrapper's own live in kata_vfio.manifest) -----
SELECT_ANNOTATION = "io.kata-vfio.select"
VF_CONFIG_ANNOTATION = "io.kata-vfio.vf-config"
