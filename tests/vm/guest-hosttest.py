"""The guest as an IOMMU *host*: kata-vfio-ctl on a real kernel (copied in by vmtools).

Prints "KVFIO <json>" records: each ctl call with its exit code and output, and the
drivers sysfs shows after it.
"""

import json
import os
import subprocess
import sys

PCI = "/sys/bus/pci/devices"
CTL = ("import sys; sys.path.insert(0, '/usr/lib/kata-vfio'); "
       "from kata_vfio_ctl.main import main; sys.exit(main(sys.argv[1:]))")


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def driver(addr):
    link = os.path.join(PCI, addr, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def ctl(step, *args):
    proc = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", CTL, *args],
                          capture_output=True, text=True, timeout=60)
    drivers = {a: driver(a) for a in sorted(os.listdir(PCI))}
    emit(event="ctl", step=step, args=list(args), rc=proc.returncode, stdout=proc.stdout,
         stderr=proc.stderr, drivers=drivers,
         dev_vfio=sorted(os.listdir("/dev/vfio")) if os.path.isdir("/dev/vfio") else [])


def sysfs_view():
    out = {}
    for addr in sorted(os.listdir(PCI)):
        group = os.path.join(PCI, addr, "iommu_group")
        out[addr] = {"driver": driver(addr),
                     "iommu_group": int(os.path.basename(os.readlink(group)))
                     if os.path.islink(group) else None}
    return out


emit(event="sysfs", view=sysfs_view())
second_nic = os.listdir(os.path.join(PCI, "0000:00:04.0", "net"))[0]
emit(event="names", second_nic=second_nic)
ctl("devices", "devices", "--json")
ctl("bind-one", "bind", "0000:00:04.0")
ctl("restore-one", "restore", "0000:00:04.0")
ctl("dry-run-ifname", "bind", "--dry-run", second_nic)
ctl("bind-ifname", "bind", second_nic)
ctl("restore-short", "restore", "00:04.0")
ctl("bind-bridged", "bind", "0000:01:02.0")
ctl("restore-all", "restore", "--all")
ifname = os.listdir(os.path.join(PCI, "0000:00:03.0", "net"))[0]
subprocess.run(["/kvfio/bin/busybox", "ip", "addr", "add", "192.0.2.1/24", "dev", ifname],
               check=True)
subprocess.run(["/kvfio/bin/busybox", "ip", "link", "set", ifname, "up"], check=True)
ctl("bind-in-use", "bind", "0000:00:03.0")
sys.exit(0)
