"""Runs INSIDE the virtme-ng L1 guest of tests/e2e/test_kata_nested_e2e.py (test-only).

L1 is a TCG guest with a vIOMMU (intel-iommu, caching-mode=on) and one e1000e: a real
IOMMU host. Here, against L1's real /sys (no fake tree, no stripping inner runtime):
`kata-vfio-ctl bind` moves the e1000e to vfio-pci, podman runs a busybox container with
`--runtime kata-vfio --device /dev/vfio/N`, kata-vfio writes its manifest from real sysfs and
execs the real kata-runtime 1.x, which hot-plugs the real VFIO group into its L2 VM (on
L1's KVM: L1's emulated SVM); kata-agent runs kata-vfio-hook there, which rebinds the
device to vfio-pci in L2 and gives the container its nodes. Then `kata-vfio-ctl restore`
gives the device back to e1000e. A second cycle leaves the binding to kata-vfio
(`[autobind]`, the device asked for by address) and `podman rm` gives it back.

Input: `PLAN` (JSON, written by the test on the host) in a directory shared over 9p.
Output: `result.json` in that directory and "KVFIO <json>" lines on stdout (L1's console).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: `kata` package

from kata import harness, rootfs  # noqa: E402
from nested.inside import NODES_SCRIPT, Results, cgroup_v1, driver_of, run  # noqa: E402

BUSYBOX = "localhost/kata-vfio-kata-busybox"
# Kata 1.x settings for the nested set-up (configuration only; see the test's docstring):
# L1's QEMU pins all of L2's RAM for VFIO, so L2 stays small
L2_MEMORY_MB = 512
L2_VCPUS = 1
L2_KERNEL_PARAMS = "mitigations=off"
# Kata 1.x gives the agent 20 s from the runtime's gRPC dial (through kata-proxy) to the
# agent's HTTP/2 preface: grpc-go's minConnectTimeout (vendored clientconn.go), not
# configurable. The dial comes right after QMP answers, which is right after the hypervisor
# `path` returns (QEMU daemonizes); Kata waits for the `path` with no time limit. L2 needs
# 20-60 s to boot to kata-agent here (measured), so the test-only L2 launcher below returns
# only once L2 is there: it holds QMP until QEMU reports the guest opening the agent's
# virtio-serial port (VSERPORT_CHANGE, id channel0, open), at most BOOT_WAIT seconds.
BOOT_WAIT = 200.0  # podman gives the whole `create` 240 s (libpod ContainerCreateTimeout)

RESULTS = Results()
report, step = RESULTS.report, RESULTS.step


# L2 runs on KVM *inside* L1: L1 is a TCG guest with `-cpu max`, whose emulated AMD SVM
# (nested paging included) gives L1 a working /dev/kvm. Measured in L1, Kata's own L2 command
# line from QEMU's start to kata-agent opening its port: 29 s with KVM, 158-230 s with TCG
# inside TCG (a 40-60x slowdown, far over podman's hard-coded 240 s container creation
# timeout). So unlike the first test's launcher this one keeps Kata's `accel=kvm` and
# `-cpu host`; it only sends the console to a file and holds QMP (see BOOT_WAIT).
L2_LAUNCHER = """#!/usr/bin/python3 -IS
\"\"\"Test-only hypervisor `path` (written by tests/kata/nested_l1.py) for Kata 1.x in the
nested test's L1: L2 on L1's KVM, Kata's command line kept except a bare kernel_irqchip
(QEMU 7.2 rejects it); the console goes to CONSOLE_DIR/NAME.console. With -daemonize,
returns only once L2's kata-agent opened its virtio-serial port (QMP event
VSERPORT_CHANGE), at most {wait:g} s; the timings go to NAME.boot.\"\"\"
import json, os, socket, sys, time

QEMU = {qemu!r}
CONSOLE_DIR = {console_dir!r}
args = sys.argv[1:]
if args[:1] == ["--version"] or "-daemonize" not in args:
    os.execv(QEMU, [QEMU, *args])
out = []
for a, prev in zip(args, ["", *args]):
    if prev == "-machine":
        a = ",".join(o for o in a.split(",") if o != "kernel_irqchip")
    elif prev == "-append":
        a += " console=ttyS0"
    out.append(a)
