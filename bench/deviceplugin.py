"""The device plugin's figures (`make bench`, part "deviceplugin"): Allocate p50/p99 over
real gRPC with 256 VFs offered on a fake host (each Allocate claims and binds one VF
through the ledger; target p99 <= 20 ms), and the time from a VF disappearing to the
ListAndWatch update that shows it Unhealthy (target <= 1 s)."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

VFS = 256


def bench_device_plugin(work: Path) -> None:
    import grpc

    from kata_vfio.pci import PciAddress
    from kata_vfio_ctl import devplugin
    from kata_vfio_ctl.kubeapi import deviceplugin_pb2, deviceplugin_pb2_grpc
    from kata_vfio_ctl.plugin_devices import Resource
    from kata_vfio_host.allocate import parse_select

    from fakesys import FakeKernel, FakeSysfs

    pb: Any = deviceplugin_pb2
    rpc: Any = deviceplugin_pb2_grpc
    fs = FakeSysfs(work / "dp-sys")
    fs.add_driver("vfio-pci")
    kernel = FakeKernel(fs)
    vfs = []
    for p in range(2):  # two PFs of 128 driver-less VFs, each VF its own group
        pf = f"0000:{0x3B + p * 4:02x}:00.0"
        fs.add_device(pf, (0x8086, 0x1572, 0x020000), group=1 + p, driver="i40e")
        for i in range(VFS // 2):
            vf = str(PciAddress(0, 0x3C + p * 4 + i // 64, (i % 64) // 8, i % 8))
            fs.add_device(vf, (0x8086, 0x154C, 0x020000), group=300 + p * 200 + i)
            fs.add_vf(pf, vf, i)
            vfs.append(vf)

    registered = threading.Event()

    class Kubelet:
        def Register(self, request: Any, context: Any) -> Any:
            registered.set()
            return pb.Empty()

    kubelet_dir = work / "dp-kubelet"
    kubelet_dir.mkdir()
    kubelet = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_RegistrationServicer_to_server(Kubelet(), kubelet)
    kubelet.add_insecure_port(f"unix://{kubelet_dir / 'kubelet.sock'}")
    kubelet.start()
    options = devplugin.Options(
        sysfs=str(fs.root),
        state_dir=str(work / "dp-state"),
        kubelet_dir=str(kubelet_dir),
        pod_resources=str(work / "none.sock"),
        cdi_dir=str(work / "dp-cdi"),
        write=kernel.write,
        boot_id="bench",
        proc=str(work / "no-proc"),
    )
    resource = Resource("vf", parse_select("8086:154c")[0], ())
    from kata_vfio_ctl import plugin_ledger

    in_ledger: list[float] = []
    ledger_acquire = plugin_ledger.acquire

    def timed_acquire(*args: Any, **kwargs: Any) -> Any:  # the ledger's share of each
        began = time.perf_counter()
        try:
            return ledger_acquire(*args, **kwargs)
        finally:
            in_ledger.append(time.perf_counter() - began)

    plugin_ledger.acquire = timed_acquire  # type: ignore[assignment]
    plugin = devplugin.Plugin(options, [resource], log=lambda line: None)
    thread = threading.Thread(target=plugin.run, daemon=True)
    thread.start()
    try:
        registered.wait(30)
        channel = grpc.insecure_channel(f"unix://{kubelet_dir / resource.socket_name}")
        stub = rpc.DevicePluginStub(channel)
        stream = stub.ListAndWatch(pb.Empty())
        offered = len(next(stream).devices)
        took = []
        for vf in vfs[: VFS - 16]:  # the last 16 stay for the watch figure
            request = pb.AllocateRequest(
                container_requests=[pb.ContainerAllocateRequest(devices_ids=[vf])]
            )
            began = time.perf_counter()
            stub.Allocate(request, timeout=30)
            took.append(time.perf_counter() - began)
        took.sort()
        p50 = statistics.median(took) * 1e3
        p99 = took[int(len(took) * 0.99) - 1] * 1e3
        delays = []
        for vf in vfs[VFS - 16 : VFS - 6]:
            gone_at = time.perf_counter()
            fs.remove_device(vf)
            while True:
                message = next(stream)
                health = {d.ID: d.health for d in message.devices}
                if health.get(vf) == "Unhealthy":
                    delays.append(time.perf_counter() - gone_at)
                    break
        stream.cancel()
        channel.close()
    finally:
        plugin_ledger.acquire = ledger_acquire  # type: ignore[assignment]
        plugin.stop()
        thread.join(10)
        kubelet.stop(grace=0)
    print(
        f"device plugin, {offered} VFs offered (fake host, real gRPC): Allocate of one VF "
        f"(ledger claim + bind) p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(took)} "
        f"(target p99 <= 20 ms)"
    )
    in_ledger.sort()
    print(
        f"  of which bindings.acquire (ledger locks, journal, bind): p50 "
        f"{statistics.median(in_ledger) * 1e3:.1f} ms, p99 "
        f"{in_ledger[int(len(in_ledger) * 0.99) - 1] * 1e3:.1f} ms (the journal holds up to "
        f"{len(in_ledger)} allocations by the end)"
    )
    print(
        f"  VF removed -> ListAndWatch shows it Unhealthy: median "
        f"{statistics.median(delays) * 1e3:.0f} ms, max {max(delays) * 1e3:.0f} ms over "
        f"{len(delays)} (target <= 1 s; poll every {devplugin.POLL * 1e3:.0f} ms)"
    )
