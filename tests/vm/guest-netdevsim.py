"""io.kata-vfio.vf-config against a real PF driver: the kernel's netdevsim in the guest.

netdevsim's PF takes VF MAC/VLAN over rtnetlink like an SR-IOV NIC's driver, but its
VFs are not PCI functions. So the PCI side (the VFs' addresses, IOMMU groups on
vfio-pci, `physfn`/`virtfnN`, the PF's `net/<ifname>`) is a fake sysfs tree that maps
0000:3b:02.N to VF N of the netdevsim interface; everything else is real: the
`kata-vfio` wrapper's create and delete, `kata-vfio-ctl restore --all`, the ledger on
disk, pyroute2 and the driver. `ip -d -j link show` reads the PF's VF table after each
step, independently of the product.

Prints "KVFIO <json>" records, one per step.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = ["/usr/lib/kata-vfio", "/kvfio"]
from fakesys import IGBVF, FakeSysfs  # noqa: E402

NSIM_ID = 11
NSIM_DEV = f"/sys/bus/netdevsim/devices/netdevsim{NSIM_ID}"
NUM_VFS = 4
PF_ADDR = "0000:3b:00.0"
FAKESYS = "/tmp/fakesys"
STATE = "/run/kata-vfio-state"
LIB = "import sys; sys.path.insert(0, '/usr/lib/kata-vfio'); "
CTL = LIB + "from kata_vfio_ctl.main import main; sys.exit(main(sys.argv[1:]))"
WRAPPER = LIB + (
    "from kata_vfio_runtime.main import main; sys.exit(main(['kata-vfio', *sys.argv[1:]]))"
)
CONFIG = "/tmp/kata-vfio.toml"
ENV = {"KATA_VFIO_CONFIG": CONFIG, "PATH": "/kvfio/bin:/usr/sbin:/usr/bin:/bin"}


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def sh(*argv):
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=ENV)
    return {"argv": list(argv), "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def show(pf, step):
    """The PF's VF table as iproute2 prints it (the independent reader)."""
    emit(event="ip", step=step, **sh("ip", "-d", "-j", "link", "show", "dev", pf))


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
    )
    return proc


def journal_vf_configs(step):
    # the ledger: one file per IOMMU group (and host.json) under STATE/ledger
    vf_configs = {}
    ledger = Path(STATE, "ledger")
    for path in sorted(ledger.glob("*.json")) if ledger.is_dir() else []:
        vf_configs.update(json.loads(path.read_text()).get("vf_configs", {}))
    emit(event="journal", step=step, vf_configs=vf_configs)


def create(name, devices, vf_config):
    path = f"/tmp/bundles/{name}"
    os.makedirs(f"{path}/rootfs", exist_ok=True)
    write(
        f"{path}/config.json",
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "process": {"args": ["/bin/true"]},
                "root": {"path": "rootfs"},
                "linux": {"resources": {"devices": []}},
                "annotations": {
                    "io.kata-vfio.devices": devices,
                    "io.kata-vfio.vf-config": vf_config,
                },
            }
        ),
    )
    call(f"create-{name}", WRAPPER, "create", "--bundle", path, name)
    with open(f"{path}/config.json") as f:
        emit(event="spec", name=name, annotations=json.load(f).get("annotations", {}))


def make_pf():
    """netdevsim device NSIM_ID with one port and NUM_VFS VFs; its interface name."""
    emit(
        event="insmod",
        **sh("insmod", "/kvfio/netdevsim.ko"),
        modules=sorted(os.listdir("/sys/module")),
    )
    write("/sys/bus/netdevsim/new_device", f"{NSIM_ID} 1")
    write(f"{NSIM_DEV}/sriov_numvfs", str(NUM_VFS))
    deadline = time.monotonic() + 10
    while not os.listdir(f"{NSIM_DEV}/net") and time.monotonic() < deadline:
        time.sleep(0.1)
    pf = sorted(os.listdir(f"{NSIM_DEV}/net"))[0]
    emit(event="pf", pf=pf, numvfs=Path(NSIM_DEV, "sriov_numvfs").read_text().strip())
    return pf


def fake_pci(pf):
    """The PCI view a host with an SR-IOV NIC has: VFs 0000:3b:02.N on vfio-pci, a group
    each, VF N of `pf`."""
    fs = FakeSysfs(Path(FAKESYS))
    fs.add_driver("vfio-pci")
    fs.add_device(PF_ADDR, group=1, driver="netdevsim", net=(pf,))
    for i in range(NUM_VFS):
        vf = f"0000:3b:02.{i}"
        fs.add_device(vf, IGBVF, group=10 + i, driver="vfio-pci")
        fs.add_vfio_group(10 + i)
        fs.add_vf(PF_ADDR, vf, i)


pf = make_pf()
# what an admin left on the PF before any container: VF 0 a MAC, VF 1 a VLAN
emit(
    event="admin",
    step="vf0",
    **sh("ip", "link", "set", "dev", pf, "vf", "0", "mac", "02:00:00:00:00:01"),
)
emit(event="admin", step="vf1", **sh("ip", "link", "set", "dev", pf, "vf", "1", "vlan", "7"))
show(pf, "before")
fake_pci(pf)
write(
    CONFIG,
    f'runtime = "/kvfio/bin/true"\nstate_dir = "{STATE}"\nsysfs = "{FAKESYS}"\n'
    'log_file = "/tmp/kata-vfio.log"\n',
)

# one container, two VFs of the same PF
create(
    "c1",
    "0000:3b:02.0,0000:3b:02.1",
    "0000:3b:02.0 mac=52:54:00:12:34:56 vlan=100; 0000:3b:02.1 mac=52:54:00:12:34:57 vlan=200",
)
show(pf, "c1-created")
journal_vf_configs("c1-created")
call("delete-c1", WRAPPER, "delete", "c1")
show(pf, "c1-deleted")
journal_vf_configs("c1-deleted")

# a VLAN on a VF that had none, given back by restore --all --force (the container is
# never deleted: it is live, and its settings go back only when the admin forces it)
create("c2", "0000:3b:02.2", "0000:3b:02.2 vlan=300")
show(pf, "c2-created")
call("restore-all-refused", CTL, "restore", "--all")
show(pf, "refused-all")
call("restore-all", CTL, "restore", "--all", "--force")
show(pf, "restored-all")
journal_vf_configs("restored-all")
try:
    log = Path("/tmp/kata-vfio.log").read_text()
except FileNotFoundError:
    log = ""
emit(event="log", text=log[-8000:])
emit(event="done", at=time.time())