after = dict(zip(out, [*out[1:], ""]))
name = after.get("-name", "vm").split(",")[0].removeprefix("sandbox-")
base = os.path.join(CONSOLE_DIR, name)
out += ["-serial", "file:" + base + ".console"]
with open(base + ".argv", "w") as f:
    f.write("\\n".join([QEMU, *out]) + "\\n")
record = {{"events": []}}
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execv(QEMU, [QEMU, *out])
rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
record["daemonized_s"] = round(time.monotonic() - t0, 1)
if rc == 0:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(after["-qmp"].split(",")[0].removeprefix("unix:"))
        s.settimeout({wait})
        f = s.makefile("rw")
        f.readline()
        f.write(json.dumps({{"execute": "qmp_capabilities"}}) + "\\n")
        f.flush()
        for line in f:
            msg = json.loads(line)
            if "event" not in msg:
                continue
            data = msg.get("data") or {{}}
            record["events"].append([round(time.monotonic() - t0, 1), msg["event"], data])
            if msg["event"] in ("SHUTDOWN", "GUEST_PANICKED") or (
                    msg["event"] == "VSERPORT_CHANGE" and data.get("id") == "channel0"
                    and data.get("open")):
                break
    except (OSError, ValueError) as exc:
        record["error"] = repr(exc)
    s.close()
record["returned_s"] = round(time.monotonic() - t0, 1)
with open(base + ".boot", "w") as f:
    json.dump(record, f)
