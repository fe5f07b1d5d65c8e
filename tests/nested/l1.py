"""Runs INSIDE the virtme-ng L1 guest of tests/e2e/test_nested_host_e2e.py (test-only).

L1 is a TCG guest with a vIOMMU (intel-iommu, caching-mode=on) and one e1000e: a real IOMMU
host. Against L1's real /sys, with no Kata: `kata-vfio-ctl bind` moves the e1000e to
vfio-pci; `podman --runtime kata-vfio run --device /dev/vfio/N` runs a busybox container;
kata-vfio writes its manifest from L1's sysfs and execs the inner runtime, the test VM
launcher (tests/nested/launcher.py, standing in for Kata 1.x), which gives the group's
devices to an L2 VM on L1's KVM, where runc runs the container with our hook. Then
`kata-vfio-ctl restore` gives the device back to e1000e. A second cycle leaves the binding
to kata-vfio (`[autobind]`, the device asked for by address) and `podman rm -f` (the
wrapper's delete) gives it back.

Input: `PLAN` (JSON written by the test on the host) in a directory shared over 9p.
Output: `result.json` there and "KVFIO <json>" lines on stdout (L1's console).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the `kata` and `nested` packages

from kata import harness, rootfs  # noqa: E402
from nested.inside import NODES_SCRIPT, Results, cgroup_v1, driver_of  # noqa: E402
from nested.inside import run as bounded_run  # noqa: E402
from nested.launcher import console_lines  # noqa: E402

IMAGE = "localhost/kata-vfio-nested-busybox"
L2_MEMORY_MB = 256  # L1's QEMU pins (and maps through L1's vIOMMU) all of L2's RAM for VFIO
L2_KERNEL_PARAMS = "mitigations=off"
# the launcher's bound from QEMU's start to L2's init, per boot (it boots once more after
# a first that never got there): 20-46 s measured, quiet to busy
L2_BOOT_TIMEOUT = 100.0
RUN_TIMEOUT = 200.0

RESULTS = Results()
report, step = RESULTS.report, RESULTS.step


def run(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return bounded_run(cmd, env, timeout)


def l2_records(console_dir: Path, cid: str) -> list[dict[str, object]]:
    """The KVFIO records L2 wrote on its console (tests/nested/l2_container.py)."""
    path = console_dir / f"{cid}.console"
    records = []
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in console_lines(text):
        if line.startswith("KVFIO "):
            try:
                records.append(json.loads(line[len("KVFIO ") :]))
            except ValueError:
                pass
    return records


def l2_report(console_dir: Path, cid: str) -> dict[str, object]:
    """What L2 said about a container: its set-up, the hook's log, the QEMU command line
    the launcher used, and the console's tail (for the failure message)."""
    records = l2_records(console_dir, cid)
    argv = console_dir / f"{cid}.argv"
    console = console_dir / f"{cid}.console"
    timing = console_dir / f"{cid}.timing.json"
    return {
        "l2_timing": json.loads(timing.read_text()) if timing.exists() else None,
        "l2": next((r for r in records if r.get("event") == "l2"), None),
        "booted": next((r for r in records if r.get("event") == "booted"), None),
        "hook_log": next((r for r in records if r.get("event") == "hook_log"), None),
        "qemu_argv": argv.read_text().splitlines() if argv.exists() else [],
        "console_tail": console.read_text(errors="replace")[-3000:] if console.exists() else "",
    }


def wrapper_log(cid: str) -> list[dict[str, object]]:
    """kata-vfio's own log records for a container (what it did, edit_ms)."""
    path = RESULTS.top / "kata-vfio.log"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("container_id") == cid:
            records.append(record)
    return records


