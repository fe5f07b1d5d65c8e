"""The guest as an SR-IOV host: QEMU's NVMe PF, kata-vfio-ctl vfs, and io.kata-vfio.select
allocations through the real `kata-vfio` wrapper against the guest's real sysfs.

Prints "KVFIO <json>" records, one per step.
"""

import json
import os
import sys
import time

sys.path.insert(0, "/kvfio")
from guestlib import CTL, LIB, attr, call, emit, groups, sriov_pf, write_config

WRAPPER = LIB + ("from kata_vfio_runtime.main import main; "
                 "sys.exit(main(['kata-vfio', *sys.argv[1:]]))")


def bundle(name, select):
    path = f"/tmp/bundles/{name}"
    os.makedirs(f"{path}/rootfs", exist_ok=True)
    with open(f"{path}/config.json", "w") as f:
        json.dump({"ociVersion": "1.0.2", "process": {"args": ["/bin/true"]},
                   "root": {"path": "rootfs"}, "linux": {"resources": {"devices": []}},
                   "annotations": {"io.kata-vfio.select": select}}, f)
    return path


def create(name):
    path = bundle(name, "1b36:0010*2")
    proc = call(f"create-{name}", WRAPPER, "create", "--bundle", path, name)
    with open(f"{path}/config.json") as f:
        annotations = json.load(f).get("annotations", {})
    emit(event="allocated", name=name, rc=proc.returncode,
         allocated=annotations.get("io.kata-vfio.allocated"))


pf = sriov_pf()
write_config('[autobind]\nallow = ["1b36:0010"]\n')
emit(event="pf", pf=pf, totalvfs=attr(pf, "sriov_totalvfs"))
call("vfs-4", CTL, "vfs", pf, "4")
emit(event="sriov", autoprobe=attr(pf, "sriov_drivers_autoprobe"),
     numvfs=attr(pf, "sriov_numvfs"), groups=groups())
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
