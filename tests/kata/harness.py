"""Running a real Kata Containers 1.x here: syslog, mounts, QEMU launcher, configuration.

What this machine needs for Kata 1.x (measured, ../shared/LAB.md section 4):
- a syslog listener on /dev/log (runtime, shim and proxy die without one);
- /run/kata-containers/shared/sandboxes as a shared mount (the root mount is private);
- a QEMU launcher as the hypervisor `path`: Kata 1.x hard-codes accel=kvm, a bare
  kernel_irqchip and -cpu host; there is no usable KVM, QEMU 7.2 rejects bare kernel_irqchip.
  The launcher also sends the guest console to a file and appends the test's devices;
- disable_vhost_net = true (no /dev/vhost-net), use_vsock = false (no vhost-vsock).

Everything here is test-only. The kata-vfio settings themselves come from
`kata-vfio-ctl install --kata-config FILE`, run by the test on the generated file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SHARED_SANDBOXES = Path("/run/kata-containers/shared/sandboxes")
QEMU = "/usr/bin/qemu-system-x86_64"

# Two e1000e on one QEMU hub forward to each other (LAB.md section 1), two more on a second
# hub for the 4-device benchmark (the 2-device tests get the first two: identical devices
# are matched in address order). Placed high on the root complex, away from the slots Kata
# gives its own devices.
E1000E_MACS = ("52:54:00:00:00:11", "52:54:00:00:00:12", "52:54:00:00:00:13", "52:54:00:00:00:14")
E1000E_SLOTS = ("0x1a", "0x1b", "0x1c", "0x1d")


def e1000e_args(count: int = len(E1000E_MACS)) -> tuple[str, ...]:
    """QEMU arguments for `count` e1000e: pairs on one hub each (hub 0: the first two)."""
    args: list[str] = []
    for n in range(count):
        args += [
            "-netdev",
            f"hubport,id=kvfioh{n + 1},hubid={n // 2}",
            "-device",
            f"e1000e,netdev=kvfioh{n + 1},mac={E1000E_MACS[n]},romfile=,"
            f"bus=pcie.0,addr={E1000E_SLOTS[n]}",
        ]
    return tuple(args)


E1000E_ARGS = e1000e_args()


# -- syslog -----------------------------------------------------------------------------
def _dev_log_alive() -> bool:
    try:
        if not stat.S_ISSOCK(os.stat("/dev/log").st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect("/dev/log")
        return True
    except OSError:
        return False


def _start_syslogd(log_file: Path) -> subprocess.Popen[bytes]:
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/dev/log")  # a stale socket from a killed listener
    busybox = shutil.which("busybox") or "/bin/busybox"
    proc = subprocess.Popen(
        [busybox, "syslogd", "-n", "-O", str(log_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not _dev_log_alive():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"busybox syslogd did not start (exit {proc.poll()})")
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def syslog(log_file: Path) -> Iterator[Path | None]:
    """A syslog listener on /dev/log for the duration, writing to `log_file` when it is ours.

    /dev/log is one per machine: another Kata session may own the listener and take it (and
    the socket) away while our VMs still log. A watcher thread starts ours whenever /dev/log
    stops answering; ours is stopped, and its socket removed, at the end. Yields `log_file`
    if ours ran from the start, else None (the log is elsewhere)."""
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def ensure() -> None:
        if _dev_log_alive():
            return
        for proc in procs:  # ours lost its socket (someone unlinked it)
            _stop(proc)
        procs[:] = [_start_syslogd(log_file)]

    ours_first = not _dev_log_alive()
    ensure()

    def watch() -> None:
        while not stop.wait(0.2):
            with contextlib.suppress(RuntimeError, OSError):
                ensure()

    watcher = threading.Thread(target=watch, name="kata-vfio-syslog", daemon=True)
    watcher.start()
    try:
        yield log_file if ours_first else None
    finally:
        stop.set()
        watcher.join()
        for proc in procs:
            _stop(proc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink("/dev/log")


# -- mount propagation ----------------------------------------------------------------
def _propagation(path: Path) -> tuple[str, str]:
    """(target of the mount holding `path`, its propagation)."""
    r = subprocess.run(
        ["findmnt", "-n", "-o", "TARGET,PROPAGATION", "-T", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    target, prop = r.stdout.split()[:2]
    return target, prop


def shared_sandboxes() -> bool:
    """Kata 1.13 bind-mounts each container's rootfs under `.../sandboxes/<id>/mounts` and
    relies on propagation to the read-only `.../shared` view the guest gets over 9p. On a
    host whose root mount is private, make the sandboxes directory a shared mount of its
    own (LAB.md section 4). Returns whether it changed anything.

    Deliberately not undone: the fix is idempotent and harmless, and other Kata users of
    this host (another test session, a Kata 3.x runtime) use the same directory; unmounting
    it under a running sandbox would break that sandbox."""
    SHARED_SANDBOXES.mkdir(parents=True, exist_ok=True)
    target, prop = _propagation(SHARED_SANDBOXES)
    if "shared" in prop.split(","):
        return False
    if target != str(SHARED_SANDBOXES):
        subprocess.run(
            ["mount", "--bind", str(SHARED_SANDBOXES), str(SHARED_SANDBOXES)], check=True
        )
    subprocess.run(["mount", "--make-shared", str(SHARED_SANDBOXES)], check=True)
    return True


# -- the hypervisor launcher -------------------------------------------------------------
LAUNCHER = '''#!/usr/bin/python3 -IS
"""Test-only hypervisor `path` for Kata 1.x under TCG (written by tests/kata/harness.py).

