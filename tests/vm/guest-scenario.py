"""Runs one scenario inside the test guest (copied into the image by vmtools).

argv: the scenario directory, holding bundle/config.json and expect.json, and optionally
`timeout`: the seconds runc may run (default 60; a container that runs a workload needs more
when TCG is slow).
Prints "KVFIO <json>" lines: drivers before and after, what runc said, the hook log.

Two containers of one pod, alive at once: a scenario with a `detach` file is started with
`runc run -d` (its output goes to ctr.out; the result is recorded once it printed its
report, and it stays); a later scenario with an `after` file (container names, one a line)
asks each of those for a second report (SIGUSR1) once it ran itself, records it as a
"detached" event, and kills and deletes it.
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


RUNC = ["/usr/sbin/runc", "--root", "/run/runc"]
DETACHED_OUT = "/run/kvfio-detached"  # <name>.out: what a detached container printed


def reports(name):
    try:
        with open(os.path.join(DETACHED_OUT, name + ".out")) as f:
            text = f.read()
    except OSError:
        return 0, ""
    return text.count("KVFIO-CONTAINER "), text


def wait_for_reports(name, count, timeout):
    deadline = time.monotonic() + timeout
    while reports(name)[0] < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return reports(name)[1]


def run_detached(scenario, name):
    """`runc run -d`: returns once the container started (its hooks ran) and reported."""
    os.makedirs(DETACHED_OUT, exist_ok=True)
    with open(os.path.join(DETACHED_OUT, name + ".out"), "w") as out:
        proc = subprocess.run(
            [*RUNC, "run", "-d", "--no-pivot", "--bundle", os.path.join(scenario, "bundle"), name],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            timeout=runc_timeout(scenario),
        )
    text = wait_for_reports(name, 1, 30) if proc.returncode == 0 else reports(name)[1]
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, text)


def collect(scenario):
    """Second reports from the detached containers this scenario names, then their end."""
    try:
        with open(os.path.join(scenario, "after")) as f:
            names = f.read().split()
    except OSError:
        return
    for name in names:
        subprocess.run([*RUNC, "kill", name, "USR1"], capture_output=True, timeout=30)
        emit(event="detached", name=name, stdout=wait_for_reports(name, 2, 30))
        subprocess.run([*RUNC, "kill", name, "KILL"], capture_output=True, timeout=30)
        for _ in range(50):  # kill is asynchronous: delete --force once it is stopped
            if (
                subprocess.run(
                    [*RUNC, "delete", "--force", name], capture_output=True, timeout=30
                ).returncode
                == 0
            ):
                break
            time.sleep(0.1)


def main():
    scenario = sys.argv[1]
    name = os.path.basename(scenario).split("-", 1)[1]  # "00-main" -> "main"
    before = drivers()
    emit(event="scenario", name=name, drivers_before=before, groups=groups(), ids=ids())
    log_start = len(hook_log())
    started = time.monotonic()
    if os.path.exists(os.path.join(scenario, "detach")):
        proc = run_detached(scenario, name)
    else:
        proc = subprocess.run(
            [*RUNC, "run", "--no-pivot", "--bundle", os.path.join(scenario, "bundle"), name],
            capture_output=True,
            text=True,
            timeout=runc_timeout(scenario),
        )
    vfio_devs = {}
    if os.path.isdir("/sys/class/vfio"):
        for group in os.listdir("/sys/class/vfio"):
            with open(f"/sys/class/vfio/{group}/dev") as f:
                vfio_devs[group] = [int(x) for x in f.read().strip().split(":")]
    emit(
        event="result",
        name=name,
        rc=proc.returncode,
        seconds=time.monotonic() - started,
        stdout=proc.stdout,
        stderr=proc.stderr,
        drivers_after=drivers(),
        groups=groups(),
        vfio_devs=vfio_devs,
        hook_log=hook_log()[log_start:],
    )
    collect(scenario)


main()
