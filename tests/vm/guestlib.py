"""What the guest-side programs of an IOMMU-host guest share (copied to /kvfio/guestlib.py):
"KVFIO <json>" records, drivers as sysfs shows them, kata-vfio-ctl runs, the SR-IOV PF."""

import json
import os
import subprocess

PCI = "/sys/bus/pci/devices"
LIB = "import sys; sys.path.insert(0, '/usr/lib/kata-vfio'); "
CTL = LIB + "from kata_vfio_ctl.main import main; sys.exit(main(sys.argv[1:]))"
CONFIG = "/tmp/kata-vfio.toml"
ENV = {"KATA_VFIO_CONFIG": CONFIG, "PATH": "/kvfio/bin:/usr/bin:/bin"}


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def driver(addr):
    link = os.path.join(PCI, addr, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def drivers():
    return {a: driver(a) for a in sorted(os.listdir(PCI))}


def attr(addr, name):
    with open(os.path.join(PCI, addr, name)) as f:
        return f.read().strip()


def groups():
    """PCI address -> IOMMU group number (as a string), for every device in a group."""
    return {a: os.path.basename(os.readlink(os.path.join(PCI, a, "iommu_group")))
            for a in sorted(os.listdir(PCI))
            if os.path.islink(os.path.join(PCI, a, "iommu_group"))}


def call(step, code, *args):
    """Run `code` (CTL, or another -c program) with args; one record of its outcome and
    the drivers after it."""
    proc = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", code, *args], env=ENV,
                          capture_output=True, text=True, timeout=120)
    emit(event="call", step=step, args=list(args), rc=proc.returncode, stdout=proc.stdout,
         stderr=proc.stderr, drivers=drivers())
    return proc


def ctl_argv(*args):
    """kata-vfio-ctl's command line in the guest (for a long-running subcommand)."""
    return ["/usr/bin/python3", "-I", "-S", "-c", CTL, *args]


def sriov_pf():
    """The one SR-IOV capable function: QEMU's NVMe PF (vmtools.nvme_sriov_pf)."""
    return next(a for a in sorted(os.listdir(PCI))
                if os.path.exists(os.path.join(PCI, a, "sriov_totalvfs")))


def write_config(extra=""):
    with open(CONFIG, "w") as f:
        f.write('runtime = "/kvfio/bin/true"\nstate_dir = "/run/kata-vfio-state"\n'
                'log_file = "/tmp/kata-vfio.log"\n' + extra)
