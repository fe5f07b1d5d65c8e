"""The guest as a Kubernetes node's SR-IOV host: `kata-vfio-ctl device-plugin` on a real
kernel. QEMU's NVMe PF gets VFs by `kata-vfio-ctl vfs`; the plugin registers with the
kubelet's Registration service (plugin_peers, a test peer), offers the VFs, binds them
in Allocate (called over its own socket, as the kubelet calls it) and gives them back
once the pod-resources peer no longer lists them; a VF removed turns Unhealthy.

Prints "KVFIO <json>" records, one per step.
"""

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, "/usr/lib/kata-vfio")
sys.path.insert(0, "/kvfio")

import grpc
from guestlib import CTL, PCI, call, ctl_argv, drivers, emit, groups, sriov_pf, write_config

from kata_vfio_ctl import plugin_ledger
from kata_vfio_host.ledger import Host
from plugin_peers import Kubelet, PodResources, pb, rpc

RESOURCE = "kata-vfio.io/nvme"
KUBELET_DIR = Path("/tmp/device-plugins")
POD_RESOURCES = Path("/tmp/pod-resources.sock")
GRACE = "1"
VFIO_GET_API_VERSION = 0x3B64
VFIO_GROUP_GET_STATUS = 0x3B67


def open_nodes(numbers):
    """Open /dev/vfio/vfio and each /dev/vfio/<N> as a VFIO program does: the API
    version, and whether each group is viable."""
    out = {}
    fd = os.open("/dev/vfio/vfio", os.O_RDWR)
    try:
        out["vfio"] = fcntl.ioctl(fd, VFIO_GET_API_VERSION)
    finally:
        os.close(fd)
    for n in numbers:
        try:
            fd = os.open(f"/dev/vfio/{n}", os.O_RDWR)
        except OSError as exc:
            out[str(n)] = f"open failed: {exc}"
            continue
        try:
            status = bytearray(struct.pack("II", 8, 0))
            fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, status)
            out[str(n)] = "viable" if struct.unpack("II", status)[1] & 1 else "not viable"
        finally:
            os.close(fd)
    return out


def ledger():
    """The plugin's allocations as the ledger's API tells them: id -> groups."""
    host = Host("/sys", "/run/kata-vfio-state")
    return {a.id: sorted(a.groups) for a in plugin_ledger.allocations(host).values()}


def owners():
    proc = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", CTL, "devices", "--json"],
                          env={"KATA_VFIO_CONFIG": "/tmp/kata-vfio.toml"},
                          capture_output=True, text=True, timeout=120)
    return {r["address"]: r["owner"] for r in json.loads(proc.stdout)} if proc.stdout else {}


