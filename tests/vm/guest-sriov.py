"""The guest as an SR-IOV host: QEMU's NVMe PF, kata-vfio-ctl vfs, and io.kata-vfio.select
allocations through the real `kata-vfio` wrapper against the guest's real sysfs.

Prints "KVFIO <json>" records, one per step.
"""

import json
import os
import subprocess
import sys
import time

PCI = "/sys/bus/pci/devices"
LIB = "import sys; sys.path.insert(0, '/usr/lib/kata-vfio'); "
CTL = LIB + "from kata_vfio_ctl.main import main; sys.exit(main(sys.argv[1:]))"
WRAPPER = LIB + (
    "from kata_vfio_runtime.main import main; sys.exit(main(['kata-vfio', *sys.argv[1:]]))"
)
CONFIG = "/tmp/kata-vfio.toml"
ENV = {"KATA_VFIO_CONFIG": CONFIG, "PATH": "/kvfio/bin:/usr/bin:/bin"}


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def driver(addr):
    link = os.path.join(PCI, addr, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def drivers():
    return {a: driver(a) for a in sorted(os.listdir(PCI))}


def call(step, code, *args):
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", code, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    emit(
        event="call",
        step=step,
        args=list(args),
        rc=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
        drivers=drivers(),
    )
    return proc


def attr(addr, name):
    with open(os.path.join(PCI, addr, name)) as f:
        return f.read().strip()


def bundle(name, select):
    path = f"/tmp/bundles/{name}"
    os.makedirs(f"{path}/rootfs", exist_ok=True)
    with open(f"{path}/config.json", "w") as f:
        json.dump(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["/bin/true"]},
                "root": {"path": "rootfs"},
                "linux": {"resources": {"devices": []}},
                "annotations": {"io.kata-vfio.select": select},
            },
            f,
        )
    return path


def create(name):
    path = bundle(name, "1b36:0010*2")
    proc = call(f"create-{name}", WRAPPER, "create", "--bundle", path, name)
    with open(f"{path}/config.json") as f:
        annotations = json.load(f).get("annotations", {})
    emit(
        event="allocated",
        name=name,
        rc=proc.returncode,
        allocated=annotations.get("io.kata-vfio.allocated"),
    )


pf = next(
    a for a in sorted(os.listdir(PCI)) if os.path.exists(os.path.join(PCI, a, "sriov_totalvfs"))
)
with open(CONFIG, "w") as f:
    f.write(
        'runtime = "/kvfio/bin/true"\nstate_dir = "/run/kata-vfio-state"\n'
        'log_file = "/tmp/kata-vfio.log"\n[autobind]\nallow = ["1b36:0010"]\n'
    )
emit(event="pf", pf=pf, totalvfs=attr(pf, "sriov_totalvfs"))
call("vfs-4", CTL, "vfs", pf, "4")
emit(
    event="sriov",
    autoprobe=attr(pf, "sriov_drivers_autoprobe"),
    numvfs=attr(pf, "sriov_numvfs"),
    groups={
        a: os.path.basename(os.readlink(os.path.join(PCI, a, "iommu_group")))
        for a in sorted(os.listdir(PCI))
        if os.path.islink(os.path.join(PCI, a, "iommu_group"))
    },
)
call("vfs-4-again", CTL, "vfs", pf, "4")
call("devices", CTL, "devices", "--json")
for name in ("c1", "c2", "c3"):
    create(name)
call("devices-owned", CTL, "devices", "--json")
call("vfs-0-refused", CTL, "vfs", pf, "0")
call("delete-c1", WRAPPER, "delete", "c1")
create("c4")
call("delete-c2", WRAPPER, "delete", "c2")
call("delete-c4", WRAPPER, "delete", "c4")
call("vfs-0", CTL, "vfs", pf, "0")
call("restore-all", CTL, "restore", "--all")
emit(event="done", at=time.time())
sys.exit(0)
