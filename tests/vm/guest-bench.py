"""Benchmark inside the test guest: the hook's wall time against a bare Python start.

argv: scenario dir with manifest-1.json and manifest-N.json. Each hook run is a real
rebind (devices are given back to their native drivers between runs) for a
"container" that is a process in its own mount namespace and devices cgroup.
"""

import json
import os
import subprocess
import sys
import time

HOOK = "/usr/share/oci/hooks/prestart/kata-vfio-hook"
BB = "/kvfio/bin/busybox"
PCI = "/sys/bus/pci/devices"
RUNS = int(os.environ.get("KVFIO_BENCH_RUNS", "20"))
CLAIMS = "/run/kata-vfio/claims/claims.json"  # the hook's claim ledger in the guest


def write(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def give_back(addresses):
    for addr in addresses:
        write(f"{PCI}/{addr}/driver_override", "\n")
        if os.path.exists(f"{PCI}/{addr}/driver"):
            write(f"{PCI}/{addr}/driver/unbind", addr)
        write("/sys/bus/pci/drivers_probe", addr)


def timed(argv, stdin=None):
    started = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env={}, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {proc.stderr}")
    return elapsed


def main():
    scenario = sys.argv[1]
    bundle = "/tmp/bench"
    os.makedirs(f"{bundle}/rootfs/dev", exist_ok=True)
    with open(f"{bundle}/config.json", "w") as f:
        json.dump({"root": {"path": f"{bundle}/rootfs"}}, f)
    os.makedirs("/sys/fs/cgroup/devices/bench", exist_ok=True)
    ctr = subprocess.Popen([BB, "unshare", "-m", BB, "sleep", "1000"])
    time.sleep(0.2)
    write("/sys/fs/cgroup/devices/bench/cgroup.procs", str(ctr.pid))
    pid = ctr.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    pid = int(children[0]) if children else pid
    # as in a Kata VM booted from `make kata-image`, whose init loads the vfio modules
    # before kata-agent starts: the hook's first run then finds vfio-pci registered
    modprobe = next(m for m in ("/sbin/modprobe", "/usr/sbin/modprobe") if os.path.exists(m))
    subprocess.run([modprobe, "-a", "vfio", "vfio_iommu_type1", "vfio_pci"], check=True)
    results = {"bare": [timed(["/usr/bin/python3", "-I", "-S", "-c", "pass"]) for _ in range(RUNS)]}
    for label in ("1", "N"):
        with open(f"{scenario}/manifest-{label}.json") as f:
            manifest = f.read()
        state = json.dumps(
            {
                "ociVersion": "1.0.2",
                "id": f"bench{label}",
                "pid": pid,
                "bundle": bundle,
                "annotations": {"io.kata-vfio.manifest": manifest},
            }
        )
        walls, rebinds, totals, steps = [], [], [], []
        for _ in range(RUNS):
            for name in (
                os.listdir(f"{bundle}/rootfs/dev/vfio")
                if os.path.isdir(f"{bundle}/rootfs/dev/vfio")
                else []
            ):
                os.unlink(f"{bundle}/rootfs/dev/vfio/{name}")
            log_start = (
                os.path.getsize("/tmp/kata-vfio-hook.log")
                if os.path.exists("/tmp/kata-vfio-hook.log")
                else 0
            )
            walls.append(timed([HOOK, "prestart"], state))
            with open("/tmp/kata-vfio-hook.log") as f:
                f.seek(log_start)
                done = [json.loads(x) for x in f if '"event":"done"' in x][-1]
            rebinds.append(done["steps_ms"]["rebind"] / 1e3)
            steps.append(done["steps_ms"])
            if len(rebinds) == 1 and label == "1":
                first_steps = done["steps_ms"]
            totals.append(done["total_ms"] / 1e3)
            give_back(list(done["host_to_guest"].values()))
            # each run stands for a new container: the previous one is gone, and so is
            # its claim (one process plays every container here, so the hook cannot tell)
            if os.path.exists(CLAIMS):
                os.unlink(CLAIMS)
        if label == "1":  # the first hook run in this fresh guest: what Kata pays per VM
            results["first_hook"], results["first_rebind"] = walls[0], rebinds[0]
            results["first_steps"] = first_steps
            walls, rebinds = walls[1:], rebinds[1:]
        results[f"hook{label}"] = walls
        results[f"rebind{label}"] = rebinds
        results[f"steps{label}"] = steps[1:] if label == "1" else steps
        results[f"devices{label}"] = len(json.loads(manifest)["groups"]) and sum(
            len(g["devices"]) for g in json.loads(manifest)["groups"]
        )
    ctr.kill()
    print("KVFIO " + json.dumps({"event": "bench", **results}), flush=True)


main()
