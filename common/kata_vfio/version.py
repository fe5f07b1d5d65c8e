"""kata-vfio's version, read from the installed package's metadata (pyproject's
``version``, in ``kata_vfio-<version>.dist-info/METADATA``): one source for
``--version`` of every command. With ``os`` only, not importlib.metadata (pathlib,
re, email: ~15 ms): containerd and podman ask the wrappers for their version."""

from __future__ import annotations

import os
import sys

DISTRIBUTION = "kata_vfio"  # the normalized name dist-info directories carry
NOT_INSTALLED = "unknown (a source tree that is not installed: pip install .)"


def package_version() -> str:
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not (name.startswith(DISTRIBUTION + "-") and name.endswith(".dist-info")):
                continue
            try:
                with open(os.path.join(entry, name, "METADATA"), encoding="utf-8") as f:
                    for line in f:
                        if line.startswith("Version:"):
                            return line.partition(":")[2].strip()
                        if not line.strip():  # the headers end here
                            break
            except OSError:
                continue
    return NOT_INSTALLED
