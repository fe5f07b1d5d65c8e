"""Runs one scenario inside the test guest (copied into the image by vmtools).

argv: the scenario directory, holding bundle/config.json and expect.json, and optionally
`timeout`: the seconds runc may run (default 60; a container that runs a workload needs more
when TCG is slow).
Prints "KVFIO <json>" lines: drivers before and after, what runc said, the hook log.
"""

import json
import os
import subprocess
import sys
import time

PCI = "/sys/bus/pci/devices"


def emit(**record):
    print("KVFIO " + json.dumps(record), flush=True)


def link_names(attr):
    """address -> the name a device's `attr` symlink points at (driver, iommu_group)."""
    out = {}
    for addr in sorted(os.listdir(PCI)):
        link = os.path.join(PCI, addr, attr)
        out[addr] = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    return out


def drivers():
    return link_names("driver")


def groups():
    return link_names("iommu_group")


def ids():
    out = {}
    for addr in sorted(os.listdir(PCI)):
        vals = []
        for f in ("vendor", "device", "subsystem_vendor", "subsystem_device", "class"):
            with open(os.path.join(PCI, addr, f)) as fh:
                vals.append(fh.read().strip())
        out[addr] = vals
    return out


def hook_log():
    try:
        with open("/tmp/kata-vfio-hook.log") as f:
            return [json.loads(line) for line in f]
    except OSError:
        return []


def runc_timeout(scenario):
    try:
        with open(os.path.join(scenario, "timeout")) as f:
            return float(f.read())
    except OSError:
        return 60


def main():
    scenario = sys.argv[1]
    name = os.path.basename(scenario).split("-", 1)[1]  # "00-main" -> "main"
    before = drivers()
    emit(event="scenario", name=name, drivers_before=before, groups=groups(), ids=ids())
    log_start = len(hook_log())
    started = time.monotonic()
    proc = subprocess.run(["/usr/sbin/runc", "--root", "/run/runc", "run", "--no-pivot", "--bundle",
                           os.path.join(scenario, "bundle"), name],
                          capture_output=True, text=True, timeout=runc_timeout(scenario))
    vfio_devs = {}
    if os.path.isdir("/sys/class/vfio"):
        for group in os.listdir("/sys/class/vfio"):
            with open(f"/sys/class/vfio/{group}/dev") as f:
                vfio_devs[group] = [int(x) for x in f.read().strip().split(":")]
    emit(event="result", name=name, rc=proc.returncode, seconds=time.monotonic() - started,
         stdout=proc.stdout, stderr=proc.stderr, drivers_after=drivers(), groups=groups(),
         vfio_devs=vfio_devs, hook_log=hook_log()[log_start:])


main()
