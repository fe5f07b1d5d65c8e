"""The `kubelet` marker's fixture: one private node (kubelet + containerd CRI) a module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from fakesys import engine_host
from k8s.build import BuildError, ensure_built, ensure_containerd
from k8s.node import KubeletNode, require_tools, running_node
from wrapper_run import installed


def _node(tmp_path_factory: pytest.TempPathFactory, containerd2: bool) -> Iterator[KubeletNode]:
    if os.geteuid() != 0:
        pytest.skip("needs root (containerd, runc, the kubelet)")
    missing = require_tools()
    if missing:
        pytest.skip(missing)
    try:
        bins = ensure_built(install_go=True, log=True)
        containerd_bins = ensure_containerd(install_go=True, log=True) if containerd2 else None
    except BuildError as e:
        pytest.fail(f"no kubelet or containerd: {e}")
    top = tmp_path_factory.mktemp("kubelet-cdi" if containerd2 else "kubelet")
    fs = engine_host(top / "sys")
    with running_node(
        top,
        fs,
        bins,
        installed("containerd-shim-kata-vfio-v2"),
        installed("kata-vfio-ctl"),
        containerd_bins,
    ) as node:
        yield node


@pytest.fixture(scope="module")
def cdi_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletNode]:
    """As `kubelet_node`, on containerd 2 (built from Go modules, build.py --containerd)
    with CDI on, its spec directory `node.cdi_dir` private."""
    yield from _node(tmp_path_factory, True)


@pytest.fixture(scope="module")
def kubelet_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletNode]:
    """A standalone kubelet on a private containerd whose default runtime is kata-vfio's
    shim wrapper (runc's shim inside); the host PCI view is `engine_host`'s fake sysfs
    (group 12: 0000:03:00.0, group 13: 0000:04:00.0 and .1, all on vfio-pci)."""
    yield from _node(tmp_path_factory, False)
