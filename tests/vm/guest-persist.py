"""Persistent binds across reboots of a real kernel (copied in by vmtools).

The guest keeps /etc/kata-vfio and /var/lib/kata-vfio on an ext4 state disk (the NVMe
drive at 0000:00:06.0) and counts its boots there: boot 1 binds with --persist, gives
the SR-IOV NVMe PF (0000:00:07.0) two VFs with --persist and binds its second VF with
--persist, leaves two containers' claims and a device-plugin allocation, then reboots;
boot 2 runs `kata-vfio-ctl boot`, then removes the VFs (and their persistence); boot 3
runs `restore --all` without it. Prints "KVFIO <json>" records.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, "/usr/lib/kata-vfio")

PCI = "/sys/bus/pci/devices"
BB = "/kvfio/bin/busybox"
STATE = "/kvfio/state"
DISK_FN = "0000:00:06.0"
SRIOV_PF = "0000:00:07.0"
ALLOCATED = "0000:00:03.0"  # the device plugin's allocation
CTL = (
    "import sys; sys.path.insert(0, '/usr/lib/kata-vfio'); "
    "from kata_vfio_ctl.main import main; sys.exit(main(sys.argv[1:]))"
)


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def driver(addr):
    link = os.path.join(PCI, addr, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def drivers():
    return {a: driver(a) for a in sorted(os.listdir(PCI))}


def ctl(boot, step, *args):
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", CTL, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    emit(
        event="ctl",
        boot=boot,
        step=step,
        args=list(args),
        rc=proc.returncode,
        stdout=proc.stdout,
        stderr=proc.stderr,
        drivers=drivers(),
    )


def disk():
    base = os.path.realpath(os.path.join(PCI, DISK_FN)) + "/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = sorted(
            n
            for n in os.listdir("/sys/class/block")
            if os.path.realpath(os.path.join("/sys/class/block", n)).startswith(base)
        )
        if names:
            return "/dev/" + names[0]
        time.sleep(0.2)
    raise SystemExit("no state disk")


def run(*argv):
    subprocess.run(list(argv), check=True, stdin=subprocess.DEVNULL)


def ledger_claims():
    """The claims as the ledger's own API reads them: group -> container."""
    from kata_vfio_host.ledger import Host, read_journal_file

    host = Host("/sys", "/var/lib/kata-vfio")
    return {str(g): c.container for g, c in read_journal_file(host).claims.items()}


def sriov_state():
    """The PF's VF count, its VFs (virtfnN order) and the device plugin's records."""
    pf = os.path.join(PCI, SRIOV_PF)
    with open(os.path.join(pf, "sriov_numvfs")) as f:
        count = int(f.read())
    vfs = sorted((n for n in os.listdir(pf) if n.startswith("virtfn")), key=lambda n: int(n[6:]))
    records = "/var/lib/kata-vfio/device-plugin"
    return {
        "numvfs": count,
        "vfs": [os.path.basename(os.readlink(os.path.join(pf, n))) for n in vfs],
        "plugin_records": sorted(os.listdir(records)) if os.path.isdir(records) else [],
    }


def plugin_allocation():
    """What the device plugin's Allocate does for the kubelet: a claim, a bind, a record."""
    from kata_vfio.pci import PciAddress, group_of
    from kata_vfio_ctl import plugin_ledger
    from kata_vfio_host.ledger import Host

    host = Host("/sys", "/var/lib/kata-vfio")
    addr = PciAddress.parse(ALLOCATED)
    allocation = plugin_ledger.allocate(
        host, "kata-vfio.io/nic", [ALLOCATED], [group_of("/sys", addr)], [addr], None
    )
    emit(event="allocation", boot=1, id=allocation.id, drivers=drivers(), **sriov_state())


def container_claims():
    """Two containers' creates, through the ledger path every engine's create takes:
    ctr-a auto-binds the NVMe controller, ctr-b the two e1000 behind the bridge."""
    from kata_vfio.pci import PciAddress
    from kata_vfio_host.bindings import acquire
    from kata_vfio_host.ledger import ContainerId, Host

    host = Host("/sys", "/var/lib/kata-vfio")
    for cid, addr, allow in (
        ("ctr-a", "0000:00:05.0", "1b36:0010"),
        ("ctr-b", "0000:01:01.0", "8086:100e"),
    ):
        bundle = f"/run/bundles/{cid}"
        os.makedirs(bundle)
        acquire(host, ContainerId(cid), [], [PciAddress.parse(addr)], (allow,), bundle)


device = disk()
os.makedirs(STATE)
first = subprocess.run(
    [BB, "mount", "-t", "ext4", device, STATE], capture_output=True, stdin=subprocess.DEVNULL
)
if first.returncode != 0:  # the first boot: a fresh state disk
    run(BB, "mke2fs", "-q", device)
    run(BB, "mount", "-t", "ext4", device, STATE)
boots_file = os.path.join(STATE, "boots")
boot = 1
if os.path.exists(boots_file):
    with open(boots_file) as f:
        boot = int(f.read()) + 1
with open(boots_file, "w") as f:
    f.write(str(boot))
for sub, where in (("etc", "/etc/kata-vfio"), ("lib", "/var/lib/kata-vfio")):
    os.makedirs(os.path.join(STATE, sub), exist_ok=True)
    os.makedirs(where, exist_ok=True)
    run(BB, "mount", "-o", "bind", os.path.join(STATE, sub), where)
with open("/proc/sys/kernel/random/boot_id") as f:
    emit(
        event="booted-state",
        boot=boot,
        boot_id=f.read().strip(),
        drivers=drivers(),
        **sriov_state(),
    )

if boot == 1:
    ctl(boot, "bind-persist", "bind", "--persist", "0000:00:04.0")
    container_claims()
    emit(event="claims", boot=boot, claims=ledger_claims(), drivers=drivers())
    ctl(boot, "vfs-persist", "vfs", SRIOV_PF, "2", "--persist")
    ctl(boot, "bind-vf-persist", "bind", "--persist", sriov_state()["vfs"][1])
    plugin_allocation()
elif boot == 2:
    ctl(boot, "devices", "devices", "--json")
    ctl(boot, "boot", "boot", "--timeout", "30")
    emit(event="claims", boot=boot, claims=ledger_claims(), drivers=drivers(), **sriov_state())
    ctl(boot, "boot-again", "boot")
    ctl(boot, "bind-plain", "bind", "0000:00:05.0")
    ctl(boot, "vfs-0", "vfs", SRIOV_PF, "0")  # kata-vfio bound a VF: refused
    ctl(boot, "vfs-0-force", "vfs", SRIOV_PF, "0", "--force")
elif boot == 3:
    ctl(boot, "restore-all", "restore", "--all")
    ctl(boot, "boot", "boot")
for where in ("/etc/kata-vfio", "/var/lib/kata-vfio", STATE):
    run(BB, "umount", where)
run(BB, "sync")
if boot < 3:
    emit(event="rebooting", boot=boot)
    run(BB, "reboot", "-f")
    time.sleep(60)