Rewrites what Kata 1.x hard-codes for KVM (accel=kvm -> tcg, no bare kernel_irqchip,
-cpu host -> -cpu max), sends the guest console to a file named after the sandbox and
appends the test's devices, then execs QEMU.
"""
import os
import sys

QEMU = {qemu!r}
CONSOLE_DIR = {console_dir!r}
EXTRA = {extra!r}

args = sys.argv[1:]
out = []
name = "vm"
i = 0
while i < len(args):
    a = args[i]
    if a == "-machine" and i + 1 < len(args):
        opts = [o for o in args[i + 1].split(",") if o != "kernel_irqchip"]
        opts = ["accel=tcg" if o == "accel=kvm" else o for o in opts]
        out += [a, ",".join(opts)]
        i += 2
        continue
    if a == "-cpu" and i + 1 < len(args):
        model, _, rest = args[i + 1].partition(",")
        out += [a, ("max" if model == "host" else model) + ("," + rest if rest else "")]
        i += 2
        continue
    if a == "-name" and i + 1 < len(args):
        name = args[i + 1].split(",")[0].removeprefix("sandbox-")
    if a == "-append" and i + 1 < len(args):
        out += [a, args[i + 1] + " console=ttyS0"]
        i += 2
        continue
    out.append(a)
    i += 1
console = os.path.join(CONSOLE_DIR, name + ".console")
out += ["-serial", "file:" + console, *EXTRA]
if args and args[0] != "--version":
    with open(os.path.join(CONSOLE_DIR, name + ".argv"), "w") as f:
        f.write("\\n".join([QEMU, *out]) + "\\n")
os.execv(QEMU, [QEMU, *out] if args[:1] != ["--version"] else [QEMU, *args])
'''


def write_qemu_launcher(
    path: Path, console_dir: Path, extra: tuple[str, ...] = E1000E_ARGS, qemu: str = QEMU
) -> Path:
    console_dir.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LAUNCHER.format(qemu=qemu, console_dir=str(console_dir), extra=list(extra)))
    path.chmod(0o755)
    return path


# -- Kata's configuration.toml ------------------------------------------------------------
def _set(text: str, table: str, key: str, value: str) -> str:
    """Set `key = value` (TOML literal) in [table] of Kata's generated file, keeping the rest."""
    header = re.compile(rf"^\[{re.escape(table)}\][ \t]*$", re.M)
    m = header.search(text)
    if m is None:
        return text.rstrip("\n") + f"\n\n[{table}]\n{key} = {value}\n"
    start = m.end()
    nxt = re.compile(r"^\[", re.M).search(text, start)
    end = nxt.start() if nxt else len(text)
    body = text[start:end]
    line = re.compile(rf"^[ \t]*#?[ \t]*{re.escape(key)}[ \t]*=.*$", re.M)
    # the first active line wins; else the first commented-out one; else add after the header
    active = [x for x in line.finditer(body) if not x.group(0).lstrip().startswith("#")]
    target = active[0] if active else next(iter(line.finditer(body)), None)
    if target is None:
        body = f"\n{key} = {value}" + body
    else:
        body = body[: target.start()] + f"{key} = {value}" + body[target.end() :]
    return text[:start] + body + text[end:]


def _drop(text: str, table: str, key: str) -> str:
    m = re.compile(rf"^\[{re.escape(table)}\][ \t]*$", re.M).search(text)
    if m is None:
        return text
    nxt = re.compile(r"^\[", re.M).search(text, m.end())
    end = nxt.start() if nxt else len(text)
    body = re.sub(
        rf"^[ \t]*{re.escape(key)}[ \t]*=.*$",
        f"# {key}: removed by the kata-vfio test",
        text[m.end() : end],
        flags=re.M,
    )
    return text[: m.end()] + body + text[end:]


