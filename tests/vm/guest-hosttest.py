"""The guest as an IOMMU *host*: kata-vfio-ctl on a real kernel (copied in by vmtools).

Prints "KVFIO <json>" records: each ctl call with its exit code and output, and the
drivers sysfs shows after it.
"""

import json
import os
import subprocess
import sys
import time

PCI = "/sys/bus/pci/devices"
CTL = (
    "import sys; sys.path.insert(0, '/usr/lib/kata-vfio'); "
    "from kata_vfio_ctl.main import main; sys.exit(main(sys.argv[1:]))"
)


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def driver(addr):
    link = os.path.join(PCI, addr, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def ctl(step, *args):
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", CTL, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    drivers = {a: driver(a) for a in sorted(os.listdir(PCI))}
    emit(
        event="ctl",
        step=step,
        args=list(args),
        rc=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
        drivers=drivers,
        dev_vfio=sorted(os.listdir("/dev/vfio")) if os.path.isdir("/dev/vfio") else [],
    )


def sysfs_view():
    out = {}
    for addr in sorted(os.listdir(PCI)):
        group = os.path.join(PCI, addr, "iommu_group")
        out[addr] = {
            "driver": driver(addr),
            "iommu_group": int(os.path.basename(os.readlink(group)))
            if os.path.islink(group)
            else None,
        }
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
subprocess.run(
    ["/kvfio/bin/busybox", "ip", "addr", "add", "192.0.2.1/24", "dev", ifname], check=True
)
subprocess.run(["/kvfio/bin/busybox", "ip", "link", "set", ifname, "up"], check=True)
ctl("bind-in-use", "bind", "0000:00:03.0")


# --- what the host stands on: a disk under mounts, swap, dm and md; NIC stacks --------
BB = "/kvfio/bin/busybox"
IP = "/usr/sbin/ip"  # iproute2's: busybox's ip makes no bridges, bonds or VLANs
DISK_FN = "0000:00:06.0"  # the NVMe drive with a disk (four partitions, by the harness)
NIC_FN = "0000:00:04.0"


def setup(name, *argv):
    """One step of building or tearing down a stack; its outcome is a record."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin", "DM_DISABLE_UDEV": "1"},
    )
    emit(event="setup", name=name, args=list(argv), rc=proc.returncode, stderr=proc.stderr[-400:])


def blocks_below(fn):
    base = os.path.realpath(os.path.join(PCI, fn)) + "/"
    return sorted(
        n
        for n in os.listdir("/sys/class/block")
        if os.path.realpath(os.path.join("/sys/class/block", n)).startswith(base)
    )


def wait_for(fn, count, seconds=30):
    """The disk and its partitions below `fn`, once the driver has scanned them."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        names = blocks_below(fn)
        if len(names) >= count:
            return names
        time.sleep(0.2)
    return blocks_below(fn)


def nic():
    return os.listdir(os.path.join(PCI, NIC_FN, "net"))[0]


names = wait_for(DISK_FN, 5)
emit(event="disk", names=names)
disk = names[0]
p1, p2, p3, p4 = (f"/dev/{disk}p{i}" for i in range(1, 5))
os.makedirs("/mnt/kv", exist_ok=True)

setup("mkfs-p1", BB, "mke2fs", "-q", p1)
setup("mount-p1", BB, "mount", "-t", "ext4", p1, "/mnt/kv")
ctl("bind-mounted", "bind", DISK_FN)
setup("umount-p1", BB, "umount", "/mnt/kv")

setup("mkswap-p2", BB, "mkswap", p2)
setup("swapon-p2", BB, "swapon", p2)
ctl("bind-swap", "bind", DISK_FN)
setup("swapoff-p2", BB, "swapoff", p2)

with open(f"/sys/class/block/{disk}p3/size") as f:
    sectors = f.read().strip()
setup(
    "dm-create",
    "/usr/sbin/dmsetup",
    "create",
    "kvlin",
    "--noudevsync",
    "--table",
    f"0 {sectors} linear {p3} 0",
)
emit(
    event="mapper",
    islink=os.path.islink("/dev/mapper/kvlin"),
    exists=os.path.exists("/dev/mapper/kvlin"),
)
ctl("bind-dm", "bind", DISK_FN)
setup("mkfs-dm", BB, "mke2fs", "-q", "/dev/mapper/kvlin")
setup("mount-dm", BB, "mount", "-t", "ext4", "/dev/mapper/kvlin", "/mnt/kv")
ctl("bind-dm-mounted", "bind", DISK_FN)
setup("umount-dm", BB, "umount", "/mnt/kv")

setup(
    "md-create",
    "/usr/sbin/mdadm",
    "--create",
    "/dev/md0",
    "--level=1",
    "--raid-devices=2",
    "--metadata=1.2",
    "--run",
    "--assume-clean",
    "/dev/mapper/kvlin",
    p4,
)
setup("mkfs-md", BB, "mke2fs", "-q", "/dev/md0")
setup("mount-md", BB, "mount", "-t", "ext4", "/dev/md0", "/mnt/kv")
ctl("bind-md-over-dm-mounted", "bind", DISK_FN)
setup("umount-md", BB, "umount", "/mnt/kv")
setup("md-stop", "/usr/sbin/mdadm", "--stop", "/dev/md0")
setup("dm-remove", "/usr/sbin/dmsetup", "remove", "--noudevsync", "kvlin")
setup(
    "md-create-parts",
    "/usr/sbin/mdadm",
    "--create",
    "/dev/md1",
    "--level=1",
    "--raid-devices=2",
    "--metadata=1.2",
    "--run",
    "--assume-clean",
    p3,
    p4,
)
ctl("bind-md", "bind", DISK_FN)
setup("md-stop-parts", "/usr/sbin/mdadm", "--stop", "/dev/md1")
setup("md-zero", "/usr/sbin/mdadm", "--zero-superblock", p3, p4)

ctl("bind-disk-free", "bind", DISK_FN)
ctl("restore-disk", "restore", DISK_FN)
emit(event="disk-back", names=wait_for(DISK_FN, 5))

setup("nic-up", IP, "link", "set", nic(), "up")
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    addrs = subprocess.run(
        [IP, "-6", "-o", "addr", "show", "dev", nic()], capture_output=True, text=True
    ).stdout
    if "fe80::" in addrs and "tentative" not in addrs:
        break
    time.sleep(0.2)
emit(event="link-local", nic=nic(), addresses=addrs)
ctl("bind-link-local-only", "bind", NIC_FN)
ctl("restore-link-local-only", "restore", NIC_FN)

setup("br-add", IP, "link", "add", "kvbr0", "type", "bridge")
setup("br-port", IP, "link", "set", nic(), "master", "kvbr0")
setup("br-up", IP, "link", "set", "kvbr0", "up")
ctl("bind-bridge-port", "bind", NIC_FN)
setup("br-release", IP, "link", "set", nic(), "nomaster")
setup("br-del", IP, "link", "del", "kvbr0")
ctl("bind-after-bridge", "bind", NIC_FN)
ctl("restore-after-bridge", "restore", NIC_FN)

setup("bond-add", IP, "link", "add", "kvbond0", "type", "bond")
setup("bond-port-down", IP, "link", "set", nic(), "down")
setup("bond-port", IP, "link", "set", nic(), "master", "kvbond0")
setup("bond-up", IP, "link", "set", "kvbond0", "up")
ctl("bind-bond-port", "bind", NIC_FN)
setup("bond-del", IP, "link", "del", "kvbond0")

setup("vlan-add", IP, "link", "add", "link", nic(), "name", "kvvlan5", "type", "vlan", "id", "5")
setup("vlan-addr", IP, "addr", "add", "198.51.100.7/24", "dev", "kvvlan5")
setup("vlan-lower-up", IP, "link", "set", nic(), "up")
setup("vlan-up", IP, "link", "set", "kvvlan5", "up")
ctl("bind-vlan-lower", "bind", NIC_FN)
setup("vlan-del", IP, "link", "del", "kvvlan5")
ctl("bind-after-vlan", "bind", NIC_FN)
ctl("restore-after-vlan", "restore", NIC_FN)
sys.exit(0)
