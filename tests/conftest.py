from __future__ import annotations

import os
from pathlib import Path

import pytest

from fakesys import FakeKernel, FakeSysfs
from hookguest import clock, guest  # noqa: F401  (the guest hook tests' fake guest and clock)
from k8s.fixtures import cdi_node, kubelet_node  # noqa: F401  (the `kubelet` tests' nodes)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "dracut: runs the system's dracut on a scratch module directory (slow)"
    )


@pytest.fixture
def fakesys(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


@pytest.fixture
def kernel(fakesys: FakeSysfs) -> FakeKernel:
    fakesys.add_driver("vfio-pci")
    return FakeKernel(fakesys)


@pytest.fixture
def vfio_host(fakesys: FakeSysfs) -> FakeSysfs:
    """A host as an admin leaves it after `kata-vfio-ctl bind`: some groups on vfio-pci."""
    from fakesys import BRIDGE, IGBVF, NVME

    fakesys.add_device("0000:03:00.0", group=12, driver="vfio-pci")
    fakesys.add_vfio_group(12, minor=0)
    # a conventional PCI bridge with two NICs behind it: one group, bridge included
    fakesys.add_device("0000:00:1e.0", BRIDGE, group=13, driver=None)
    fakesys.add_device("0000:04:00.0", group=13, driver="vfio-pci")
    fakesys.add_device("0000:04:01.0", group=13, driver=None)
    fakesys.add_vfio_group(13, minor=1)
    fakesys.add_device("0000:05:00.0", NVME, group=14, driver="nvme")
    fakesys.add_device("0000:07:00.0", driver="e1000e")  # no IOMMU group
    # an SR-IOV PF on its host driver and one of its VFs on vfio-pci
    fakesys.add_device("0000:06:00.0", group=20, driver="igb", net=("kvfiotest0",))
    fakesys.add_device("0000:06:10.0", IGBVF, group=21, driver="vfio-pci")
    fakesys.add_vf("0000:06:00.0", "0000:06:10.0", 0)
    fakesys.add_vfio_group(21, minor=2)
    return fakesys


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """An OCI bundle with the config.json `runc spec` writes."""
    import subprocess

    b = tmp_path / "bundle"
    (b / "rootfs").mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(b)], check=True)
    return b


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI (KATA_VFIO_NO_SKIPS=1, set by .ci/run) a skip is a failure: a skipped podman,
    VM, containerd, dracut or Kata test there means a missing install step, not a pass."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("KATA_VFIO_NO_SKIPS") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (KATA_VFIO_NO_SKIPS=1): {reason}"