def q(value: str | bool | int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_kata_config(
    generated: Path,
    out: Path,
    *,
    qemu: Path,
    kernel: Path,
    initrd: Path,
    binaries: dict[str, Path],
    debug: bool = False,
) -> Path:
    """Kata 1.x's generated configuration-qemu.toml with the test-only changes.

    Test-only: hypervisor path (the launcher), kernel, initrd instead of image, no
    vhost-net, no vsock, the shim/proxy/netmon paths of the installed Kata (the nested test
    copies them into L1's shared directory), optionally debug logs. The kata-vfio settings
    are `kata-vfio-ctl install`'s.
    """
    text = generated.read_text()
    hv = "hypervisor.qemu"
    text = _set(text, hv, "path", q(str(qemu)))
    text = _set(text, hv, "kernel", q(str(kernel)))
    text = _set(text, hv, "initrd", q(str(initrd)))
    text = _drop(text, hv, "image")
    text = _set(text, hv, "disable_vhost_net", q(True))
    text = _set(text, hv, "use_vsock", q(False))
    text = _set(text, "proxy.kata", "path", q(str(binaries["kata-proxy"])))
    text = _set(text, "shim.kata", "path", q(str(binaries["kata-shim"])))
    text = _set(text, "netmon", "path", q(str(binaries["kata-netmon"])))
    if debug:
        for table in (hv, "proxy.kata", "shim.kata", "agent.kata", "runtime"):
            text = _set(text, table, "enable_debug", q(True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


# -- the inner runtime: podman -> kata-vfio -> this -> kata-runtime ----------------------
INNER_RUNTIME = '''#!/usr/bin/python3 -IS
"""Test-only inner runtime (written by tests/kata/harness.py): what kata-vfio execs.

This host has no IOMMU: the /dev/vfio/<N> entries kata-vfio added for the fake host groups
must not reach kata-runtime, which would try to hot-plug those host groups. They are
dropped from config.json (the guest devices are QEMU's, appended by the launcher); the
rest of the spec (manifest and guest_hook_path annotations, /dev/vfio/vfio) is untouched.
Then kata-runtime runs with --kata-config.
"""
import json
import os
import re
import sys

KATA = {kata!r}
CONFIG = {config!r}
LOG = {log!r}

args = sys.argv[1:]
verbs = ("create", "run")
verb = next((a for a in args if a in verbs), None)
if verb is not None:
    bundle = "."
    for i, a in enumerate(args):
        if a in ("--bundle", "-b") and i + 1 < len(args):
            bundle = args[i + 1]
        elif a.startswith("--bundle="):
            bundle = a.split("=", 1)[1]
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    devices = spec.get("linux", {{}}).get("devices") or []
    keep = [d for d in devices if not re.fullmatch(r"/dev/vfio/[0-9]+", d.get("path", ""))]
    if len(keep) != len(devices):
        spec["linux"]["devices"] = keep
        with open(path + ".tmp", "w") as f:
            json.dump(spec, f)
        os.replace(path + ".tmp", path)
    process = spec.get("process") or {{}}
    caps = process.get("capabilities") or {{}}
    record = {{
        "argv": args, "dropped": len(devices) - len(keep),
        # what kata-runtime gets besides: the process's rlimits and capability sets, the
        # mount targets (the test checks nothing DPDK needs was added by hand)
        "rlimits": process.get("rlimits") or [],
        "capabilities": {{k: v for k, v in caps.items() if isinstance(v, list)}},
        "mounts": [m.get("destination") for m in spec.get("mounts") or []],
    }}
    with open(LOG, "a") as f:
        f.write(json.dumps(record) + "\\n")
os.execv(KATA, [KATA, "--kata-config", CONFIG, *args])
'''


def write_inner_runtime(path: Path, kata_runtime: Path, kata_config: Path, log: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        INNER_RUNTIME.format(kata=str(kata_runtime), config=str(kata_config), log=str(log))
    )
    path.chmod(0o755)
    return path


def write_wrapper_launcher(
    top: Path, wrapper: Path, inner: Path, sysfs: Path, hotplug_timeout: float
) -> tuple[Path, Path]:
    """The wrapper's configuration (its inner runtime, the host sysfs it sees, its log and
    state under `top`) and the launcher `top/bin/kata-vfio` that carries its path: podman
    gives runtimes a clean environment and keys runtime features by basename.
    Returns (configuration, launcher)."""
    config = top / "kata-vfio.toml"
    config.write_text(
        f'runtime = "{inner}"\nsysfs = "{sysfs}"\nlog_file = "{top / "kata-vfio.log"}"\n'
        f'state_dir = "{top / "state"}"\nhotplug_timeout = {hotplug_timeout}\n'
    )
    launcher = top / "bin/kata-vfio"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(f'#!/bin/sh\nKATA_VFIO_CONFIG={config} exec {wrapper} "$@"\n')
    launcher.chmod(0o755)
    return config, launcher


# -- processes ---------------------------------------------------------------------------
def qemu_pids(marker: str) -> list[int]:
    """QEMU processes whose command line mentions `marker` (a sandbox id, a directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmd
            and cmd[0].endswith(b"qemu-system-x86_64")
            and any(marker.encode() in c for c in cmd)
        ):
            pids.append(int(entry.name))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def console_text(console_dir: Path, cid: str) -> str:
    """The guest console of a container's sandbox, as the QEMU launcher wrote it."""
    path = console_dir / f"{cid}.console"
    return path.read_text(errors="replace") if path.exists() else ""


def relayed_hook_log(console: str) -> list[dict[str, object]]:
    """The guest hook's JSON log lines, relayed through the console by the test relay
    hook (tests/kata/guest): long lines come in pieces marked "+"."""
    import json

    records, partial = [], ""
    for line in console.splitlines():
        m = re.search(r"kata-vfio-hook\.log(\+?): (.*)$", line)
        if not m:
            continue
        partial += m.group(2)
        if m.group(1) == "+":
            continue
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(partial))
        partial = ""
    return records


def build_guest_image(image: Path, kver: str, agent: Path) -> Path:
    """`initrd/kata_image.py` with the test's additions: the native e1000e driver for the
    launcher's devices and the relay hook that copies our hook's log to the console.
    Reuses `make test`'s product initrd (KATA_VFIO_INITRD) when there is one."""
    import sys

    repo = Path(__file__).resolve().parent.parent.parent
    relay = repo / "tests/kata/guest/zz-kata-vfio-test-relay"
    cmd = [
        sys.executable,
        str(repo / "initrd/kata_image.py"),
        "--kver",
        kver,
        "--output",
        str(image),
        "--agent",
        str(agent),
        "--add-drivers",
        "e1000e",
        "--add-file",
        f"{relay}:/usr/share/oci/hooks/prestart/zz-kata-vfio-test-relay",
    ]
    base = os.environ.get("KATA_VFIO_INITRD")
    if base and Path(base).is_file():
        cmd += ["--base-initrd", base]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return image


def prepare_kata(
    top: Path, kver: str, kernel: Path, bins: dict[str, Path], timings: dict[str, float]
) -> tuple[Path, Path]:
    """What every real-Kata test sets up under `top`: the guest image, the TCG launcher
    writing each sandbox's console into a directory, and the test configuration.
    Returns (console directory, configuration.toml)."""
    import time

    t = time.monotonic()
    image = build_guest_image(top / "kata-vfio-kata.img", kver, bins["kata-agent"])
    timings["guest image"] = time.monotonic() - t
    console_dir = top / "console"
    qemu = write_qemu_launcher(top / "bin/qemu-tcg", console_dir)
    kata_config = write_kata_config(
        bins["configuration-qemu.toml"],
        top / "kata/configuration.toml",
        qemu=qemu,
        kernel=kernel,
        initrd=image,
        binaries=bins,
        debug=os.environ.get("KATA_VFIO_KATA_DEBUG") == "1",
    )
    return console_dir, kata_config


@contextlib.contextmanager
def run_directory(
    request: object, prefix: str, what: str, drop_when_kept: tuple[str, ...] = ()
) -> Iterator[Path]:
    """A real-Kata test module's working directory, under /var/tmp rather than pytest's
    tmp_path (a concurrent pytest session prunes /tmp/pytest-of-<user>/ down to 3 runs and
    would delete podman's storage, launchers and configurations while VMs use them).
    Kept for a look (consoles, syslog, configurations) when a test of the module failed or
    KATA_VFIO_KEEP_RUN=1, minus `drop_when_kept` (e.g. podman's storage); else removed."""
    import tempfile

    session = request.session  # type: ignore[attr-defined]
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    failed_before = session.testsfailed
    try:
        yield top
    finally:
        if os.environ.get("KATA_VFIO_KEEP_RUN") == "1" or session.testsfailed > failed_before:
            for name in drop_when_kept:
                shutil.rmtree(top / name, ignore_errors=True)
            print(f"\n{what} run directory kept: {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
