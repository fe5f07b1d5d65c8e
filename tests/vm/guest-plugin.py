"""The guest as a Kubernetes node: QEMU's NVMe PF with SR-IOV VFs on the guest's real
kernel, `kata-vfio-ctl device-plugin` as its own process, and in place of the kubelet
the test peers of tests/plugin_peers.py (its Registration and pod-resources servers);
the plugin's DevicePlugin service is called over its socket as the kubelet calls it.

One boot, the steps in order, each reported as a "KVFIO <json>" record:
vfs (the PF makes 3 VFs, autoprobe off) -> registered / offered (first ListAndWatch) ->
allocate-a (VF 0 and 1, one request) and allocate-b (VF 2), each checked on sysfs,
/dev/vfio and the ledger -> released (pod A is no longer listed: the plugin gives A back)
-> restore-refused (restore --all: B is the plugin's) -> restore (restore --all --force
gives B back) -> removed (sriov_numvfs to 0: the ListAndWatch update) -> pf-offered (the
PF without VFs) -> allocate-pf (away from nvme) -> released-pf (its pod gone: back to
nvme) -> stopped (SIGTERM) -> restore-pf (restore --all: nothing left).
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

sys.path[:0] = ["/usr/lib/kata-vfio", "/kvfio"]

import grpc  # noqa: E402

from plugin_peers import Kubelet, PodResources, pb, rpc  # noqa: E402

PCI = "/sys/bus/pci/devices"
LIB = "import sys; sys.path.insert(0, '/usr/lib/kata-vfio'); "
CTL = LIB + "from kata_vfio_ctl.main import main; sys.exit(main(sys.argv[1:]))"
CONFIG = "/tmp/kata-vfio.toml"
ENV = {"KATA_VFIO_CONFIG": CONFIG, "PATH": "/kvfio/bin:/usr/bin:/bin"}
KUBELET_DIR = "/run/device-plugins"
POD_RESOURCES = "/run/pod-resources.sock"
RESOURCE = "kata-vfio.io/nvme"
VFIO_GROUP_GET_STATUS = 0x3B67
VFIO_GROUP_FLAGS_VIABLE = 1


def emit(**record):
    print("KVFIO " + json.dumps({**record, "t": round(time.monotonic(), 2)}), flush=True)


def driver(addr):
    link = os.path.join(PCI, addr, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def drivers():
    return {a: driver(a) for a in sorted(os.listdir(PCI))}


def group_of(addr):
    return int(os.path.basename(os.readlink(os.path.join(PCI, addr, "iommu_group"))))


def write(path, value):
    with open(path, "w") as f:
        f.write(value)


def ctl(*args):
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", CTL, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {"args": list(args), "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def owners():
    """Each function's ledger owner (a claim's container id), as `kata-vfio-ctl devices`
    reads it (in this process: a command's start costs seconds under TCG)."""
    from kata_vfio.pci import IommuGroup
    from kata_vfio_host.ledger import Host
    from kata_vfio_host.owners import owner_of

    host = Host("/sys", "/run/kata-vfio-state")
    found = {}
    for addr in sorted(os.listdir(PCI)):
        if os.path.islink(os.path.join(PCI, addr, "iommu_group")):
            owner = owner_of(host, IommuGroup(group_of(addr)))
            found[addr] = owner.split(" ", 1)[1] if owner else None
    return found


def group_status(number):
    """What a VFIO user sees: the group node, and whether it opens viable beside the
    container node."""
    path = f"/dev/vfio/{number}"
    if not os.path.exists(path):
        return {"node": False}
    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            _argsz, flags = struct.unpack(
                "II", fcntl.ioctl(fd, VFIO_GROUP_GET_STATUS, struct.pack("II", 8, 0))
            )
        finally:
            os.close(fd)
    finally:
        os.close(container)
    st = os.stat(path)
    return {
        "node": True,
        "viable": bool(flags & VFIO_GROUP_FLAGS_VIABLE),
        "dev": [os.major(st.st_rdev), os.minor(st.st_rdev)],
    }


class Watch:
    """A ListAndWatch stream, read in a thread: (guest monotonic time, {ID: health})."""

    def __init__(self, stub):
        self.messages = []
        self.cond = threading.Condition()
        self.stream = stub.ListAndWatch(pb.Empty())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for message in self.stream:
                with self.cond:
                    self.messages.append(
                        (time.monotonic(), {d.ID: d.health for d in message.devices})
                    )
                    self.cond.notify_all()
        except grpc.RpcError:
            pass

    def wait(self, check, after=0.0, timeout=30.0):
        """The first message received after `after` for which check(devices) holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for at, devices in self.messages:
                    if at >= after and check(devices):
                        return at, devices
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, (self.messages[-1][1] if self.messages else None)
                self.cond.wait(left)


class Plugin:
    """`kata-vfio-ctl device-plugin` as its own process, its log lines in a file."""

    def __init__(self, log):
        self.log_path = log
        self.log_file = open(log, "w")  # noqa: SIM115  (the plugin's stdout until stop)
        self.proc = subprocess.Popen(
            [
                "/usr/bin/python3",
                "-I",
                "-S",
                "-c",
                CTL,
                "device-plugin",
                "--kubelet-dir",
                KUBELET_DIR,
                "--pod-resources",
                POD_RESOURCES,
                "--cdi-dir",
                "/run/cdi",
                "--release-grace",
                "0",
            ],
            env=ENV,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def lines(self):
        with open(self.log_path) as f:
            return f.read().splitlines()

    def wait_line(self, start, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.lines() if start in line]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                return None
            time.sleep(0.1)
        return None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log_file.close()
        return rc


def allocate(stub, *ids):
    request = pb.AllocateRequest(
        container_requests=[pb.ContainerAllocateRequest(devices_ids=list(ids))]
    )
    started = time.monotonic()
    try:
        reply = stub.Allocate(request, timeout=120).container_responses[0]
    except grpc.RpcError as exc:
        return {"ids": list(ids), "error": f"{exc.code().name}: {exc.details()}"}
    return {
        "ids": list(ids),
        "seconds": round(time.monotonic() - started, 3),
        "devices": [[d.container_path, d.host_path, d.permissions] for d in reply.devices],
        "envs": dict(reply.envs),
        "annotations": dict(reply.annotations),
        "cdi": [c.name for c in reply.cdi_devices],
        "drivers": {a: driver(a) for a in ids},
        "groups": {a: group_status(group_of(a)) | {"number": group_of(a)} for a in ids},
    }


def main():
    pf = next(
        a for a in sorted(os.listdir(PCI)) if os.path.exists(os.path.join(PCI, a, "sriov_totalvfs"))
    )
    with open(CONFIG, "w") as f:
        f.write(
            'state_dir = "/run/kata-vfio-state"\nlog_file = "/tmp/kata-vfio.log"\n'
            '[[device_plugin.resource]]\nname = "nvme"\nselect = "1b36:0010"\n'
            "cdi = true\n"
        )
    # the admin makes the VFs for vfio: no VF driver probing
    write(os.path.join(PCI, pf, "sriov_drivers_autoprobe"), "0")
    write(os.path.join(PCI, pf, "sriov_numvfs"), "3")
    vfs = [os.path.basename(os.readlink(os.path.join(PCI, pf, f"virtfn{i}"))) for i in range(3)]
    emit(
        event="vfs",
        pf=pf,
        vfs=vfs,
        pf_driver=driver(pf),
        pf_group=group_of(pf),
        groups={v: group_of(v) for v in vfs},
        drivers={v: driver(v) for v in vfs},
    )

    kubelet = Kubelet(Path(KUBELET_DIR))
    kubelet.start()
    pods = PodResources(Path(POD_RESOURCES))
    started = time.monotonic()
    plugin = Plugin("/tmp/plugin-1.log")
    registered = plugin.wait_line("registered ", timeout=120)
    request = kubelet.requests[0] if kubelet.requests else None
    emit(
        event="registered",
        line=registered,
        seconds=round(time.monotonic() - started, 2),
        request=None
        if request is None
        else {
            "version": request.version,
            "endpoint": request.endpoint,
            "resource_name": request.resource_name,
            "preferred": request.options.get_preferred_allocation_available,
        },
    )
    if request is None:
        emit(event="plugin-log", lines=plugin.lines())
        return
    channel = grpc.insecure_channel(f"unix://{KUBELET_DIR}/{request.endpoint}")
    stub = rpc.DevicePluginStub(channel)
    watch = Watch(stub)
    _, first = watch.wait(lambda devices: True)
    emit(event="offered", devices=first, log=plugin.lines())

    # pod A asks for two VFs, pod B for one; the kubelet lists both pods as active
    pods.listed = [(RESOURCE, vfs[0]), (RESOURCE, vfs[2])]
    a = allocate(stub, vfs[0], vfs[1])
    a["owners"] = owners()
    emit(event="allocate-a", **a)
    b = allocate(stub, vfs[2])
    b["owners"] = owners()
    emit(event="allocate-b", **b)
    cdi = "/run/cdi/kata-vfio.io-nvme.json"
    emit(event="cdi", spec=read_json(cdi))

    # pod A is gone before its container ever started: the kubelet no longer lists it
    pods.listed = [(RESOURCE, vfs[2])]
    gone_at = time.monotonic()
    line = plugin.wait_line("released kubernetes-allocation-", timeout=60)
    emit(
        event="released",
        line=line,
        seconds=round(time.monotonic() - gone_at, 2),
        drivers={v: driver(v) for v in vfs},
        owners=owners(),
        nodes={v: os.path.exists(f"/dev/vfio/{group_of(v)}") for v in vfs},
    )

    # the CDI spec names the groups whose /dev/vfio node exists: A's go (a poll later)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        d["name"] in vfs[:2] for d in (read_json(cdi) or {"devices": []})["devices"]
    ):
        time.sleep(0.1)
    emit(event="cdi-after-release", spec=read_json(cdi))
    # B's pod has not started: restore refuses it as the plugin's, then the admin takes it
    # back with --force
    refused = ctl("restore", "--all")
    emit(event="restore-refused", **refused, drivers={v: driver(v) for v in vfs}, owners=owners())
    restored = ctl("restore", "--all", "--force")
    emit(
        event="restore",
        **restored,
        drivers={v: driver(v) for v in vfs},
        owners=owners(),
        nodes={v: os.path.exists(f"/dev/vfio/{group_of(v)}") for v in vfs},
    )

    # the admin removes the VFs (sriov_numvfs lowered) while the kubelet watches
    with watch.cond:
        emit(event="before-removal", devices=watch.messages[-1][1])
    write_at = time.monotonic()
    write(os.path.join(PCI, pf, "sriov_numvfs"), "0")
    written_at = time.monotonic()
    at, devices = watch.wait(
        lambda d: all(d.get(v, "gone") != "Healthy" for v in vfs), after=write_at
    )
    emit(
        event="removed",
        write_seconds=round(written_at - write_at, 3),
        seconds=None if at is None else round(at - write_at, 3),
        devices=devices,
        present=[v for v in vfs if os.path.exists(os.path.join(PCI, v))],
    )

    # the PF without VFs: offered itself, and nvme is a real driver to give it back to
    _, devices = watch.wait(lambda d: d.get(pf) == "Healthy", timeout=30)
    emit(event="pf-offered", devices=devices, log=plugin.lines())
    pods.listed = [(RESOURCE, pf)]
    taken = allocate(stub, pf)
    taken["owners"] = owners()
    emit(event="allocate-pf", **taken)
    # its pod is gone: the plugin gives the PF back to nvme
    pods.listed = []
    line = plugin.wait_line("released kubernetes-allocation-" + pf.replace(":", "-"), timeout=60)
    emit(
        event="released-pf",
        line=line,
        driver=driver(pf),
        owners=owners(),
        controllers=sorted(os.listdir(os.path.join(PCI, pf, "nvme")))
        if os.path.isdir(os.path.join(PCI, pf, "nvme"))
        else None,
    )
    channel.close()
    rc = plugin.stop()
    emit(
        event="stopped",
        rc=rc,
        socket=os.path.exists(f"{KUBELET_DIR}/{request.endpoint}"),
        log=plugin.lines(),
    )
    restored = ctl("restore", "--all")
    emit(event="restore-pf", **restored, pf_driver=driver(pf), owners=owners())
    kubelet.stop()
    pods.server.stop(grace=0)


try:
    main()
except Exception as exc:  # the host's assertions show what was reached; say why it ended
    emit(event="error", error=f"{type(exc).__name__}: {exc}")
emit(event="done", at=time.time())
sys.exit(0)
