"""`kata-vfio-ctl device-plugin` against real gRPC peers on Unix sockets: a kubelet
Registration server and a pod-resources server written here, and the plugin's own
DevicePlugin service called as the kubelet calls it, on a fake sysfs with a fake kernel."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kata_vfio.errors import ConfigError, DeviceError
from kata_vfio.pci import IommuGroup
from kata_vfio_ctl import devplugin, plugin_ledger
from kata_vfio_ctl.kubeapi import (
    deviceplugin_pb2,
    deviceplugin_pb2_grpc,
    podresources_pb2,
    podresources_pb2_grpc,
)
from kata_vfio_ctl.main import main as ctl_main
from kata_vfio_ctl.plugin_devices import resources_from_settings
from kata_vfio_host.bindings import acquire
from kata_vfio_host.giveback import release_container
from kata_vfio_host.ledger import ContainerId, Host, read_journal_file
from kata_vfio_host.owners import owner_of
from kata_vfio_host.settings import load_settings
from plugin_peers import Kubelet, PodResources

from fakesys import E1000E, NVME, FakeKernel, FakeSysfs

pb: Any = deviceplugin_pb2
rpc: Any = deviceplugin_pb2_grpc
pr: Any = podresources_pb2
pr_rpc: Any = podresources_pb2_grpc

PF1, PF2 = "0000:00:04.0", "0000:00:06.0"
PF1_VFS = [f"0000:00:04.{i}" for i in range(1, 5)]  # groups 10..13, NUMA node 0
PF2_VFS = [f"0000:00:06.{i}" for i in range(1, 4)]  # groups 20..22, NUMA node 1
CONFIG = """
[[device_plugin.resource]]
name = "nvme"
select = "1b36:0010"
cdi = true
"""


def build_host(fs: FakeSysfs) -> None:
    fs.add_device(PF1, NVME, group=4, driver="nvme")
    for i, vf in enumerate(PF1_VFS):
        fs.add_device(vf, NVME, group=10 + i)
        fs.add_vf(PF1, vf, i)
        (fs.dev_dir(vf) / "numa_node").write_text("0\n")
    fs.add_device(PF2, NVME, group=6, driver="nvme")
    for i, vf in enumerate(PF2_VFS):
        fs.add_device(vf, NVME, group=20 + i)
        fs.add_vf(PF2, vf, i)
        (fs.dev_dir(vf) / "numa_node").write_text("1\n")
    # an NVMe function that shares its group with a NIC: not offered
    fs.add_device("0000:00:05.0", NVME, group=30)
    fs.add_device("0000:00:05.1", E1000E, group=30, driver="e1000e")


class Run:
    """A plugin in a thread, with its kubelet, pod-resources server and logs."""

    def __init__(
        self,
        tmp_path: Path,
        fs: FakeSysfs,
        kernel: FakeKernel,
        config: str = CONFIG,
        grace: float = 3600.0,
    ) -> None:
        self.tmp_path = tmp_path
        self.fs = fs
        self.kubelet = Kubelet(tmp_path / "device-plugins")
        self.kubelet.start()
        self.pod_resources = PodResources(tmp_path / "pod-resources.sock")
        cfg = tmp_path / "config.toml"
        cfg.write_text(config)
        self.settings = load_settings(str(cfg))
        self.options = devplugin.Options(
            sysfs=str(fs.root),
            state_dir=str(tmp_path / "state"),
            kubelet_dir=str(self.kubelet.path.parent),
            pod_resources=str(tmp_path / "pod-resources.sock"),
            cdi_dir=str(tmp_path / "cdi"),
            release_grace=grace,
            write=kernel.write,
            boot_id="b1",
        )
        self.host = Host(fs.root, tmp_path / "state", kernel.write, boot_id="b1")
        self.logs: list[str] = []
        self.plugin: devplugin.Plugin | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> devplugin.Plugin:
        self.plugin = devplugin.Plugin(
            self.options,
            resources_from_settings(self.settings.device_plugin_resources),
            log=self.logs.append,
        )
        before = len(self.kubelet.requests)
        self.thread = threading.Thread(target=self.plugin.run, daemon=True)
        self.thread.start()
        wait_for(lambda: len(self.kubelet.requests) > before, what="registration")
        return self.plugin

    def stop_plugin(self) -> None:
        assert self.plugin is not None and self.thread is not None
        self.plugin.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def stub(self) -> Any:
        path = self.kubelet.path.parent / "kata-vfio-nvme.sock"
        self.channel = grpc.insecure_channel(f"unix://{path}")
        return rpc.DevicePluginStub(self.channel)

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.stop_plugin()
        self.kubelet.stop()
        self.pod_resources.server.stop(grace=0)


def wait_for(check: Any, timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def run(tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel) -> Iterator[Run]:
    build_host(fakesys)
    r = Run(tmp_path, fakesys, kernel)
    yield r
    r.close()


def first_list(stub: Any) -> tuple[dict[str, tuple[str, list[int]]], Any]:
    stream = stub.ListAndWatch(pb.Empty(), timeout=30)
    message = next(stream)
    return {d.ID: (d.health, [n.ID for n in d.topology.nodes]) for d in message.devices}, stream


def allocate(stub: Any, *ids: str) -> Any:
    request = pb.AllocateRequest(
        container_requests=[pb.ContainerAllocateRequest(devices_ids=list(ids))]
    )
    return stub.Allocate(request, timeout=10).container_responses[0]


def test_registers_and_offers_each_whole_matching_group(run: Run) -> None:
    run.start()
    request = run.kubelet.requests[0]
    assert (request.version, request.endpoint, request.resource_name) == (
        "v1beta1",
        "kata-vfio-nvme.sock",
        "kata-vfio.io/nvme",
    )
    assert request.options.get_preferred_allocation_available
    stub = run.stub()
    assert stub.GetDevicePluginOptions(pb.Empty()).get_preferred_allocation_available
    devices, stream = first_list(stub)
    stream.cancel()
    assert devices == {
        **{vf: ("Healthy", [0]) for vf in PF1_VFS},
        **{vf: ("Healthy", [1]) for vf in PF2_VFS},
    }
    # the PFs (their VFs would go with them) and the mixed group are left out, one line each
    assert (
        "IOMMU group 30 not offered as kata-vfio.io/nvme: 0000:00:05.1 [8086:10d3] in "
        "the same group does not match" in run.logs
    )
    assert any(
        line.startswith("IOMMU group 4 not offered") and "virtual functions" in line
        for line in run.logs
    )


def test_allocate_binds_through_the_ledger_and_answers_nodes_env_and_cdi(
    run: Run, fakesys: FakeSysfs
) -> None:
    run.start()
    stub = run.stub()
    reply = allocate(stub, PF1_VFS[1], PF1_VFS[0])
    assert [(d.container_path, d.host_path, d.permissions) for d in reply.devices] == [
        ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"),
        ("/dev/vfio/10", "/dev/vfio/10", "rw"),
        ("/dev/vfio/11", "/dev/vfio/11", "rw"),
    ]
    both = f"{PF1_VFS[0]},{PF1_VFS[1]}"
    assert dict(reply.envs) == {"PCIDEVICE_KATA_VFIO_IO_NVME": both}
    assert dict(reply.annotations) == {"io.kata-vfio.resource.nvme": both}
    assert [c.name for c in reply.cdi_devices] == [
        f"kata-vfio.io/nvme={PF1_VFS[0]}",
        f"kata-vfio.io/nvme={PF1_VFS[1]}",
    ]
    assert fakesys.driver(PF1_VFS[0]) == fakesys.driver(PF1_VFS[1]) == "vfio-pci"
    owner = "container kubernetes-allocation-0000-00-04.1"
    assert owner_of(run.host, IommuGroup(10)) == owner == owner_of(run.host, IommuGroup(11))
    # the CDI spec names the bound groups by the unit IDs the kubelet passes on
    spec = json.loads((run.tmp_path / "cdi/kata-vfio.io-nvme.json").read_text())
    assert spec["cdiVersion"] == "0.5.0" and spec["kind"] == "kata-vfio.io/nvme"
    assert {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]} == {
        PF1_VFS[0]: [{"path": "/dev/vfio/10", "type": "c", "major": 243, "minor": 10}],
        PF1_VFS[1]: [{"path": "/dev/vfio/11", "type": "c", "major": 243, "minor": 11}],
    }
    assert spec["containerEdits"]["deviceNodes"] == [
        {"path": "/dev/vfio/vfio", "type": "c", "major": 10, "minor": 196}
    ]


def test_a_group_a_container_holds_is_refused_and_nothing_is_claimed(
    run: Run, fakesys: FakeSysfs
) -> None:
    run.start()
    acquire(run.host, ContainerId.parse("podman-one"), [IommuGroup(12)], [], (), None)
    stub = run.stub()
    with pytest.raises(grpc.RpcError) as err:
        allocate(stub, PF1_VFS[2])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "IOMMU group 12 is in use by container podman-one" in err.value.details()
    # a pod asking for two, one held: neither is claimed nor bound
    with pytest.raises(grpc.RpcError):
        allocate(stub, PF1_VFS[3], PF1_VFS[2])
    assert owner_of(run.host, IommuGroup(13)) is None and fakesys.driver(PF1_VFS[3]) is None
    assert plugin_ledger.allocations(run.host) == {}


def test_list_and_watch_follows_the_host_by_itself(run: Run, fakesys: FakeSysfs) -> None:
    run.start()
    devices, stream = first_list(run.stub())
    assert devices[PF1_VFS[0]][0] == "Healthy"

    def next_change(what: str) -> dict[str, str]:
        started = time.monotonic()
        message = next(stream)
        # from the poll loop (0.25 s), not a later request; the 1 s target is make bench's
        assert time.monotonic() - started < 5.0, what
        return {d.ID: d.health for d in message.devices}

    # held by a container that is not a pod's: Unhealthy
    acquire(run.host, ContainerId.parse("podman-one"), [IommuGroup(20)], [], (), None)
    assert next_change("claim")[PF2_VFS[0]] == "Unhealthy"
    release_container(run.host, "podman-one")
    assert next_change("release")[PF2_VFS[0]] == "Healthy"
    # gone: unplugged VF
    fakesys.remove_device(PF1_VFS[3])
    health = next_change("unplug")
    assert health[PF1_VFS[3]] == "Unhealthy"
    # a NIC appears in a VF's group: the group no longer matches as a whole
    fakesys.add_device("0000:00:07.0", E1000E, group=21, driver="e1000e")
    health = next_change("mixed group")
    assert health[PF2_VFS[1]] == "Unhealthy" and health[PF2_VFS[0]] == "Healthy"
    assert any(line.startswith("IOMMU group 21 not offered") for line in run.logs)
    stream.cancel()


def test_preferred_allocation_keeps_must_include_and_one_pf(run: Run) -> None:
    run.start()
    stub = run.stub()

    def prefer(available: list[str], must: list[str], size: int) -> list[str]:
        request = pb.PreferredAllocationRequest(
            container_requests=[
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
                )
            ]
        )
        reply = stub.GetPreferredAllocation(request, timeout=5)
        return list(reply.container_responses[0].deviceIDs)

    everything = PF2_VFS + PF1_VFS
    assert prefer(everything, [], 3) == PF1_VFS[:3]  # the PF with the most free VFs
    assert prefer(everything, [PF2_VFS[2]], 3) == [PF2_VFS[2], PF2_VFS[0], PF2_VFS[1]]
    assert prefer(everything, [PF2_VFS[1]], 4) == [PF2_VFS[1], PF2_VFS[0], PF2_VFS[2], PF1_VFS[0]]


def test_an_allocation_whose_pod_is_gone_is_released(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel
) -> None:
    build_host(fakesys)
    r = Run(tmp_path, fakesys, kernel, grace=0.0)
    try:
        plugin = r.start()
        stub = r.stub()
        allocate(stub, PF1_VFS[0])
        allocate(stub, PF1_VFS[1])
        allocate(stub, PF1_VFS[2])
        # VF 1: the kubelet lists its pod; VF 2: the pod's container took it over and runs
        r.pod_resources.listed = [("kata-vfio.io/nvme", PF1_VFS[1])]
        acquire(r.host, ContainerId.parse("app"), [IommuGroup(12)], [], (), None)
        assert plugin.release_gone() == ["kubernetes-allocation-0000-00-04.1"]
        assert fakesys.driver(PF1_VFS[0]) is None  # back to no driver, as before
        assert owner_of(r.host, IommuGroup(10)) is None
        assert owner_of(r.host, IommuGroup(11)) == "container kubernetes-allocation-0000-00-04.2"
        assert fakesys.driver(PF1_VFS[2]) == "vfio-pci"
        # the container ends (the shim's delete): its devices stay bound for the pod's
        # allocation until the pod is gone from the kubelet's list as well
        release_container(r.host, "app")
        assert fakesys.driver(PF1_VFS[2]) == "vfio-pci"
        assert plugin.release_gone() == ["kubernetes-allocation-0000-00-04.3"]
        assert fakesys.driver(PF1_VFS[2]) is None
        r.pod_resources.listed = []
        assert plugin.release_gone() == ["kubernetes-allocation-0000-00-04.2"]
        assert read_journal_file(r.host).devices == {}
        assert plugin_ledger.allocations(r.host) == {}
    finally:
        r.close()


def test_within_the_grace_period_nothing_is_released(run: Run, fakesys: FakeSysfs) -> None:
    plugin = run.start()
    allocate(run.stub(), PF1_VFS[0])
    assert plugin.release_gone() == []  # grace 3600 s: the pod may not have started yet
    assert plugin.release_gone(now=time.time() + 3601) == ["kubernetes-allocation-0000-00-04.1"]
    assert fakesys.driver(PF1_VFS[0]) is None


def test_the_kubelet_handing_a_device_out_again_ends_the_old_allocation(
    run: Run, fakesys: FakeSysfs
) -> None:
    run.start()
    stub = run.stub()
    allocate(stub, PF1_VFS[0], PF1_VFS[1])
    allocate(stub, PF1_VFS[1])  # the kubelet gave VF 2 to a new pod: the old one is gone
    assert owner_of(run.host, IommuGroup(11)) == "container kubernetes-allocation-0000-00-04.2"
    assert owner_of(run.host, IommuGroup(10)) == "container kubernetes-allocation-0000-00-04.1"
    assert {e.owner for a, e in read_journal_file(run.host).devices.items() if a == PF1_VFS[1]} == {
        "container kubernetes-allocation-0000-00-04.2"
    }


def test_re_registers_when_the_kubelet_restarts_and_recovers_after_its_own_restart(
    run: Run, fakesys: FakeSysfs
) -> None:
    run.start()
    allocate(run.stub(), PF1_VFS[0])
    run.channel.close()
    # the kubelet restarts: its socket is new, ours was removed
    run.kubelet.stop()
    run.kubelet.start()
    wait_for(lambda: len(run.kubelet.requests) >= 2, timeout=30, what="a second registration")
    devices, stream = first_list(run.stub())
    stream.cancel()
    assert devices[PF1_VFS[0]][0] == "Healthy"
    # the plugin restarts: the allocation is found in the ledger and still released right
    run.stop_plugin()
    assert not (run.kubelet.path.parent / "kata-vfio-nvme.sock").exists()
    plugin = run.start()
    assert "recovered 1 allocations from the ledger: kubernetes-allocation-0000-00-04.1" in run.logs
    devices, stream = first_list(run.stub())
    stream.cancel()
    assert devices[PF1_VFS[0]][0] == "Healthy"  # its own allocation: no foreign holder
    assert plugin.release_gone(now=time.time() + 7200) == ["kubernetes-allocation-0000-00-04.1"]
    assert fakesys.driver(PF1_VFS[0]) is None


def test_the_pods_container_takes_the_allocation_over(run: Run) -> None:
    run.start()
    allocate(run.stub(), PF1_VFS[0])
    # what the shim's create does with the annotation Allocate gave
    acquire(run.host, ContainerId.parse("app"), [IommuGroup(10)], [], (), None)
    assert owner_of(run.host, IommuGroup(10)) == "container app"
    with pytest.raises(DeviceError, match="in use by container app"):
        acquire(run.host, ContainerId.parse("other"), [IommuGroup(10)], [], (), None)


BAD_CONFIGS = [
    (
        '[[device_plugin.resource]]\nname = "Bad Name"\nselect = "1b36:0010"\n',
        "device_plugin.resource.0.name: 'Bad Name' does not match",
    ),
    (
        '[[device_plugin.resource]]\nname = "nvme"\n',
        "device_plugin.resource[0] (nvme): neither select nor devices says which devices",
    ),
    (
        '[[device_plugin.resource]]\nname = "nvme"\nselect = "1b36:0010*2"\n',
        "select '1b36:0010*2' is not one VENDOR:DEVICE[:CLASS]",
    ),
    (
        '[[device_plugin.resource]]\nname = "nvme"\nselect = "1b36:zz"\n',
        "select '1b36:zz': io.kata-vfio.select: '1b36:zz': 'zz' is not a hex ID",
    ),
    (
        '[[device_plugin.resource]]\nname = "nvme"\ndevices = ["8086:10d3"]\n',
        "devices: '8086:10d3' is not a PCI address glob",
    ),
    (
        '[[device_plugin.resource]]\nname = "a"\nselect = "::0108"\n'
        '[[device_plugin.resource]]\nname = "a"\nselect = "::0200"\n',
        "device_plugin.resource[1] (a): the name is used twice",
    ),
    (
        '[[device_plugin.resource]]\nname = "nvme"\nselect = "1b36:0010"\ncolour = 1\n',
        "Additional properties are not allowed ('colour' was unexpected)",
    ),
    ('runtime = "runc"\n', "config.toml has no [[device_plugin.resource]]"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_a_bad_configuration_exits_with_one_line(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    kubelet_dir = tmp_path / "device-plugins"
    code = ctl_main(
        [
            "device-plugin",
            "--config",
            str(cfg),
            "--kubelet-dir",
            str(kubelet_dir),
            "--sysfs",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not kubelet_dir.exists()  # nothing was started


def test_good_configuration_reads_back(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[[device_plugin.resource]]\nname = "nics"\nselect = "8086:10ca:0200"\n'
        'devices = ["0000:3b:*.*"]\n'
    )
    resources = resources_from_settings(load_settings(str(cfg)).device_plugin_resources)
    assert [(r.resource_name, r.env_name, r.cdi) for r in resources] == [
        ("kata-vfio.io/nics", "PCIDEVICE_KATA_VFIO_IO_NICS", False)
    ]
    with pytest.raises(ConfigError):
        resources_from_settings(())
    assert os.environ.get("KATA_VFIO_CONFIG") != str(cfg)


def test_a_pod_request_is_all_or_nothing_across_its_containers(
    run: Run, fakesys: FakeSysfs
) -> None:
    run.start()
    acquire(run.host, ContainerId.parse("podman-one"), [IommuGroup(21)], [], (), None)
    request = pb.AllocateRequest(
        container_requests=[
            pb.ContainerAllocateRequest(devices_ids=[PF2_VFS[0]]),
            pb.ContainerAllocateRequest(devices_ids=[PF2_VFS[1]]),
        ]
    )  # held by podman-one
    with pytest.raises(grpc.RpcError) as err:
        run.stub().Allocate(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # the first container's allocation went back with the refusal
    assert owner_of(run.host, IommuGroup(20)) is None and fakesys.driver(PF2_VFS[0]) is None
    assert plugin_ledger.allocations(run.host) == {}


def test_the_command_serves_until_sigterm(tmp_path: Path, fakesys: FakeSysfs) -> None:
    """`kata-vfio-ctl device-plugin` as its own process: registers, allocates a group an
    admin bound already (both its functions), and on SIGTERM exits 0 and takes its socket
    away."""
    import signal
    import subprocess
    import sys

    from fakesys import engine_host
    from wrapper_run import SOURCE_PATH

    engine_host(fakesys.root)  # groups 12 (03:00.0) and 13 (04:00.0, 04:00.1) on vfio-pci
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'sysfs = "{fakesys.root}"\nstate_dir = "{tmp_path / "state"}"\n'
        '[[device_plugin.resource]]\nname = "nic"\nselect = "8086:10d3"\n'
    )
    kubelet = Kubelet(tmp_path / "device-plugins")
    kubelet.start()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from kata_vfio_ctl.main import main; sys.exit(main())",
            "device-plugin",
            "--config",
            str(cfg),
            "--kubelet-dir",
            str(kubelet.path.parent),
            "--pod-resources",
            str(tmp_path / "no"),
            "--vfio-dev",
            "/host/dev/vfio",
        ],
        env={**os.environ, "PYTHONPATH": SOURCE_PATH},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: kubelet.requests, timeout=30, what="registration")
        assert kubelet.requests[0].resource_name == "kata-vfio.io/nic"
        with grpc.insecure_channel(
            f"unix://{kubelet.path.parent / 'kata-vfio-nic.sock'}"
        ) as channel:
            stub = rpc.DevicePluginStub(channel)
            devices, stream = first_list(stub)
            stream.cancel()
            assert sorted(devices) == ["0000:03:00.0", "0000:04:00.0"]
            reply = allocate(stub, "0000:04:00.0")
        assert [d.host_path for d in reply.devices] == ["/host/dev/vfio/vfio", "/host/dev/vfio/13"]
        assert dict(reply.envs) == {"PCIDEVICE_KATA_VFIO_IO_NIC": "0000:04:00.0,0000:04:00.1"}
        host = Host(fakesys.root, tmp_path / "state")
        assert owner_of(host, IommuGroup(13)) == "container kubernetes-allocation-0000-04-00.0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not (kubelet.path.parent / "kata-vfio-nic.sock").exists()
        assert proc.stderr is not None
        assert "registered kata-vfio.io/nic" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kubelet.stop()


def test_allocate_waits_for_the_stopping_container_of_the_pod_that_had_the_device(run: Run) -> None:
    """The kubelet hands a device out again as soon as its pod is no longer active, while
    the container that took the allocation over is still stopping: Allocate waits for it
    to let go (up to --handover-wait) instead of refusing the new pod. A group held by a
    container that never took one of our allocations is still refused at once."""
    run.options.handover_wait = 20.0
    run.start()
    stub = run.stub()
    allocate(stub, PF1_VFS[0])
    acquire(run.host, ContainerId.parse("app"), [IommuGroup(10)], [], (), None)
    stopped = threading.Timer(0.5, release_container, (run.host, "app"))
    stopped.start()
    started = time.monotonic()
    reply = allocate(stub, PF1_VFS[0])
    waited = time.monotonic() - started
    stopped.join()
    assert 0.4 < waited < 10, waited
    assert [d.container_path for d in reply.devices] == ["/dev/vfio/vfio", "/dev/vfio/10"]
    assert owner_of(run.host, IommuGroup(10)) == "container kubernetes-allocation-" + PF1_VFS[
        0
    ].replace(":", "-")
    # a podman container's group (no allocation of ours): refused without waiting
    acquire(run.host, ContainerId.parse("other"), [IommuGroup(11)], [], (), None)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError, match="in use by container other"):
        allocate(stub, PF1_VFS[1])
    assert time.monotonic() - started < 5


def test_restore_names_an_allocation_left_by_a_stopped_plugin_as_the_plugins(
    tmp_path: Path,
    fakesys: FakeSysfs,
    kernel: FakeKernel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Seen on a real kernel (tests/e2e/test_vm_plugin.py): the plugin stopped with an
    allocation whose pod never started, `restore --all` refused it as a "live container"
    to delete from its VM — there is no container and no VM. It is refused (the pod may
    still start) with a line that says whose it is and what gives it back; nothing moves."""
    build_host(fakesys)
    r = Run(tmp_path, fakesys, kernel)
    r.options.boot_id = None  # this boot's id, as kata-vfio-ctl reads it
    try:
        r.start()
        allocate(r.stub(), PF1_VFS[0])
        r.channel.close()
        r.stop_plugin()
    finally:
        r.close()
    cfg = tmp_path / "ctl.toml"
    cfg.write_text(f'sysfs = "{fakesys.root}"\nstate_dir = "{tmp_path / "state"}"\n')
    monkeypatch.setenv("KATA_VFIO_CONFIG", str(cfg))
    capsys.readouterr()
    assert ctl_main(["restore", "--all"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert (
        "IOMMU group 10 is held by Kubernetes allocation "
        "kubernetes-allocation-0000-00-04.1 (kata-vfio-ctl device-plugin)" in err[0]
    ), err
    assert "VM" not in err[0] and "delete the container" not in err[0], err
    assert "--force" in err[0]
    assert fakesys.driver(PF1_VFS[0]) == "vfio-pci"
    host = Host(fakesys.root, tmp_path / "state")
    assert owner_of(host, IommuGroup(10)) == "container kubernetes-allocation-0000-00-04.1"


def test_a_gone_vf_is_reported_before_a_slow_survey_of_the_rest(
    tmp_path: Path, fakesys: FakeSysfs, kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen on a real kernel (tests/e2e/test_vm_plugin.py, 1.28 s): the VFs' removal changes
    the PCI layout, and the survey that follows (in-use checks of every matching function
    on a host driver: process and mount scans) ran before the gone VFs were reported.
    Gone endpoints are Unhealthy in the next message, whatever the survey costs."""
    from kata_vfio_host import usage

    build_host(fakesys)
    fakesys.add_device("0000:00:09.0", NVME, group=40, driver="nvme")  # the host's disk
    slow = threading.Event()
    reported = threading.Event()  # the survey of the rest waits until the test saw the update

    def checker(sysfs: Any, proc: Any) -> Any:
        def uses(addr: Any) -> list[str]:
            if slow.is_set():
                reported.wait(timeout=30)
            return []

        return uses

    monkeypatch.setattr(usage, "use_checker", checker)
    r = Run(tmp_path, fakesys, kernel)
    try:
        r.start()
        devices, stream = first_list(r.stub())
        assert devices[PF1_VFS[3]][0] == "Healthy"
        slow.set()
        fakesys.remove_device(PF1_VFS[3])
        # the update must come while the survey of the rest is still blocked: with the
        # survey first, no message could arrive before `reported` is set (an ordering,
        # not a timing: the 1 s figure is make bench's)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
        reader.start()
        reader.join(timeout=15)
        reported.set()
        assert got, "no ListAndWatch update while the survey of the other devices ran"
        assert {d.ID: d.health for d in got[0].devices}[PF1_VFS[3]] == "Unhealthy"
        stream.cancel()
    finally:
        r.close()