sys.exit(rc)
"""


def write_l2_launcher(path: Path, console_dir: Path) -> Path:
    console_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        L2_LAUNCHER.format(qemu=harness.QEMU, console_dir=str(console_dir), wait=BOOT_WAIT)
    )
    path.chmod(0o755)
    return path


def autobind_cycle(
    podman: list[str], penv: dict[str, str], config: Path, addr: str, console_dir: Path
) -> None:
    """Second cycle: no `kata-vfio-ctl bind`. The device (on e1000e again) is asked for by
    address and allowed in `[autobind]`: kata-vfio binds it itself at create, Kata hot-plugs
    it, the hook gives it to the container; `podman rm` (the wrapper's delete) gives it
    back to e1000e."""
    config.write_text(config.read_text() + f'[autobind]\nallow = ["{addr}"]\n')
    cidfile = Path("/run/kata-vfio-nested/cid-autobind")
    t = time.monotonic()
    try:
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
                BUSYBOX,
                "sh",
                "-c",
                NODES_SCRIPT + "echo ready; exec sleep 600",
            ],
            env=penv,
        )
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = -1, f"timeout: {exc}"
    cid = cidfile.read_text().strip() if cidfile.exists() else ""
    out = ""
    while rc == 0 and "ready" not in out and time.monotonic() - t < 300:
        out = run([*podman, "logs", cid], env=penv).stdout
        time.sleep(0.5)
    step("podman run -d (auto-bind) to the container's output", time.monotonic() - t)
    report(
        "autobind_run",
        {"rc": rc, "out": out, "err": err[-4000:], "cid": cid, "driver": driver_of(addr)},
    )
    report(
        "autobind_hook_log",
        harness.relayed_hook_log(harness.console_text(console_dir, cid)) if cid else [],
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
        },
    )


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    top = RESULTS.top = Path(plan["top"])
    started = time.monotonic()
    # L1's QEMU (Kata's L2) pins all of L2's RAM for VFIO: CAP_IPC_LOCK as root, and a
    # memlock limit for everything below us (podman -> kata-runtime -> QEMU)
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
    cgroup_v1()
    work = Path("/run/kata-vfio-nested")  # L1's own tmpfs: podman storage, state
    work.mkdir(parents=True, exist_ok=True)
    # Kata's binaries, L2's kernel and image into L1's tmpfs: read over 9p on every exec
    # (kata-runtime runs for every verb), they cost seconds each time
    t = time.monotonic()
    local = work / "kata"
    local.mkdir(exist_ok=True)
    bins = {k: Path(shutil.copy2(v, local)) for k, v in plan["binaries"].items()}
    kernel = Path(shutil.copy2(plan["kernel"], local))
    image = Path(shutil.copy2(plan["image"], local))
    step("copy Kata into L1's tmpfs", time.monotonic() - t)

    # kata-vfio's own configuration: real sysfs (the default), the real kata-runtime
    kata_config = top / "kata/configuration.toml"
    inner = top / "bin/kata-runtime"
    inner.parent.mkdir(parents=True, exist_ok=True)
    inner.write_text(f'#!/bin/sh\nexec {bins["kata-runtime"]} --kata-config {kata_config} "$@"\n')
    inner.chmod(0o755)
    config = top / "kata-vfio.toml"
    config.write_text(
        f'runtime = "{inner}"\nlog_file = "{top / "kata-vfio.log"}"\n'
        f'state_dir = "{work / "state"}"\n'
    )
    env = {**os.environ, "KATA_VFIO_CONFIG": str(config)}
    ctl = str(venv_bin / "kata-vfio-ctl")

    # Kata 1.x: its generated configuration, the test-only launcher (no extra devices: the
    # device comes from the real hot-plug) and paths, then `kata-vfio-ctl install`
    console_dir = top / "console"
    qemu = write_l2_launcher(top / "bin/qemu-l2", console_dir)
    harness.write_kata_config(
        bins["configuration-qemu.toml"],
        kata_config,
        qemu=qemu,
        kernel=kernel,
        initrd=image,
        binaries=bins,
        debug=bool(plan.get("debug")),
    )
    text = kata_config.read_text()
    hv = "hypervisor.qemu"
    text = harness._set(text, hv, "default_memory", str(L2_MEMORY_MB))
    text = harness._set(text, hv, "default_vcpus", str(L2_VCPUS))
    # after install's kernel parameters: no speculation mitigations (L2 is a throw-away
    # test VM on an emulated CPU)
    m = re.search(r'^kernel_params = "(.*)"$', text, re.M)
    params = (m.group(1) + " " if m else "") + L2_KERNEL_PARAMS
    text = harness._set(text, hv, "kernel_params", harness.q(params))
    kata_config.write_text(text)
    launcher = top / "bin/kata-vfio"
    launcher.write_text(
        f'#!/bin/sh\nKATA_VFIO_CONFIG={config} exec {venv_bin / "kata-vfio"} "$@"\n'
    )
    launcher.chmod(0o755)
    conf = top / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    r = run(
        [
            ctl,
            "install",
            "--kata-config",
            str(kata_config),
            "--conf",
            str(conf),
            "--runtime-path",
            str(launcher),
        ],
        env=env,
    )
    report("install", {"rc": r.returncode, "err": r.stderr[-2000:]})
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
    rootfs.import_image(podman, penv, Path(plan["busybox"]), work / "busybox.tar", BUSYBOX)
    step("podman import", time.monotonic() - t)

    with harness.syslog(top / "syslog.log"):
        harness.shared_sandboxes()
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
        try:
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
                    BUSYBOX,
                    "sh",
                    "-c",
                    NODES_SCRIPT,
                ],
                env=penv,
                timeout=300,
            )
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -1, str(exc.stdout or ""), f"timeout: {exc}"
        step("podman run --rm (1 real VFIO device)", time.monotonic() - t)
        cid = cidfile.read_text().strip() if cidfile.exists() else ""
        report("run", {"rc": rc, "out": out, "err": err[-4000:], "cid": cid})
        report(
            "hook_log",
            harness.relayed_hook_log(harness.console_text(console_dir, cid)) if cid else [],
        )
        report("qemu_left", harness.qemu_pids(str(console_dir)))
        if rc != 0:
            r = run(["dmesg"])
            report("l1_dmesg_tail", r.stdout.splitlines()[-40:])
        report("driver_while_bound", driver_of(addr))
        t = time.monotonic()
        r = run([ctl, "restore", addr], env=env)
        step("kata-vfio-ctl restore", time.monotonic() - t)
        report(
            "restore",
            {
                "rc": r.returncode,
                "out": r.stdout[-2000:],
                "err": r.stderr[-2000:],
                "driver": driver_of(addr),
            },
        )
        if rc == 0 and driver_of(addr) == "e1000e":
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