def wait(check, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


class Watch:
    """One ListAndWatch stream read in a thread: (arrival time, id -> health) each."""

    def __init__(self, stub):
        self.stream = stub.ListAndWatch(pb.Empty())
        self.messages = []
        self.lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for message in self.stream:
                with self.lock:
                    self.messages.append((time.monotonic(),
                                          {d.ID: d.health for d in message.devices}))
                    self.lock.notify_all()
        except grpc.RpcError:
            pass

    def first_after(self, since, check, seconds):
        """The first list that came at or after `since` and passes `check`: (seconds
        after `since`, the list), or (None, the last list) when none came in time."""
        deadline = time.monotonic() + seconds
        with self.lock:
            while True:
                for at, health in self.messages:
                    if at >= since and check(health):
                        return at - since, health
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, self.messages[-1][1] if self.messages else {}
                self.lock.wait(left)


def allocate(stub, step, ids):
    request = pb.AllocateRequest(container_requests=[
        pb.ContainerAllocateRequest(devices_ids=ids)])
    started = time.monotonic()
    try:
        reply = stub.Allocate(request, timeout=120).container_responses[0]
    except grpc.RpcError as exc:
        emit(event="allocate", step=step, ids=ids, error=exc.details(), drivers=drivers())
        return
    numbers = [d.host_path.rsplit("/", 1)[1] for d in reply.devices][1:]
    emit(event="allocate", step=step, ids=ids, seconds=time.monotonic() - started,
         devices=[[d.container_path, d.host_path, d.permissions] for d in reply.devices],
         envs=dict(reply.envs), annotations=dict(reply.annotations), drivers=drivers(),
         dev_vfio=sorted(os.listdir("/dev/vfio")), opened=open_nodes(numbers),
         ledger=ledger(), owners=owners())


def release(pod_resources, step, addresses, back_to):
    """The pod is gone from the kubelet's list: the plugin gives its devices back."""
    pod_resources.listed = []
    started = time.monotonic()
    done = wait(lambda: all(drivers().get(a) == back_to for a in addresses), 60)
    emit(event="released", step=step, done=done, seconds=time.monotonic() - started,
         drivers=drivers(), ledger=ledger(), owners=owners())


pf = sriov_pf()
write_config('[[device_plugin.resource]]\nname = "nvme"\nselect = "1b36:0010"\n')
call("vfs-3", CTL, "vfs", pf, "3")
vfs = sorted(os.path.basename(os.readlink(os.path.join(PCI, pf, f"virtfn{i}")))
             for i in range(3))
emit(event="sriov", pf=pf, vfs=vfs, groups=groups(), drivers=drivers())

kubelet = Kubelet(KUBELET_DIR)
kubelet.start()
pod_resources = PodResources(POD_RESOURCES)
log = open("/tmp/plugin.log", "w")  # noqa: SIM115  (the plugin's, until it ends)
started = time.monotonic()
plugin = subprocess.Popen(ctl_argv("device-plugin", "--config", "/tmp/kata-vfio.toml",
                                   "--kubelet-dir", str(KUBELET_DIR),
                                   "--pod-resources", str(POD_RESOURCES),
                                   "--release-grace", GRACE),
                          stdout=log, stderr=log, env={"PATH": "/kvfio/bin:/usr/bin:/bin"})
try:
    registered = wait(lambda: kubelet.requests, 180)
    request = kubelet.requests[0] if registered else None
    emit(event="registered", seconds=time.monotonic() - started,
         request=None if request is None else
         [request.version, request.endpoint, request.resource_name])
    channel = grpc.insecure_channel(f"unix://{KUBELET_DIR / 'kata-vfio-nvme.sock'}")
    stub = rpc.DevicePluginStub(channel)
    watch = Watch(stub)
    _, first = watch.first_after(0, lambda h: True, 60)
    emit(event="offered", devices=first)

    # a pod asks for two VFs; the kubelet lists it while it runs, then it is gone
    allocate(stub, "vfs", vfs[:2])
    pod_resources.listed = [(RESOURCE, v) for v in vfs[:2]]
    time.sleep(float(GRACE) + 6)  # past the grace and a release pass: listed, kept
    emit(event="kept", drivers=drivers(), ledger=ledger())
    release(pod_resources, "vfs", vfs[:2], None)
    call("restore-after-vfs", CTL, "restore", "--all")

    # a VF removed by the kernel (sysfs remove), then the rest (sriov_numvfs lowered)
    since = time.monotonic()
    with open(os.path.join(PCI, vfs[2], "remove"), "w") as f:
        f.write("1")
    latency, health = watch.first_after(since, lambda h: h.get(vfs[2]) == "Unhealthy", 5)
    emit(event="removed", how="remove", vf=vfs[2], latency=latency, health=health)
    since = time.monotonic()
    with open(os.path.join(PCI, pf, "sriov_numvfs"), "w") as f:
        f.write("0")
    written = time.monotonic() - since
    latency, health = watch.first_after(
        since, lambda h: all(h.get(v) == "Unhealthy" for v in vfs[:2]), 5)
    emit(event="removed", how="sriov_numvfs", vf=vfs[:2], latency=latency, write=written,
         health=health)
    _, health = watch.first_after(since, lambda h: h.get(pf) == "Healthy", 10)
    emit(event="pf-offered", health=health)

    # no VFs left: the PF itself is offered; a pod takes it from nvme and gives it back
    allocate(stub, "pf", [pf])
    pod_resources.listed = [(RESOURCE, pf)]
    release(pod_resources, "pf", [pf], "nvme")
    call("restore-after-pf", CTL, "restore", "--all")
    watch.stream.cancel()
    channel.close()
finally:
    plugin.send_signal(signal.SIGTERM)
    try:
        code = plugin.wait(60)
    except subprocess.TimeoutExpired:
        plugin.kill()
        code = plugin.wait()
    log.close()
    with open("/tmp/plugin.log") as f:
        emit(event="plugin-exit", rc=code, log=f.read()[-6000:],
             socket=os.path.exists(KUBELET_DIR / "kata-vfio-nvme.sock"))
    kubelet.stop()
    pod_resources.server.stop(grace=0)
emit(event="done", at=time.time())
sys.exit(0)
