"""The `kubelet` marker's fixture: one private node (kubelet + containerd CRI) a module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fakesys import engine_host
from k8s.build import BuildError, ensure_built
from k8s.node import KubeletNode, require_tools, running_node
from wrapper_run import installed


@pytest.fixture(scope="module")
def kubelet_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletNode]:
    """A standalone kubelet on a private containerd whose default runtime is kata-vfio's
    shim wrapper (runc's shim inside); the host PCI view is `engine_host`'s fake sysfs
    (group 12: 0000:03:00.0, group 13: 0000:04:00.0 and .1, all on vfio-pci)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (containerd, runc, the kubelet)")
    missing = require_tools()
    if missing:
        pytest.skip(missing)
    try:
        bins = ensure_built(install_go=True, log=True)
    except BuildError as e:
        pytest.fail(f"no kubelet: {e}")
    top = tmp_path_factory.mktemp("kubelet")
    fs = engine_host(top / "sys")
    with running_node(top, fs, bins, installed("containerd-shim-kata-vfio-v2"),
                      installed("kata-vfio-ctl")) as node:
        yield node
