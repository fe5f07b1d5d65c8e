"""The kubelet's side of a device plugin, as gRPC servers on Unix sockets: its
Registration service and its pod-resources List. Test peers of `kata-vfio-ctl
device-plugin`, used on the host (tests/ctl/test_device_plugin.py) and in a guest
(tests/vm/guest-plugin.py): only grpc and kata-vfio's own kubeapi modules."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from kata_vfio_ctl.kubeapi import (
    deviceplugin_pb2,
    deviceplugin_pb2_grpc,
    podresources_pb2,
    podresources_pb2_grpc,
)

pb: Any = deviceplugin_pb2
rpc: Any = deviceplugin_pb2_grpc
pr: Any = podresources_pb2
pr_rpc: Any = podresources_pb2_grpc


class Kubelet:
    """The kubelet's Registration service on <dir>/kubelet.sock (what it records)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "kubelet.sock"
        self.requests: list[Any] = []
        self.server: Any = None

    def Register(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return pb.Empty()

    def start(self) -> None:
        try:  # a starting kubelet removes the directory's sockets, its own and plugins'
            for entry in self.path.parent.iterdir():
                if entry.is_socket():
                    entry.unlink()
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        rpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{self.path}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=0)
        self.path.unlink(missing_ok=True)


class PodResources(pr_rpc.PodResourcesListerServicer):  # type: ignore[misc]
    """The kubelet's pod-resources List: `listed` = (resource, device ID) of active pods
    (the plugin calls List only; the base class answers the rest UNIMPLEMENTED)."""

    def __init__(self, path: Path) -> None:
        self.listed: list[tuple[str, str]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pr_rpc.add_PodResourcesListerServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix://{path}")
        self.server.start()

    def List(self, request: Any, context: Any) -> Any:
        containers = [
            pr.ContainerResources(
                name="app", devices=[pr.ContainerDevices(resource_name=r, device_ids=[d])]
            )
            for r, d in self.listed
        ]
        return pr.ListPodResourcesResponse(
            pod_resources=[pr.PodResources(name="pod", namespace="default", containers=containers)]
        )