def autobind_cycle(
    podman: list[str], penv: dict[str, str], config: Path, addr: str, console_dir: Path
) -> None:
    """Second cycle: no `kata-vfio-ctl bind`. The device (on e1000e again) is asked for by
    address and allowed in `[autobind]`: kata-vfio binds it itself at create, the launcher
    gives it to L2, the hook to the container; `podman rm -f` (the wrapper's delete) gives
    it back to e1000e."""
    config.write_text(config.read_text() + f'[autobind]\nallow = ["{addr}"]\n')
    cidfile = Path("/run/kata-vfio-nested-host/cid-autobind")
    t = time.monotonic()
    r = run(
        [
            *podman,
            "run",
            "-d",
            "--cidfile",
            str(cidfile),
            "--network",
            "none",
            "--annotation",
            f"io.kata-vfio.devices={addr}",
            IMAGE,
            "sh",
            "-c",
            NODES_SCRIPT + "echo ready; exec sleep 600",
        ],
        env=penv,
    )
    step("podman run -d (auto-bind) returned", time.monotonic() - t)
    cid = cidfile.read_text().strip() if cidfile.exists() else ""
    # the launcher relays the container's lines as L2 writes them to its console: wait
    # there (a podman command a second would compete with L2 for L1's two vCPUs), then
    # read what podman has
    console = console_dir / f"{cid}.console"
    while (
        r.returncode == 0
        and time.monotonic() - t < RUN_TIMEOUT
        and not (
            console.exists()
            and (
                'KVFIO-OUT "ready"' in console.read_text(errors="replace")
                or "KVFIO-EXIT" in console.read_text(errors="replace")
            )
        )
    ):
        time.sleep(0.5)
    time.sleep(0.5)  # the launcher polls the console every 0.1 s
    logs = run([*podman, "logs", cid], env=penv)
    out = logs.stdout + logs.stderr
    step("podman run -d (auto-bind) to the container's output", time.monotonic() - t)
    report(
        "autobind_run",
        {
            "rc": r.returncode,
            "out": out,
            "err": r.stderr[-4000:],
            "cid": cid,
            "driver": driver_of(addr),
            **l2_report(console_dir, cid),
        },
    )
    t = time.monotonic()
    r = run([*podman, "rm", "-f", "-t", "0", cid or "none"], env=penv)
    step("podman rm -f (auto-bound device given back)", time.monotonic() - t)
    report(
        "autobind_rm",
        {
            "rc": r.returncode,
            "err": r.stderr[-2000:],
            "driver": driver_of(addr),
            "qemu_left": harness.qemu_pids(str(console_dir)),
            "kata_vfio_log": wrapper_log(cid),
        },
    )


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    top = RESULTS.top = Path(plan["top"])
    started = time.monotonic()
    # L1's QEMU (the L2 VM) pins all of L2's RAM for VFIO: CAP_IPC_LOCK as root, and a
    # memlock limit for everything below us (podman -> conmon -> kata-vfio -> launcher)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY,) * 2)
    venv_bin = Path(plan["venv_bin"])
    os.environ["PATH"] = f"{venv_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    addr = plan["device"]
    report(
        "l1",
        {
            "uname": os.uname().release,
            "device": addr,
            "driver": driver_of(addr),
            "iommu_groups": len(os.listdir("/sys/kernel/iommu_groups")),
            "kvm": os.path.exists("/dev/kvm"),
        },
    )  # L2 runs on it
    cgroup_v1()  # as in the Kata test's L1: podman's cgroupfs manager on v1 hierarchies
    work = Path("/run/kata-vfio-nested-host")  # L1's own tmpfs: podman storage, state
    work.mkdir(parents=True, exist_ok=True)
    # L2's kernel and base initrd into L1's tmpfs: read over 9p, every L2 start costs more
    t = time.monotonic()
    kernel = Path(shutil.copy2(plan["kernel"], work))
    initrd = Path(shutil.copy2(plan["initrd"], work))
    step("copy L2's kernel and initrd into L1's tmpfs", time.monotonic() - t)

    console_dir = top / "console"
    launcher_config = top / "launcher.json"
    launcher_config.write_text(
        json.dumps(
            {
                "state_dir": str(work / "launcher"),
                "console_dir": str(console_dir),
                "kernel": str(kernel),
                "initrd": str(initrd),
                "memory_mb": L2_MEMORY_MB,
                "vcpus": 1,
                "append": L2_KERNEL_PARAMS,
                "boot_timeout": L2_BOOT_TIMEOUT,
            }
        )
    )
    inner = top / "bin/l2-runtime"
    inner.parent.mkdir(parents=True, exist_ok=True)
    inner.write_text(
        f"#!/bin/sh\nexec /usr/bin/python3 -I -S {HERE / 'launcher.py'} "
        f'--launcher-config {launcher_config} "$@"\n'
    )
    inner.chmod(0o755)
    # kata-vfio's own configuration: real sysfs (the default), the launcher as its runtime
    config = top / "kata-vfio.toml"
    config.write_text(
        f'runtime = "{inner}"\nlog_file = "{top / "kata-vfio.log"}"\n'
        f'state_dir = "{work / "state"}"\n'
    )
    env = {**os.environ, "KATA_VFIO_CONFIG": str(config)}
    ctl = str(venv_bin / "kata-vfio-ctl")
    wrapper = top / "bin/kata-vfio"
    wrapper.write_text(f'#!/bin/sh\nKATA_VFIO_CONFIG={config} exec {venv_bin / "kata-vfio"} "$@"\n')
    wrapper.chmod(0o755)
    conf = top / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    r = run([ctl, "podman-register", "--conf", str(conf), "--runtime-path", str(wrapper)], env=env)
    report("register", {"rc": r.returncode, "err": r.stderr[-2000:]})
    if r.returncode:
        return 1

    penv = {**env, "CONTAINERS_CONF": str(conf)}
    podman = [
        "podman",
        "--root",
        str(work / "storage"),
        "--runroot",
        str(work / "run"),
        "--storage-driver",
        "vfs",
        "--runtime",
        "kata-vfio",
    ]
    t = time.monotonic()
    rootfs.import_image(podman, penv, Path(plan["busybox"]), work / "busybox.tar", IMAGE)
    step("podman import", time.monotonic() - t)

    # bind: the product's command on L1's real device
    t = time.monotonic()
    r = run([ctl, "bind", addr], env=env)
    step("kata-vfio-ctl bind", time.monotonic() - t)
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group"))
    report(
        "bind",
        {
            "rc": r.returncode,
            "out": r.stdout[-2000:],
            "err": r.stderr[-2000:],
            "driver": driver_of(addr),
            "group": group,
            "node": os.path.exists(f"/dev/vfio/{group}"),
        },
    )
    if r.returncode:
        return 1
    cidfile = work / "cid"
    t = time.monotonic()
    r = run(
        [
            *podman,
            "run",
            "--rm",
            "--cidfile",
            str(cidfile),
            "--network",
            "none",
            "--device",
            f"/dev/vfio/{group}",
            IMAGE,
            "sh",
            "-c",
            NODES_SCRIPT,
        ],
        env=penv,
    )
    step("podman run --rm (1 real VFIO device)", time.monotonic() - t)
    cid = cidfile.read_text().strip() if cidfile.exists() else ""
    report(
        "run",
        {
            "rc": r.returncode,
            "out": r.stdout,
            "err": r.stderr[-4000:],
            "cid": cid,
            **l2_report(console_dir, cid),
        },
    )
    report("qemu_left", harness.qemu_pids(str(console_dir)))
    report("kata_vfio_log", wrapper_log(cid))
    if r.returncode != 0:
        report("l1_dmesg_tail", run(["dmesg"]).stdout.splitlines()[-40:])
    report("driver_while_bound", driver_of(addr))
    t = time.monotonic()
    r2 = run([ctl, "restore", addr], env=env)
    step("kata-vfio-ctl restore", time.monotonic() - t)
    report(
        "restore",
        {
            "rc": r2.returncode,
            "out": r2.stdout[-2000:],
            "err": r2.stderr[-2000:],
            "driver": driver_of(addr),
        },
    )
    if r.returncode == 0 and driver_of(addr) == "e1000e":
        autobind_cycle(podman, penv, config, addr, console_dir)
    step("L1 script", time.monotonic() - started)
    report("done", True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # reported to the host, which asserts on it
        import traceback

        report("error", traceback.format_exc()[-4000:])
        raise
